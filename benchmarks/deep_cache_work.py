"""How much of the denoiser's work each acceleration leaves, counted rather than timed: FLOPs of a built-in UNet and
of its shallow graph at each depth (torch's FlopCounterMode on the meta device: no weights, seconds), then the whole
denoising loop's work under each combination a recipe asks for, as a fraction of the plain loop's.

    python benchmarks/deep_cache_work.py [--model sd15-arch] [--size 512] [--steps 20] [--recipe FILE]

What it predicts is the ceiling an acceleration can reach on the denoiser (a shallow step costs its FLOPs' share; a
step without guidance half a guided one, as a CPU runs batch 2 at about twice batch 1); the build's timing says what
the runtime makes of it. Default accelerations: those of benchmarks/recipes/sd15-accelerated.toml.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from diffship.accelerations import step_plan
from diffship.models.builtin import BUILTINS
from diffship.models.families.unet_cache import CachingUNet, ShallowUNet
from diffship.recipe import load_recipe

HERE = Path(__file__).parent


def flops(module: torch.nn.Module, *args: torch.Tensor, **kwargs: object) -> int:
    with FlopCounterMode(display=False) as counter:
        module(*args, **kwargs)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-arch")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--recipe", type=Path, default=HERE / "recipes" / "sd15-accelerated.toml")
    args = parser.parse_args()
    config = BUILTINS[args.model].denoiser
    grid = load_recipe(args.recipe).accelerations
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        conditioned = unet.config.addition_embed_type == "text_time"
        side = args.size // 8
        inputs = (torch.zeros(1, 4, side, side), torch.zeros(1), torch.zeros(1, 77, unet.config.cross_attention_dim),
                  *((torch.zeros(1, 1280), torch.zeros(1, 6)) if conditioned else ()))
        full = flops(unet, *inputs[:3], **({"added_cond_kwargs": {"text_embeds": inputs[3], "time_ids": inputs[4]}}
                                           if conditioned else {}))
        print(f"{args.model} UNet at {args.size}x{args.size}, batch 1: {full / 1e9:.1f} GFLOP")
        share = {}
        for depth in sorted({c.depth for c in grid.deep_cache} | {1, 2, 3}):
            _, features = CachingUNet(unet, conditioned, depth)(*inputs)
            share[depth] = flops(ShallowUNet(unet, conditioned, depth), *inputs, features) / full
            print(f"  shallow graph at depth {depth}: {share[depth]:.3f} of the UNet")
    plain = 2.0 * args.steps
    print(f"\nthe loop's denoiser work at {args.steps} steps with guidance, as a fraction of the plain loop's:")
    for combo in grid.combinations():
        work = sum((2.0 if s.guided else 1.0) * (share[combo.deep_cache.depth] if s.graph == "shallow" else 1.0)
                   for s in step_plan(args.steps, combo, True))
        print(f"  {combo.label:55s} {work / plain:.3f}  (at most {plain / work:.2f}x on the denoiser)")


if __name__ == "__main__":
    main()
