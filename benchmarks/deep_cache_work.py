"""How much of the denoiser's work each acceleration leaves, counted rather than timed: FLOPs of a built-in UNet (or
SD3 / Flux transformer) and of its shallow graph at each depth (torch's FlopCounterMode on the meta device: no
weights, seconds), then the whole denoising loop's work under each combination a recipe asks for, as a fraction of
the plain loop's. On a transformer only block caching runs (its loop is diffusers'): guidance rows are left out.

    python benchmarks/deep_cache_work.py [--model sd15-arch] [--size 512] [--steps 20] [--recipe FILE]

What it predicts is the ceiling an acceleration can reach on the denoiser (a shallow step costs its FLOPs' share; a
step without guidance half a guided one, as a CPU runs batch 2 at about twice batch 1); the build's timing says what
the runtime makes of it. Default accelerations: those of benchmarks/recipes/sd15-accelerated.toml.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import diffusers
import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from diffship.accelerations import AccelerationGrid, step_plan
from diffship.models.builtin import BUILTINS
from diffship.models.families import family_named
from diffship.models.families.transformer import cache_depths
from diffship.models.families.transformer_cache import CachingTransformer, ShallowTransformer
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
    grid = load_recipe(args.recipe).accelerations
    transformer = BUILTINS[args.model].denoiser_class != "UNet2DConditionModel"
    with torch.device("meta"):
        full, share = (transformer_shares if transformer else unet_shares)(args.model, args.size, grid)
    print(f"{args.model} {'transformer' if transformer else 'UNet'} at {args.size}x{args.size}, batch 1: "
          f"{full / 1e9:.1f} GFLOP")
    for depth, part in share.items():
        print(f"  shallow graph at depth {depth}: {part:.3f} of it")
    plain = 2.0 * args.steps
    print(f"\nthe loop's denoiser work at {args.steps} steps with guidance, as a fraction of the plain loop's:")
    for combo in grid.combinations():
        if transformer and combo.guidance is not None:
            continue
        work = sum((2.0 if s.guided else 1.0) * (share[combo.deep_cache.depth] if s.graph == "shallow" else 1.0)
                   for s in step_plan(args.steps, combo, True))
        print(f"  {combo.label:55s} {work / plain:.3f}  (at most {plain / work:.2f}x on the denoiser)")


def unet_shares(model: str, size: int, grid: AccelerationGrid) -> tuple[int, dict[int, float]]:
    """The UNet's FLOPs at batch 1 and each depth's shallow graph as a share of them."""
    unet = UNet2DConditionModel.from_config(BUILTINS[model].denoiser)
    conditioned = unet.config.addition_embed_type == "text_time"
    side = size // 8
    inputs = (torch.zeros(1, 4, side, side), torch.zeros(1), torch.zeros(1, 77, unet.config.cross_attention_dim),
              *((torch.zeros(1, 1280), torch.zeros(1, 6)) if conditioned else ()))
    full = flops(unet, *inputs[:3], **({"added_cond_kwargs": {"text_embeds": inputs[3], "time_ids": inputs[4]}}
                                       if conditioned else {}))
    share = {}
    for depth in sorted({c.depth for c in grid.deep_cache} | {1, 2, 3}):
        _, features = CachingUNet(unet, conditioned, depth)(*inputs)
        share[depth] = flops(ShallowUNet(unet, conditioned, depth), *inputs, features) / full
    return full, share


def transformer_shares(model: str, size: int, grid: AccelerationGrid) -> tuple[int, dict[int, float]]:
    """The SD3 / Flux transformer's FLOPs at batch 1 (the family's text tokens) and each block-cache depth's shallow
    graph as a share of them."""
    builtin = BUILTINS[model]
    module = getattr(diffusers, builtin.denoiser_class).from_config(builtin.denoiser)
    family = family_named(builtin.family)
    config = dict(module.config)
    tensors = family.denoiser.inputs(config, family)
    latent = size // 8
    sizes = {"batch": 1, "sequence": family.t5_tokens + family.clip_tokens, "height": latent, "width": latent,
             "image_tokens": (latent // 2) ** 2}
    inputs = [torch.zeros(t.concrete(sizes)) for t in tensors]
    names = tuple(t.name for t in tensors)
    full = flops(module, **dict(zip(names, inputs, strict=True)))
    share = {}
    for depth in sorted({c.depth for c in grid.deep_cache} | {1, 2, 4}):
        if depth > cache_depths(config):
            continue
        _, residual = CachingTransformer(module, names, depth)(*inputs)
        share[depth] = flops(ShallowTransformer(module, names, depth), *inputs, residual) / full
    return full, share

if __name__ == "__main__":
    main()
