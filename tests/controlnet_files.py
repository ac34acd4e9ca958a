"""ControlNets the tests make themselves: diffusers' `ControlNetModel.from_unet` over a tiny pipeline's UNet, with
its zero-initialized output convolutions (and conditioning embedding's last) given seeded non-zero weights: a
ControlNet fresh from `from_unet` adds nothing to the UNet and would prove nothing."""

from __future__ import annotations

from pathlib import Path

import torch

from diffship.models.loading import load_component


def tiny_controlnet(folder: Path, out: Path, seed: int = 0, strength: float = 0.5) -> Path:
    """A ControlNet for the pipeline in `folder`, saved as a diffusers folder at `out`."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(load_component(folder, "unet"))
    g = torch.Generator().manual_seed(seed)
    zero_convs = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * strength / conv.weight[0].numel() ** 0.5)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
    net.save_pretrained(out, safe_serialization=True)
    return out
