"""Stable Diffusion XL, base and refiner: penultimate hidden states, a pooled projected embedding and time ids.

The base concatenates CLIP ViT-L's and OpenCLIP ViT-bigG's penultimate states; the refiner has only the second
encoder, and its time ids carry an aesthetic score instead of the target size (`requires_aesthetics_score`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffship.errors import DiffshipError
from diffship.models.families.base import Family, component_config, has_component
from diffship.models.families.unet import UNET

DECLARED_BY = frozenset({"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
                         "ORTStableDiffusionXLPipeline", "OVStableDiffusionXLPipeline"})


def _xl_unet(folder: Path) -> dict[str, Any]:
    unet = component_config(folder, UNET.component)
    if unet.get("addition_embed_type") != "text_time":
        raise DiffshipError(f"{folder} looks like SDXL (model_index names its text_encoder_2) but its UNet has "
                            f"addition_embed_type={unet.get('addition_embed_type')!r}, not 'text_time'.")
    return unet


def _is_xl(index: dict[str, Any]) -> bool:
    return index.get("_class_name") in DECLARED_BY or has_component(index, "text_encoder_2")


def _is_refiner(folder: Path, index: dict[str, Any]) -> bool:
    if not _is_xl(index) or has_component(index, "text_encoder"):
        return False
    _xl_unet(folder)
    return True


def _is_base(folder: Path, index: dict[str, Any]) -> bool:
    if not _is_xl(index):
        return False
    _xl_unet(folder)
    return True


REFINER = Family(
    "sdxl-refiner", "Stable Diffusion XL refiner", "SDXL refiner", ("text_encoder_2",), ("tokenizer_2",),
    {"img2img": "StableDiffusionXLImg2ImgPipeline", "inpaint": "StableDiffusionXLInpaintPipeline"},
    DECLARED_BY, matches=_is_refiner, denoiser=UNET, tokenizer_classes=("CLIPTokenizer",),
    hidden_state="penultimate_hidden_state",
    pooled_from="text_encoder_2", time_ids=5, vae_overflows_fp16=True)
SDXL = Family(
    "sdxl", "Stable Diffusion XL", "SDXL", ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"),
    {"text2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline",
     "inpaint": "StableDiffusionXLInpaintPipeline"},
    DECLARED_BY, matches=_is_base, denoiser=UNET, tokenizer_classes=("CLIPTokenizer", "CLIPTokenizer"),
    hidden_state="penultimate_hidden_state",
    pooled_from="text_encoder_2", time_ids=6, vae_overflows_fp16=True,
    controlnet_pipeline="StableDiffusionXLControlNetPipeline")
