"""Deep-feature caching (DeepCache, Ma et al. 2023) over diffusers' UNet2DConditionModel, as two exportable graphs.

A UNet's outer blocks see the latents at full resolution and change quickly from step to step; its deep blocks change
slowly. The *caching* graph is the whole UNet with one more output, the hidden state entering the last `depth` up
blocks; the *shallow* graph runs only the outer part (conv_in, the first `depth` down blocks, the last `depth` up
blocks, conv_out) and takes that hidden state, computed at an earlier step, as an input. Both follow
`UNet2DConditionModel.forward` for the inputs a diffusion pipeline gives it (no ControlNet residuals, adapters, GLIGEN
or masks), through the model's own embedding helpers, so they compute what the model computes: the shallow graph fed
the caching graph's features of the same call returns the UNet's output.

DeepCache's own code patches the UNet's forward at run time; diffship exports the two halves instead, so any target
runs them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _embed(unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
           added: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The time embedding (with SDXL's added text and time ids) and the text states, as the UNet's forward makes them."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    states = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
    return emb, states


def _down(unet: nn.Module, blocks: Any, sample: torch.Tensor, emb: torch.Tensor,
          states: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    residuals = (sample,)
    for block in blocks:
        if getattr(block, "has_cross_attention", False):
            sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=states)
        else:
            sample, res = block(hidden_states=sample, temb=emb)
        residuals += res
    return sample, residuals


def _up(blocks: Any, sample: torch.Tensor, residuals: tuple[torch.Tensor, ...], emb: torch.Tensor,
        states: torch.Tensor, upsample_sizes: bool, last: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Run up `blocks`, each taking its skip connections from the end of `residuals`; `last`: the final one of these
    is the UNet's final up block (no upsampler size to forward)."""
    for i, block in enumerate(blocks):
        take = len(block.resnets)
        res, residuals = residuals[-take:], residuals[:-take]
        size = residuals[-1].shape[2:] if upsample_sizes and not (last and i == len(blocks) - 1) else None
        if getattr(block, "has_cross_attention", False):
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=states,
                           upsample_size=size)
        else:
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=size)
    return sample, residuals


def _out(unet: nn.Module, sample: torch.Tensor) -> torch.Tensor:
    if unet.conv_norm_out:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)


def _upsample_sizes(unet: nn.Module, sample: torch.Tensor) -> bool:
    # the UNet forwards its skip connections' sizes to the upsamplers where a side is not a multiple of its factor
    factor = 2 ** unet.num_upsamplers
    return any(side % factor != 0 for side in sample.shape[-2:])


def check_depth(unet: nn.Module, depth: int) -> None:
    """A depth the UNet has: at least one outer block pair, fewer than all its up blocks."""
    if not 1 <= depth < len(unet.up_blocks):
        raise ValueError(f"deep-cache depth {depth} must be 1 to {len(unet.up_blocks) - 1} for this UNet "
                         f"({len(unet.up_blocks)} up blocks)")


class CachingUNet(nn.Module):
    """The whole UNet, returning its output and the features the shallow graph reuses: (sample, timestep,
    encoder_hidden_states[, text_embeds, time_ids]) -> (out_sample, cached_features)."""

    def __init__(self, unet: nn.Module, conditioned: bool, depth: int):
        super().__init__()
        check_depth(unet, depth)
        self.unet, self.depth = unet, depth

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        unet = self.unet
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        sizes = _upsample_sizes(unet, sample)
        emb, states = _embed(unet, sample, timestep, encoder_hidden_states, added)
        hidden, residuals = _down(unet, unet.down_blocks, unet.conv_in(sample), emb, states)
        if unet.mid_block is not None:
            hidden = unet.mid_block(hidden, emb, encoder_hidden_states=states) \
                if getattr(unet.mid_block, "has_cross_attention", False) else unet.mid_block(hidden, emb)
        deep, shallow = unet.up_blocks[:-self.depth], unet.up_blocks[-self.depth:]
        features, residuals = _up(deep, hidden, residuals, emb, states, sizes, last=False)
        out, _ = _up(shallow, features, residuals, emb, states, sizes, last=True)
        return _out(unet, out), features.clone()  # a copy: ONNX needs each graph output to be its own value


class ShallowUNet(nn.Module):
    """The UNet's outer `depth` blocks on cached deep features: (sample, timestep, encoder_hidden_states[,
    text_embeds, time_ids], cached_features) -> out_sample."""

    def __init__(self, unet: nn.Module, conditioned: bool, depth: int):
        super().__init__()
        check_depth(unet, depth)
        self.unet, self.depth, self.conditioned = unet, depth, conditioned

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *rest: torch.Tensor) -> torch.Tensor:
        unet = self.unet
        added = {"text_embeds": rest[0], "time_ids": rest[1]} if self.conditioned else None
        features = rest[-1]
        sizes = _upsample_sizes(unet, sample)
        emb, states = _embed(unet, sample, timestep, encoder_hidden_states, added)
        # the outer down blocks' skip connections: exactly those the last `depth` up blocks take (their last
        # downsampler's output feeds a deep block and is left out of the graph as dead code)
        taken = sum(len(block.resnets) for block in unet.up_blocks[-self.depth:])
        _, residuals = _down(unet, unet.down_blocks[:self.depth], unet.conv_in(sample), emb, states)
        out, _ = _up(unet.up_blocks[-self.depth:], features, residuals[:taken], emb, states, sizes, last=True)
        return _out(unet, out)
