"""Tensor-only forward functions over diffusers' SD3Transformer2DModel and FluxTransformer2DModel, as exported and
run, and the patches their export needs.

The patches are numerically the same computation in forms torch's TorchScript exporter writes at opset 17 with
dynamic axes (optimum-onnx patches model code for export the same way); they are applied only while exporting.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class SD3Transformer(nn.Module):
    """SD3Transformer2DModel: (hidden_states, timestep, encoder_hidden_states, pooled_projections) -> out_sample."""

    def __init__(self, transformer: nn.Module, inputs: tuple[str, ...]):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor) -> torch.Tensor:
        return self.transformer(hidden_states=hidden_states, timestep=timestep,
                                encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                                return_dict=False)[0]


class FluxTransformer(nn.Module):
    """FluxTransformer2DModel: its inputs in the spec's order (guidance only where the model embeds it) ->
    out_sample, the packed latents' prediction."""

    def __init__(self, transformer: nn.Module, inputs: tuple[str, ...]):
        super().__init__()
        self.transformer, self.names = transformer, inputs

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.transformer(**dict(zip(self.names, tensors, strict=True)), return_dict=False)[0]


def rms_norm(x: torch.Tensor, normalized_shape: Any, weight: torch.Tensor | None = None,
             eps: float | None = None) -> torch.Tensor:
    """torch.nn.functional.rms_norm in elementary ops: `aten::rms_norm` has no opset-17 symbolic."""
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    return y * weight if weight is not None else y


def rotary(x: torch.Tensor, freqs_cis: tuple[torch.Tensor, torch.Tensor], use_real: bool = True,
           use_real_unbind_dim: int = -1, sequence_dim: int = 2) -> torch.Tensor:
    """diffusers' apply_rotary_emb for Flux (real, interleaved pairs) with `unflatten` where it reshapes by the
    traced sizes (`reshape(*x.shape[:-1], -1, 2)` is written with the batch and token counts as constants)."""
    if not use_real or use_real_unbind_dim != -1:
        raise NotImplementedError("diffship's export patch covers Flux's rotary embedding only")
    cos, sin = freqs_cis
    cos, sin = (cos[None, None], sin[None, None]) if sequence_dim == 2 else (cos[None, :, None], sin[None, :, None])
    real, imaginary = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imaginary, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


@contextmanager
def exportable() -> Iterator[None]:
    """While exporting: RMSNorm and Flux's rotary embedding in exportable form."""
    import diffusers.models.transformers.transformer_flux as flux  # start-up time: diffusers

    saved = torch.nn.functional.rms_norm, flux.apply_rotary_emb
    torch.nn.functional.rms_norm, flux.apply_rotary_emb = rms_norm, rotary
    try:
        yield
    finally:
        torch.nn.functional.rms_norm, flux.apply_rotary_emb = saved
