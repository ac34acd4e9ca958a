"""What a set's memory options change, each measured on against off on the call it changes: VAE slicing, VAE tiling
and offload (the torch target's options; a set whose runners have none of them gets no rows)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from diffship.runtime.pipeline import DeployedPipeline
from diffship.targets import get_target
from diffship.validation import latency
from diffship.validation.parity import compare


def option_effects(deployed: DeployedPipeline, plan: Any,
                   say: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The measured effect of each memory option a set uses, on against off, on the call it changes: VAE slicing on
    the VAE decoder at batch 2 and the validation resolution, tiling on one image at the largest size the set serves,
    offload on a whole generation. Peak memory is
    what the call adds (GPU: allocated by torch; CPU: resident high-water mark). Options baked into a package, or
    not set, are not measured."""
    say = say or (lambda _: None)
    runners = deployed.runners
    options = getattr(next(iter(runners.values())), "options", None)
    lat = plan.validation.latency
    effects = []
    vae = runners.get("vae_decoder")
    for flag, attribute in (("vae_slicing", "use_slicing"), ("vae_tiling", "use_tiling")):
        if not getattr(options, flag, False) or vae is None or vae.module is None:
            continue
        shapes = deployed.artifacts.shapes or {}
        # Slicing decodes a batch one image at a time: measured on two images. Tiling matters for large images:
        # measured on the largest the set serves, one image.
        batch = max(1, min(2, shapes.get("batch", [1, 2])[1])) if flag == "vae_slicing" else 1
        height, width = (plan.height, plan.width) if flag == "vae_slicing" else \
            (shapes.get("height", [0, plan.height])[1], shapes.get("width", [0, plan.width])[1])
        inputs = vae.spec.sample_inputs(batch, height, width)
        runs: dict[str, Any] = {}
        for state in (True, False):
            setattr(vae.module, attribute, state)
            vae.run(inputs)  # warm-up; under torch.compile the switch recompiles here
            out: dict[str, Any] = {}
            runs[state] = {"peak": _peak(vae, lambda v=vae, x=inputs, o=out: o.update(v.run(x)))}
            runs[state] |= {"output": out["sample"],
                            "times": latency.interleaved({"call": lambda v=vae, x=inputs: v.run(x)}, 0, lat.runs)["call"]}
        setattr(vae.module, attribute, True)
        call = f"vae_decoder, batch {batch}, {height}x{width}"
        if flag == "vae_tiling":
            tile = vae.module.tile_sample_min_size
            engaged = height > tile or width > tile
            call += f" ({'tiles' if engaged else 'no tiles: not above'} {tile}x{tile} px)"
        effects.append(_effect(flag, call, runs))
        say(f"      {flag}: peak {_gib(runs[True]['peak'])} on, {_gib(runs[False]['peak'])} off")
    if getattr(options, "offload", "none") != "none":
        backend = get_target(deployed.artifacts.target)
        v = plan.validation
        sample = (v.prompts[0], v.negative_prompt, plan.height, plan.width, v.steps, v.guidance_scale, v.seeds[0])
        without = {n: backend.load(r.artifact, r.options.model_copy(update={"offload": "none"}))
                   for n, r in runners.items()}
        plain = DeployedPipeline(deployed.artifacts, without, {})
        runs = {}
        for state, pipe in ((True, deployed), (False, plain)):
            backend.release_resident()
            pipe(*sample)
            generated: list[Any] = []
            runs[state] = {"peak": latency.peak_gpu_during(lambda p=pipe, g=generated: g.append(p(*sample)))}
            runs[state] |= {"output": generated[0].images.astype(np.float32),
                            "times": latency.interleaved({"call": lambda p=pipe: p(*sample)}, 0,
                                                         lat.pipeline_runs)["call"]}
        del plain
        effects.append(_effect(f"{options.offload} offload", f"whole pipeline, {v.steps} steps", runs))
    return effects


def _peak(runner: Any, call: Any) -> int | None:
    return latency.peak_gpu_during(call) if runner.device == "cuda" else latency.peak_rss_during(call)


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def _effect(option: str, call: str, runs: dict[bool, dict[str, Any]]) -> dict[str, Any]:
    on, off = runs[True], runs[False]
    return {"option": option, "call": call, "peak_on_bytes": on["peak"], "peak_off_bytes": off["peak"],
            "on": latency.summarize(on["times"]), "off": latency.summarize(off["times"]),
            "cosine_on_vs_off": compare(off["output"], on["output"])["cosine"]}
