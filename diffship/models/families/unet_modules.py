"""Tensor-only forward functions over diffusers' UNet2DConditionModel and ControlNetModel, as exported and run."""

from __future__ import annotations

import torch
from torch import nn


class UNet(nn.Module):
    """UNet2DConditionModel: (sample, timestep, encoder_hidden_states[, text_embeds, time_ids]) -> out_sample."""

    def __init__(self, unet: nn.Module, conditioned: bool = False):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


class ControlNet(nn.Module):
    """ControlNetModel: (sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale[, text_embeds,
    time_ids]) -> the down-block residuals and the mid-block residual, already scaled (guess mode off)."""

    def __init__(self, controlnet: nn.Module, conditioned: bool = False):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, conditioning_scale: torch.Tensor, text_embeds: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond,
                                    conditioning_scale=conditioning_scale, added_cond_kwargs=added, return_dict=False)
        return (*down, mid)


class ControlledUNet(nn.Module):
    """UNet2DConditionModel taking ControlNet residuals: (sample, timestep, encoder_hidden_states[, text_embeds,
    time_ids], down_block_0 ... mid_block) -> out_sample; several ControlNets compose by summing residuals first."""

    def __init__(self, unet: nn.Module, conditioned: bool):
        super().__init__()
        self.unet, self.conditioned = unet, conditioned

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *rest: torch.Tensor) -> torch.Tensor:
        added = {"text_embeds": rest[0], "time_ids": rest[1]} if self.conditioned else None
        residuals = rest[2:] if self.conditioned else rest
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added,
                         down_block_additional_residuals=residuals[:-1], mid_block_additional_residual=residuals[-1],
                         return_dict=False)[0]
