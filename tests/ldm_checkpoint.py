"""Write a diffusers SD 1.x-shaped folder (any UNet input channels) as one original-layout (LDM / A1111) checkpoint,
for tests and the single-file benchmark: the files users download are in this layout and the project cannot download one.

diffusers ships only the other direction (`diffusers.loaders.single_file_utils`); its repository's
`convert_diffusers_to_original_stable_diffusion.py` is not in the wheel. This inverts the block arithmetic of
diffusers' `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint` and reuses its key tables; a test converts
the file back with diffusers' own loader and requires every tensor to come back bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file
from transformers import CLIPTextModel

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(rest: str, table: dict[str, str]) -> str:
    head, _, leaf = rest.rpartition(".")
    return f"{table.get(head, head)}.{leaf}"


def unet_keys(config: dict[str, Any], keys: list[str]) -> dict[str, str]:
    """diffusers UNet key -> LDM key (without the `model.diffusion_model.` prefix)."""
    per = config["layers_per_block"] + 1
    top = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}
    has_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    mapping = {}
    for key in keys:
        parts = key.split(".")
        if key in top:
            mapping[key] = top[key]
        elif parts[0] == "down_blocks":
            block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "downsamplers":
                mapping[key] = f"input_blocks.{(block + 1) * per}.0.op.{rest.removeprefix('conv.')}"
            else:
                slot = 1 + block * per + index
                mapping[key] = (f"input_blocks.{slot}.0.{_rename(rest, RESNET)}" if kind == "resnets"
                                else f"input_blocks.{slot}.1.{rest}")
        elif parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            mapping[key] = (f"middle_block.{2 * index}.{_rename(rest, RESNET)}" if kind == "resnets"
                            else f"middle_block.1.{rest}")
        elif parts[0] == "up_blocks":
            block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "upsamplers":
                mapping[key] = f"output_blocks.{block * per + per - 1}.{2 if has_attention[block] else 1}.{rest}"
            else:
                slot = block * per + index
                mapping[key] = (f"output_blocks.{slot}.0.{_rename(rest, RESNET)}" if kind == "resnets"
                                else f"output_blocks.{slot}.1.{rest}")
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
    return mapping


def vae_keys(config: dict[str, Any], keys: list[str]) -> dict[str, str]:
    """diffusers VAE key -> LDM key (without the `first_stage_model.` prefix)."""
    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    levels = len(config["up_block_types"])
    mapping = {}
    for key in keys:
        parts = key.split(".")
        side = parts[0]
        if key in top:
            mapping[key] = top[key]
        elif parts[1] in ("down_blocks", "up_blocks"):
            block, kind, index, rest = int(parts[2]), parts[3], parts[4], ".".join(parts[5:])
            level = block if parts[1] == "down_blocks" else levels - 1 - block
            name = "down" if parts[1] == "down_blocks" else "up"
            if kind in ("downsamplers", "upsamplers"):
                mapping[key] = f"{side}.{name}.{level}.{'downsample' if name == 'down' else 'upsample'}.{rest}"
            else:
                mapping[key] = f"{side}.{name}.{level}.block.{index}.{_rename(rest, {'conv_shortcut': 'nin_shortcut'})}"
        elif parts[1] == "mid_block":
            kind, index, rest = parts[2], int(parts[3]), ".".join(parts[4:])
            mapping[key] = (f"{side}.mid.block_{index + 1}.{_rename(rest, {'conv_shortcut': 'nin_shortcut'})}"
                            if kind == "resnets" else f"{side}.mid.attn_1.{_rename(rest, VAE_ATTENTION)}")
        else:
            raise KeyError(f"no LDM name for VAE key {key}")
    return mapping


def write_ldm_checkpoint(folder: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """`folder`'s UNet, VAE and CLIP text encoder as one original-layout .safetensors file at `out`."""
    state: dict[str, torch.Tensor] = {}
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    unet_state = unet.state_dict()
    for key, ldm in unet_keys(dict(unet.config), list(unet_state)).items():
        state[f"model.diffusion_model.{ldm}"] = unet_state[key]
    del unet, unet_state
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    vae_state = vae.state_dict()
    for key, ldm in vae_keys(dict(vae.config), list(vae_state)).items():
        tensor = vae_state[key]
        if ".attn_1." in ldm and ldm.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # the original VAE's attention is 1x1 convolutions
        state[f"first_stage_model.{ldm}"] = tensor
    text = CLIPTextModel.from_pretrained(folder / "text_encoder")
    for key, tensor in text.state_dict().items():
        name = key if key.startswith("text_model.") else f"text_model.{key}"
        state[f"cond_stage_model.transformer.{name}"] = tensor
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(out))
    return out
