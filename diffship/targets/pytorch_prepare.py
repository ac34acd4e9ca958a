"""A component prepared for the torch target: the dtype it runs in (the VAE kept FP32 where it overflows), the
recipe's options applied to its module (attention, channels_last, VAE slicing / tiling), its I/O cast."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffship.errors import DiffshipError
from diffship.models.components import ComponentSpec
from diffship.targets.options import vae_fp32_reason
from diffship.targets.pytorch_options import FP32_INPUTS, TorchOptions, variant


def effective_dtype(precision: str, spec: ComponentSpec, options: TorchOptions) -> tuple[str, str | None]:
    """The type component `spec` keeps its weights in for `precision` (FP32 under autocast), and why a component
    leaves the set's precision when it does (SDXL's VAE: no FP16, not even under autocast)."""
    v = variant(precision)
    if v.dtype == "fp16" and (reason := vae_fp32_reason(spec, options.vae_precision)):
        return "fp32", reason
    return "fp32" if v.autocast else v.dtype, None


def apply_options(module: nn.Module, spec: ComponentSpec, options: TorchOptions) -> dict[str, Any]:
    """Set attention, memory format and VAE slicing / tiling on a loaded diffusers module; return what was set."""
    applied: dict[str, Any] = {}
    if spec.is_denoiser:
        own = {type(p).__name__ for p in getattr(module, "attn_processors", {}).values()}
        if options.attention == "slicing":
            if not hasattr(module, "set_attention_slice"):
                raise DiffshipError(f"The {spec.denoiser.title} has no attention slicing; use the torch option "
                                    "attention = 'sdpa'.")
            module.set_attention_slice(options.attention_slice)
            applied["attention"] = f"sliced ({options.attention_slice})"
        elif own <= {"AttnProcessor", "AttnProcessor2_0"}:
            from diffusers.models.attention_processor import AttnProcessor2_0  # start-up time: diffusers

            module.set_attn_processor(AttnProcessor2_0())
            applied["attention"] = "sdpa"
        else:  # the transformers' joint attention processors already call scaled_dot_product_attention
            applied["attention"] = f"sdpa ({', '.join(sorted(own))})"
    if spec.role != "text_encoder" and options.channels_last:
        module.to(memory_format=torch.channels_last)
        applied["channels_last"] = True
    if spec.role in ("vae_encoder", "vae_decoder"):
        if options.vae_slicing:
            module.enable_slicing()
            applied["vae_slicing"] = True
        if options.vae_tiling:
            module.enable_tiling()
            applied["vae_tiling"] = True
    return applied


class CastIO(nn.Module):
    """A component wrapper with FP32 inputs and outputs whatever its own type, like the ONNX export's: float inputs are
    cast to `dtype` (the timestep stays FP32), outputs back to FP32. Baked into AOTInductor packages."""

    def __init__(self, wrapper: nn.Module, spec: ComponentSpec, dtype: torch.dtype):
        super().__init__()
        self.wrapper, self.dtype = wrapper, dtype
        self.cast = tuple(t.dtype.startswith("float") and t.name not in FP32_INPUTS for t in spec.inputs)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = tuple(a.to(self.dtype) if cast else a for a, cast in zip(args, self.cast, strict=True))
        out = self.wrapper(*args)
        return tuple(o.float() for o in (out if isinstance(out, tuple) else (out,)))
