"""LoRA files the tests make themselves, in the layouts found in the wild, with non-zero up (B) matrices: a LoRA
fresh from training starts with B = 0 and would change nothing, proving nothing."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from diffship.models.loading import load_component

UNET_TARGETS = ("attn1.to_q", "attn1.to_v", "attn2.to_k", "attn2.to_out.0", "ff.net.2")
TEXT_TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.fc1")


def _pairs(folder: Path, component: str, targets: tuple[str, ...], conv: bool, rank: int, seed: int):
    """(module name, down, up) for the targeted modules of `component`, seeded."""
    model = load_component(folder, component)
    g = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(targets):
            yield name, torch.randn(rank, module.in_features, generator=g) * 0.2, \
                torch.randn(module.out_features, rank, generator=g) * 0.2
        elif conv and isinstance(module, torch.nn.Conv2d) and name.endswith("resnets.0.conv1"):  # LoCon, 3x3 down
            yield name, torch.randn(rank, module.in_channels, 3, 3, generator=g) * 0.05, \
                torch.randn(module.out_channels, rank, 1, 1, generator=g) * 0.2


def kohya_lora(folder: Path, out: Path, rank: int = 4, alpha: float = 2.0, seed: int = 0, conv: bool = True) -> Path:
    """kohya layout: lora_unet_<module with underscores>.lora_down / lora_up / alpha, lora_te_ for the text encoder
    under transformers 4's names (`text_model_encoder_...`)."""
    tensors = {}
    for component, prefix, targets in (("unet", "lora_unet_", UNET_TARGETS), ("text_encoder", "lora_te_", TEXT_TARGETS)):
        for name, down, up in _pairs(folder, component, targets, conv and component == "unet", rank, seed):
            written = ("text_model." + name if component == "text_encoder" else name).replace(".", "_")
            tensors |= {f"{prefix}{written}.lora_down.weight": down, f"{prefix}{written}.lora_up.weight": up,
                        f"{prefix}{written}.alpha": torch.tensor(alpha)}
    save_file(tensors, str(out))
    return out


def peft_lora(folder: Path, out: Path, rank: int = 4, seed: int = 1) -> Path:
    """diffusers / PEFT layout: unet.<module>.lora_A.weight / lora_B.weight, text_encoder.text_model.<module>...
    (no alpha: scale 1 per rank)."""
    tensors = {}
    for component, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS)):
        for name, down, up in _pairs(folder, component, targets, False, rank, seed):
            written = f"text_encoder.text_model.{name}" if component == "text_encoder" else f"unet.{name}"
            tensors |= {f"{written}.lora_A.weight": down, f"{written}.lora_B.weight": up}
    save_file(tensors, str(out))
    return out


def flux_kohya_lora(folder: Path, out: Path, rank: int = 4, alpha: float = 2.0, seed: int = 2,
                    diffusers_reads: bool = False, magnitude: float = 0.2) -> Path:
    """Flux in kohya's sd-scripts layout, over BFL's original blocks: fused qkv (double blocks) and linear1 (single
    blocks: q, k, v and the MLP's input) projections that diffusers splits into its own modules, and the final norm's
    modulation in BFL's (shift, scale) order. `diffusers_reads`: only what diffusers' converter reads as kohya meant
    (it hard-codes Flux.1's linear1 widths, and its final-layer keys lack the `transformer.` prefix, so it drops
    them)."""
    import json

    config = json.loads((folder / "transformer" / "config.json").read_text())
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = 4 * dim  # Flux's mlp_ratio
    g = torch.Generator().manual_seed(seed)
    shapes = {}
    for i in range(config["num_layers"]):
        shapes |= {f"double_blocks_{i}_img_attn_qkv": (dim, 3 * dim), f"double_blocks_{i}_txt_attn_proj": (dim, dim),
                   f"double_blocks_{i}_img_mlp_0": (dim, mlp)}
    for i in range(config["num_single_layers"]):
        shapes |= {f"single_blocks_{i}_linear2": (dim + mlp, dim)}
        if not diffusers_reads:
            shapes[f"single_blocks_{i}_linear1"] = (dim, 3 * dim + mlp)
    if not diffusers_reads:
        shapes["final_layer_adaLN_modulation_1"] = (dim, 2 * dim)
    tensors = {}
    for name, (inputs, outputs) in shapes.items():
        tensors |= {f"lora_unet_{name}.lora_down.weight": torch.randn(rank, inputs, generator=g) * magnitude,
                    f"lora_unet_{name}.lora_up.weight": torch.randn(outputs, rank, generator=g) * magnitude,
                    f"lora_unet_{name}.alpha": torch.tensor(alpha)}
    save_file(tensors, str(out))
    return out


def transformer_peft_lora(folder: Path, out: Path, rank: int = 4, seed: int = 3) -> Path:
    """diffusers / PEFT layout for a transformer denoiser (SD3, Flux): transformer.<module>.lora_A / lora_B."""
    tensors = {}
    for name, down, up in _pairs(folder, "transformer", ("attn.to_q", "attn.to_v", "attn.add_k_proj", "ff.net.2"),
                                 False, rank, seed):
        tensors |= {f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up}
    save_file(tensors, str(out))
    return out
