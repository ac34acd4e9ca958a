"""Attention implementations for Core ML conversion, after Apple's ml-stable-diffusion converter.

Each function takes query, key and value in Apple's channels-first layout, (batch, channels, 1, sequence),
and returns the attention output in the same layout, heads concatenated along channels. The processor below
puts diffusers' `Attention` modules (UNet and VAE) on one of them while keeping their weights, so the traced
graph carries that attention's ops. The rest of the network keeps diffusers' layout: Apple's full rewrite of
linear layers as 1x1 convolutions is not done here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from diffship.errors import DiffshipError

QUERY_CHUNK = 512  # split_einsum_v2's query chunk, Apple's value


def original(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """All heads in one batched einsum: Apple's ORIGINAL, recommended for the GPU."""
    batch, channels, _, _ = q.shape
    dim = channels // heads
    q, k, v = (t.reshape(batch, heads, dim, -1) for t in (q, k, v))  # (B, H, D, S)
    weights = torch.einsum("bhdq,bhdk->bhqk", q, k) * dim**-0.5  # (B, H, Sq, Sk)
    out = torch.einsum("bhqk,bhdk->bhdq", weights.softmax(dim=-1), v)  # (B, H, D, Sq)
    return out.reshape(batch, channels, 1, -1)


def _head_slices(t: torch.Tensor, heads: int) -> list[torch.Tensor]:
    dim = t.shape[1] // heads
    return [t[:, h * dim:(h + 1) * dim] for h in range(heads)]  # heads x (B, D, 1, S)


def _head_keys(k: torch.Tensor, heads: int) -> list[torch.Tensor]:
    k = k.transpose(1, 3)  # (B, Sk, 1, C), transposed once for all heads
    dim = k.shape[-1] // heads
    return [k[..., h * dim:(h + 1) * dim] for h in range(heads)]  # heads x (B, Sk, 1, D)


def _one_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # q: (B, D, 1, Sq); k: (B, Sk, 1, D), transposed once for all heads; v: (B, D, 1, Sk)
    weights = torch.einsum("bdiq,bkid->bkiq", q, k) * q.shape[1] ** -0.5  # (B, Sk, 1, Sq)
    return torch.einsum("bkiq,bdik->bdiq", weights.softmax(dim=1), v)  # (B, D, 1, Sq)


def split_einsum(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """One einsum per head, no multi-head reshape or transpose of the activations: Apple's SPLIT_EINSUM, for the
    Neural Engine."""
    outs = [_one_head(qh, kh, vh) for qh, kh, vh in zip(_head_slices(q, heads), _head_keys(k, heads),
                                                        _head_slices(v, heads), strict=True)]
    return torch.cat(outs, dim=1)  # (B, C, 1, Sq)


def split_einsum_v2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """split_einsum with the query sequence cut into chunks of 512, which keeps the Neural Engine's intermediate
    tensors small at large latent sizes: Apple's SPLIT_EINSUM_V2."""
    if q.shape[-1] <= QUERY_CHUNK:
        return split_einsum(q, k, v, heads)
    outs = []
    for qh, kh, vh in zip(_head_slices(q, heads), _head_keys(k, heads), _head_slices(v, heads), strict=True):
        chunks = torch.split(qh, QUERY_CHUNK, dim=-1)  # the last chunk may be shorter
        outs.append(torch.cat([_one_head(c, kh, vh) for c in chunks], dim=-1))
    return torch.cat(outs, dim=1)  # (B, C, 1, Sq)


IMPLEMENTATIONS: dict[str, Callable[..., torch.Tensor] | None] = {
    "sdpa": None,  # diffusers' own scaled_dot_product_attention: Core ML's fused op from iOS 18 on
    "original": original,
    "split_einsum": split_einsum,
    "split_einsum_v2": split_einsum_v2,
}


class CoreMLAttnProcessor:
    """A diffusers attention processor computing attention with one of the functions above (self- and
    cross-attention, the VAE's spatial attention with its group norm and residual)."""

    def __init__(self, attend: Callable[..., torch.Tensor]):
        self.attend = attend

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        if attention_mask is not None or attn.spatial_norm is not None or attn.norm_q is not None or attn.norm_k is not None:
            raise DiffshipError("This attention layer uses a mask or a normalization the Core ML attention "
                                "implementations do not reproduce; convert with attention = 'sdpa'.")
        residual = hidden_states
        spatial = hidden_states.ndim == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.reshape(batch, channels, height * width).transpose(1, 2)  # (B, S, C)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        # (B, S, C) -> Apple's (B, C, 1, S)
        q, k, v = (t.transpose(1, 2).unsqueeze(2) for t in (attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)))
        out = self.attend(q, k, v, attn.heads).squeeze(2).transpose(1, 2)  # (B, Sq, C)
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial:
            out = out.transpose(1, 2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def reproducible(layer: Any) -> bool:
    """Whether `CoreMLAttnProcessor` computes what the layer's own processor does: diffusers' plain self- / cross-
    attention without q / k norms. SD3's joint attention (text and image tokens attended together, RMS qk-norm) is
    not, nor Flux's (RoPE, its own attention class): they keep their own processors."""
    return (type(layer.processor).__name__ in ("AttnProcessor2_0", "AttnProcessor") and layer.spatial_norm is None
            and layer.norm_q is None and layer.norm_k is None and getattr(layer, "add_q_proj", None) is None)


def use_attention(module: nn.Module, implementation: str) -> int:
    """Put every diffusers `Attention` in `module` that it can reproduce on `implementation`; the number of layers
    changed (0 for 'sdpa', for modules without diffusers attention such as the text encoders, and for the
    transformers' joint attention, which keeps the model's own)."""
    if implementation not in IMPLEMENTATIONS:
        raise DiffshipError(f"Unknown Core ML attention {implementation!r}; choose {', '.join(IMPLEMENTATIONS)}.")
    attend = IMPLEMENTATIONS[implementation]
    if attend is None:
        return 0
    from diffusers.models.attention_processor import Attention  # start-up time: diffusers

    layers = [m for m in module.modules() if isinstance(m, Attention) and reproducible(m)]
    for layer in layers:
        layer.set_processor(CoreMLAttnProcessor(attend))
    return len(layers)
