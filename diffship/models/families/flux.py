"""Flux.1 (dev and schnell): a transformer of double- and single-stream blocks over 2x2-packed 16-channel latents
with RoPE position ids, conditioned on CLIP-L's pooled output and T5's states; dev embeds the guidance scale as an
input (no second batch half), schnell has none. Flow-matching Euler with a shift that grows with the image's tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffship.models.families.base import Family
from diffship.models.families.sd3 import transformer_class
from diffship.models.families.transformer import FLUX_TRANSFORMER

PIPELINES = {"text2img": "FluxPipeline", "img2img": "FluxImg2ImgPipeline", "inpaint": "FluxInpaintPipeline"}
DECLARED_BY = frozenset({*PIPELINES.values(), "OVFluxPipeline", "ORTFluxPipeline"})


def _is_flux(folder: Path, index: dict[str, Any]) -> bool:
    return index.get("_class_name") in DECLARED_BY or transformer_class(folder) == "FluxTransformer2DModel"


FLUX = Family(
    "flux", "Flux.1", "Flux", ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"), PIPELINES,
    DECLARED_BY, matches=_is_flux, denoiser=FLUX_TRANSFORMER, tokenizer_classes=("CLIPTokenizer", "T5TokenizerFast"),
    t5_tokens=512, clip_tokens=0, loop="diffusers",
    checkpoint_types=("flux-dev", "flux-schnell", "flux-fill", "flux-depth"),
    checkpoint_marks=(".double_blocks.0.img_attn.",))
