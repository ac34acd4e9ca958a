"""Flux's original (BFL) module names -> diffusers' `FluxTransformer2DModel`: for single-file checkpoints
(flux1-dev.safetensors, ComfyUI's files) and LoRAs in kohya's / BFL's layout.

diffusers' own converters (`convert_flux_transformer_checkpoint_to_diffusers`, `_convert_kohya_flux_lora_to_diffusers`)
do these renames but hard-code Flux.1's full-size widths (inner 3072; linear1 split 3 x 3072 + 12288) and block
counts (19 / 38): a Flux of any other size (pruned, distilled, the tests' tiny one) would not convert. Here a fused
projection is split by the widths of the diffusers modules it becomes, read from the model itself.
"""

from __future__ import annotations

import re
from typing import Any

import torch

# BFL's module (dotted or kohya's underscores) -> diffusers' modules; a fused projection (qkv, the single blocks'
# linear1) becomes several, in this order.
BFL_BLOCKS = {
    r"double_blocks[._](\d+)[._]": ("transformer_blocks.{}.", {
        "img_attn_proj": ("attn.to_out.0",), "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",), "img_mod_lin": ("norm1.linear",),
        "txt_attn_proj": ("attn.to_add_out",), "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        "txt_mlp_0": ("ff_context.net.0.proj",), "txt_mlp_2": ("ff_context.net.2",),
        "txt_mod_lin": ("norm1_context.linear",)}),
    r"single_blocks[._](\d+)[._]": ("single_transformer_blocks.{}.", {
        "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
        "modulation_lin": ("norm.linear",)}),
    r"": ("", {
        "img_in": ("x_embedder",), "txt_in": ("context_embedder",),
        "time_in_in_layer": ("time_text_embed.timestep_embedder.linear_1",),
        "time_in_out_layer": ("time_text_embed.timestep_embedder.linear_2",),
        "vector_in_in_layer": ("time_text_embed.text_embedder.linear_1",),
        "vector_in_out_layer": ("time_text_embed.text_embedder.linear_2",),
        "guidance_in_in_layer": ("time_text_embed.guidance_embedder.linear_1",),
        "guidance_in_out_layer": ("time_text_embed.guidance_embedder.linear_2",),
        "final_layer_linear": ("proj_out",), "final_layer_adaLN_modulation_1": ("norm_out.linear",)}),
}
# QK-norm scales and the output norm, which are not projections
NORMS = {"img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
         "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
         "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
         "norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def bfl_modules(written: str) -> tuple[str, ...]:
    """diffusers' module names for a Flux module in BFL's naming (dotted or kohya's underscores); () for any other."""
    for block, (template, parts) in BFL_BLOCKS.items():
        found = re.fullmatch(block + r"(.+)", written)
        if found is None:
            continue
        number, part = (found.group(1), found.group(2)) if template else ("", found.group(1))
        targets = parts.get(part.replace(".", "_"))
        if targets:
            return tuple(template.format(number) + t for t in targets)
    return ()


def swaps_halves(written: str) -> bool:
    """Whether BFL's module computes (shift, scale) where diffusers' computes (scale, shift): the final norm's
    modulation, in a checkpoint and in a LoRA's up matrix alike."""
    return written.replace(".", "_").endswith("final_layer_adaLN_modulation_1")


def in_diffusers_order(rows: torch.Tensor) -> torch.Tensor:
    """A (shift, scale) row stack as diffusers' (scale, shift)."""
    shift, scale = rows.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def to_diffusers(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A BFL-layout Flux state dict as `model`'s (a FluxTransformer2DModel of the checkpoint's config, on any
    device) state dict: renamed, fused projections split by the widths of `model`'s modules, the final norm's
    (shift, scale) halves swapped to diffusers' (scale, shift). Keys it does not know are left for the strict load
    to name."""
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        key = next((key[len(p):] for p in PREFIXES if key.startswith(p)), key)
        block = re.match(r"(double|single)_blocks\.(\d+)\.(.+)", key)
        if block and block.group(3) in NORMS:
            prefix = "transformer_blocks" if block.group(1) == "double" else "single_transformer_blocks"
            converted[f"{prefix}.{block.group(2)}.{NORMS[block.group(3)]}"] = tensor
            continue
        module, _, leaf = key.rpartition(".")
        targets = bfl_modules(module)
        if not targets:
            converted[key] = tensor
            continue
        if swaps_halves(module):
            tensor = in_diffusers_order(tensor)
        widths = [model.get_submodule(t).weight.shape[0] for t in targets]
        for target, part in zip(targets, torch.split(tensor, widths), strict=True):
            converted[f"{target}.{leaf}"] = part.contiguous()
    return converted


def is_flux_checkpoint(keys: Any) -> bool:
    """Whether tensor names are a Flux transformer's in BFL's layout."""
    return any(re.match(r"(model\.diffusion_model\.|diffusion_model\.)?double_blocks\.0\.img_attn", k) for k in keys)
