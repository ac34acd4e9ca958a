"""Write a diffusers FluxTransformer2DModel as a BFL-layout single file (flux1-dev.safetensors' tensor names), for
the single-file tests: the files users download are in this layout and the project cannot download one.

Written from diffusers' own converter read backwards (`convert_flux_transformer_checkpoint_to_diffusers`), key by
key, not from diffship's table: a test converts it back with diffship and, at Flux.1's widths, with diffusers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "ff.net.0.proj": "img_mlp.0",
          "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
          "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
          "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
          "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2", "attn.norm_q": "norm.query_norm",
          "attn.norm_k": "norm.key_norm"}
TOP = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
       "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
       "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
       "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
       "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
       "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
       "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear",
       "norm_out.linear": "final_layer.adaLN_modulation.1"}


def bfl_state(model: torch.nn.Module, prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """`model`'s weights under BFL's names: fused qkv / linear1, `.scale` for the QK norms, the final norm's
    halves in BFL's (shift, scale) order."""
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    config = model.config
    for i in range(config.num_layers):
        d = f"transformer_blocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"double_blocks.{i}.img_attn.qkv.{leaf}"] = torch.cat([sd.pop(f"{d}attn.to_{x}.{leaf}") for x in "qkv"])
            out[f"double_blocks.{i}.txt_attn.qkv.{leaf}"] = torch.cat(
                [sd.pop(f"{d}attn.add_{x}_proj.{leaf}") for x in "qkv"])
        for ours, theirs in DOUBLE.items():
            for leaf in ("weight", "bias"):
                if f"{d}{ours}.{leaf}" in sd:
                    out[f"double_blocks.{i}.{theirs}.{'scale' if 'norm' in ours and 'norm1' not in ours else leaf}"] = \
                        sd.pop(f"{d}{ours}.{leaf}")
    for i in range(config.num_single_layers):
        s = f"single_transformer_blocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"single_blocks.{i}.linear1.{leaf}"] = torch.cat(
                [sd.pop(f"{s}attn.to_{x}.{leaf}") for x in "qkv"] + [sd.pop(f"{s}proj_mlp.{leaf}")])
        for ours, theirs in SINGLE.items():
            for leaf in ("weight", "bias"):
                if f"{s}{ours}.{leaf}" in sd:
                    out[f"single_blocks.{i}.{theirs}.{'scale' if 'attn.norm' in ours else leaf}"] = \
                        sd.pop(f"{s}{ours}.{leaf}")
    for ours, theirs in TOP.items():
        for leaf in ("weight", "bias"):
            if f"{ours}.{leaf}" in sd:
                tensor = sd.pop(f"{ours}.{leaf}")
                if ours == "norm_out.linear":
                    scale, shift = tensor.chunk(2, dim=0)
                    tensor = torch.cat([shift, scale], dim=0)
                out[f"{theirs}.{leaf}"] = tensor
    assert not sd, f"diffusers weights left unwritten: {sorted(sd)[:5]}"
    return {prefix + k: v.contiguous() for k, v in out.items()}


def write_bfl_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    save_file(bfl_state(model), str(path))
    return path


SD3_TOP = {"pos_embed.proj": "x_embedder.proj", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2", "context_embedder": "context_embedder",
           "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
           "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear",
           "norm_out.linear": "final_layer.adaLN_modulation.1"}
SD3_BLOCK = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
             "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
             "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
             "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
             "attn2.to_out.0": "x_block.attn2.proj", "norm1.linear": "x_block.adaLN_modulation.1",
             "norm1_context.linear": "context_block.adaLN_modulation.1", "ff.net.0.proj": "x_block.mlp.fc1",
             "ff.net.2": "x_block.mlp.fc2", "ff_context.net.0.proj": "context_block.mlp.fc1",
             "ff_context.net.2": "context_block.mlp.fc2"}


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def sd3_state(model: torch.nn.Module, prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """An SD3Transformer2DModel's weights under SD3's original (MMDiT) names, diffusers'
    `convert_sd3_transformer_checkpoint_to_diffusers` read backwards: fused qkv, `ln_q` / `ln_k`, the last block's
    context norm and the final norm in (shift, scale) order."""
    sd = model.state_dict()
    last = model.config.num_layers - 1
    out = {"pos_embed": sd.pop("pos_embed.pos_embed")}
    for i in range(model.config.num_layers):
        d = f"transformer_blocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"joint_blocks.{i}.x_block.attn.qkv.{leaf}"] = torch.cat([sd.pop(f"{d}attn.to_{x}.{leaf}") for x in "qkv"])
            out[f"joint_blocks.{i}.context_block.attn.qkv.{leaf}"] = torch.cat(
                [sd.pop(f"{d}attn.add_{x}_proj.{leaf}") for x in "qkv"])
            if f"{d}attn2.to_q.{leaf}" in sd:
                out[f"joint_blocks.{i}.x_block.attn2.qkv.{leaf}"] = torch.cat(
                    [sd.pop(f"{d}attn2.to_{x}.{leaf}") for x in "qkv"])
        for ours, theirs in SD3_BLOCK.items():
            for leaf in ("weight", "bias"):
                if f"{d}{ours}.{leaf}" in sd:
                    tensor = sd.pop(f"{d}{ours}.{leaf}")
                    out[f"joint_blocks.{i}.{theirs}.{leaf}"] = _swap_halves(tensor) if (
                        i == last and ours == "norm1_context.linear") else tensor
    for ours, theirs in SD3_TOP.items():
        for leaf in ("weight", "bias"):
            tensor = sd.pop(f"{ours}.{leaf}")
            out[f"{theirs}.{leaf}"] = _swap_halves(tensor) if ours == "norm_out.linear" else tensor
    assert not sd, f"diffusers weights left unwritten: {sorted(sd)[:5]}"
    return {prefix + k: v.contiguous() for k, v in out.items()}
