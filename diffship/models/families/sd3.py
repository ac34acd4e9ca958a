"""Stable Diffusion 3 and 3.5: an MMDiT transformer over 16-channel latents, conditioned on two CLIPs (penultimate
states and projected pooled outputs, both) and T5, sampled by flow-matching Euler.

A folder may leave T5 out (`text_encoder_3` [null, null] in model_index.json), as users do for memory; diffusers
then feeds zeros in its place, and so does the deployed pipeline, which is diffusers' own over the artifacts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffship.models.families.base import Family
from diffship.models.families.transformer import SD3_TRANSFORMER, transformer_class

PIPELINES = {"text2img": "StableDiffusion3Pipeline", "img2img": "StableDiffusion3Img2ImgPipeline",
             "inpaint": "StableDiffusion3InpaintPipeline"}
DECLARED_BY = frozenset({*PIPELINES.values(), "OVStableDiffusion3Pipeline", "ORTStableDiffusion3Pipeline"})


def _is_sd3(folder: Path, index: dict[str, Any]) -> bool:
    return index.get("_class_name") in DECLARED_BY or transformer_class(folder) == "SD3Transformer2DModel"


SD3 = Family(
    "sd3", "Stable Diffusion 3 / 3.5", "SD3", ("text_encoder", "text_encoder_2", "text_encoder_3"),
    ("tokenizer", "tokenizer_2", "tokenizer_3"), PIPELINES, DECLARED_BY, matches=_is_sd3, denoiser=SD3_TRANSFORMER,
    tokenizer_classes=("CLIPTokenizer", "CLIPTokenizer", "T5TokenizerFast"),
    hidden_state="penultimate_hidden_state", projected=("text_encoder", "text_encoder_2"),
    optional_encoders=("text_encoder_3",), t5_tokens=256, loop="diffusers",
    checkpoint_types=("sd3", "sd35_large", "sd35_medium"), checkpoint_marks=(".joint_blocks.0.x_block.",))
