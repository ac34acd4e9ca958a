"""Stable Diffusion 1.x and 2.x: one CLIP text encoder whose last hidden state conditions the UNet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffship.models.families.base import Family, component_config
from diffship.models.families.unet import UNET

DECLARED_BY = frozenset({"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "OnnxStableDiffusionPipeline",
                         "ORTStableDiffusionPipeline", "OVStableDiffusionPipeline",
                         "StableDiffusionInpaintPipeline", "OVStableDiffusionInpaintPipeline"})
PIPELINES = {"text2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
             "inpaint": "StableDiffusionInpaintPipeline"}


def _is_sd2(folder: Path, index: dict[str, Any]) -> bool:
    # SD 2.x replaced CLIP ViT-L (quick_gelu) with OpenCLIP ViT-H (gelu) and linear projections in the UNet.
    if index.get("_class_name") not in DECLARED_BY:
        return False
    text = component_config(folder, "text_encoder")
    return text.get("hidden_act") == "gelu" or bool(component_config(folder, UNET.component).get("use_linear_projection"))


CONTROLNET = "StableDiffusionControlNetPipeline"
SD2 = Family("sd2", "Stable Diffusion 2.x", "SD 2.x", ("text_encoder",), ("tokenizer",), PIPELINES, DECLARED_BY,
             matches=_is_sd2, denoiser=UNET, tokenizer_classes=("CLIPTokenizer",),
             controlnet_pipeline=CONTROLNET)
SD1 = Family("sd1", "Stable Diffusion 1.x", "SD 1.x", ("text_encoder",), ("tokenizer",), PIPELINES, DECLARED_BY,
             matches=lambda folder, index: index.get("_class_name") in DECLARED_BY, denoiser=UNET,
             tokenizer_classes=("CLIPTokenizer",), controlnet_pipeline=CONTROLNET)
