"""What each compression stage costs and keeps: parameters, non-zero weights, bytes, UNet latency, quality."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from diffship.models.families import denoiser_of
from diffship.validation import quality


def weight_stats(module: nn.Module) -> dict[str, int]:
    """Parameter count, truly non-zero parameters, and bytes held by the module's state (quantized data included)."""
    params = nonzero = 0
    for p in module.parameters():
        params += p.numel()
        nonzero += int(torch.count_nonzero(_plain(p)))
    size = sum(_bytes(t) for t in module.state_dict().values())
    return {"params": params, "nonzero": nonzero, "bytes": size}


def _plain(t: torch.Tensor) -> torch.Tensor:
    # quantized tensor subclasses (optimum-quanto) count their dequantized values
    plain = type(t) in (torch.Tensor, nn.Parameter)
    return t.detach() if plain else t.detach().dequantize()


def _bytes(t: Any) -> int:
    if not isinstance(t, torch.Tensor):
        return 0
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
        names, _ = inner()
        return sum(_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def denoiser_latency(denoiser: nn.Module, call: dict[str, np.ndarray], repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of one UNet call on a captured input, on the module's own device and dtype."""
    p = next(denoiser.parameters())
    device = p.device
    dtype = p.dtype if p.is_floating_point() else torch.float32
    args = {k: torch.from_numpy(v).to(device) for k, v in call.items()}
    args = {k: v.to(dtype) if v.is_floating_point() and k != "timestep" else v for k, v in args.items()}
    added = {k: args.pop(k) for k in ("text_embeds", "time_ids") if k in args}
    kwargs = {"added_cond_kwargs": added} if added else {}
    times = []
    with torch.no_grad():  # not inference_mode: optimum-quanto's int4 kernels fail on inference tensors
        for i in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            denoiser(args["sample"], args["timestep"], args["encoder_hidden_states"], **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - began)
    return statistics.median(times)


def digits_quality(pipe: Any, seeds: list[int], steps: int, guidance_scale: float, height: int, width: int,
                   say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Prompt accuracy of the pipeline as it stands (with the compressed denoiser), over every digit and seed."""
    from diffship.runtime.pipeline import initial_latents  # start-up time: pydantic
    from diffship.validation.baseline import run_baseline  # start-up time: pydantic

    scale = pipe.vae_scale_factor
    channels = getattr(pipe, denoiser_of(pipe).component).config.in_channels

    def generate(prompt: str, seed: int) -> np.ndarray:
        latents = initial_latents(seed, 1, channels, height // scale, width // scale)
        return run_baseline(pipe, prompt, None, height, width, steps, guidance_scale, seed, latents).images[0]

    scores = quality.measure(generate, seeds, say)
    return {k: scores[k] for k in ("prompt_accuracy", "per_digit", "fd_digits", "images", "seeds")}
