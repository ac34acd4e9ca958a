"""Deep-feature caching (DeepCache, Ma et al. 2023) over diffusers' UNet2DConditionModel, as two exportable graphs.

A UNet's outer layers see the latents at full resolution and change quickly from step to step; its deep ones change
slowly. Its down path leaves skip connections r0 (conv_in's output), r1, r2, ... (each down layer's output, each
downsampler's), which its up path takes back in reverse. At `depth` d the *shallow* graph runs conv_in and the down
layers up to r_d, then the up layers that take r_d ... r0 (the last d + 1 of them), starting from the hidden state that
enters the first of those, computed at an earlier step; the *caching* graph is the whole UNet, also returning that
hidden state. Depth 1 is DeepCache's shallowest branch (SD 1.5: one ResNet + attention down, two up); the last up
block's whole (SD 1.5) is depth 2.

Both run the UNet layer by layer as diffusers' blocks do (`CrossAttnDownBlock2D`, `UpBlock2D`, ...: ResNet, then
attention; skip connections concatenated before each up ResNet; down- and upsamplers), through the model's own
embedding helpers, for the inputs a diffusion pipeline gives it (no ControlNet residuals, adapters, GLIGEN, FreeU or
masks): the shallow graph fed the caching graph's features of the same call returns the UNet's output exactly
(tests/test_accelerations.py). DeepCache's own code patches the UNet's forward at run time; diffship exports the two
halves instead, so any target runs them.
"""

from __future__ import annotations

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


def _layer(block: nn.Module, j: int, hidden: torch.Tensor, emb: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """Layer j of a block: its ResNet, then its attention where it has one."""
    hidden = block.resnets[j](hidden, emb)
    attentions = getattr(block, "attentions", None)
    if attentions is not None:
        hidden = attentions[j](hidden, encoder_hidden_states=states, return_dict=False)[0]
    return hidden


def _down(unet: nn.Module, sample: torch.Tensor, emb: torch.Tensor, states: torch.Tensor,
          until: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """conv_in and the down path, layer by layer: the last hidden state and the skip connections r0, r1, ...
    (stopping once r_until is made)."""
    hidden = unet.conv_in(sample)
    residuals = [hidden]
    for block in unet.down_blocks:
        for j in range(len(block.resnets)):
            if until is not None and len(residuals) > until:
                return hidden, residuals
            hidden = _layer(block, j, hidden, emb, states)
            residuals.append(hidden)
        for downsampler in block.downsamplers or ():
            if until is not None and len(residuals) > until:
                return hidden, residuals
            hidden = downsampler(hidden)
            residuals.append(hidden)
    return hidden, residuals


def _up(unet: nn.Module, hidden: torch.Tensor, residuals: list[torch.Tensor], emb: torch.Tensor, states: torch.Tensor,
        sizes: bool, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Up layers `start` (counted over the whole up path) to `stop` (exclusive), each concatenating the last skip
    connection left in `residuals` before its ResNet, each block's upsampler after its last layer."""
    k = 0
    for block in unet.up_blocks:
        for j in range(len(block.resnets)):
            if start <= k and (stop is None or k < stop):
                hidden = _layer(block, j, torch.cat([hidden, residuals.pop()], dim=1), emb, states)
            k += 1
        if start < k and (stop is None or k <= stop) and block.upsamplers is not None:
            # the UNet forwards the next skip connection's size where a side does not divide evenly
            size = residuals[-1].shape[2:] if sizes and residuals else None
            for upsampler in block.upsamplers:
                hidden = upsampler(hidden, size)
    return hidden


def _out(unet: nn.Module, sample: torch.Tensor) -> torch.Tensor:
    if unet.conv_norm_out:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)


def _upsample_sizes(unet: nn.Module, sample: torch.Tensor) -> bool:
    factor = 2 ** unet.num_upsamplers
    return any(side % factor != 0 for side in sample.shape[-2:])


def _up_layers(unet: nn.Module) -> int:
    return sum(len(block.resnets) for block in unet.up_blocks)


def check_depth(unet: nn.Module, depth: int) -> None:
    """A depth the UNet has: at least one skip connection after conv_in, never the mid block."""
    deepest = _up_layers(unet) - 1
    if not 1 <= depth <= deepest:
        raise ValueError(f"deep-cache depth {depth} must be 1 to {deepest} for this UNet")


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
        hidden, residuals = _down(unet, sample, emb, states)
        if unet.mid_block is not None:
            hidden = unet.mid_block(hidden, emb, encoder_hidden_states=states) \
                if getattr(unet.mid_block, "has_cross_attention", False) else unet.mid_block(hidden, emb)
        cut = _up_layers(unet) - 1 - self.depth  # the up layer that takes r_depth
        features = _up(unet, hidden, residuals, emb, states, sizes, stop=cut)
        out = _up(unet, features, residuals, emb, states, sizes, start=cut)
        return _out(unet, out), features.clone()  # a copy: ONNX needs each graph output to be its own value


class ShallowUNet(nn.Module):
    """The UNet's outer layers on cached deep features: (sample, timestep, encoder_hidden_states[, text_embeds,
    time_ids], cached_features) -> out_sample."""

    def __init__(self, unet: nn.Module, conditioned: bool, depth: int):
        super().__init__()
        check_depth(unet, depth)
        self.unet, self.depth, self.conditioned = unet, depth, conditioned

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *rest: torch.Tensor) -> torch.Tensor:
        unet = self.unet
        added = {"text_embeds": rest[0], "time_ids": rest[1]} if self.conditioned else None
        sizes = _upsample_sizes(unet, sample)
        emb, states = _embed(unet, sample, timestep, encoder_hidden_states, added)
        _, residuals = _down(unet, sample, emb, states, until=self.depth)
        out = _up(unet, rest[-1], residuals, emb, states, sizes, start=_up_layers(unet) - 1 - self.depth)
        return _out(unet, out)
