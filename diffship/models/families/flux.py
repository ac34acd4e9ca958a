"""Flux.1 (dev and schnell): a transformer of double- and single-stream blocks over 2x2-packed 16-channel latents
with RoPE position ids, conditioned on CLIP-L's pooled output and T5's states; dev embeds the guidance scale as an
input (no second batch half), schnell has none. Flow-matching Euler with a shift that grows with the image's tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffship.errors import DiffshipError
from diffship.models.families.base import Family, component_config
from diffship.models.families.transformer import FLUX_TRANSFORMER, transformer_class

PIPELINES = {"text2img": "FluxPipeline", "img2img": "FluxImg2ImgPipeline", "inpaint": "FluxInpaintPipeline"}
DECLARED_BY = frozenset({*PIPELINES.values(), "OVFluxPipeline", "ORTFluxPipeline"})


def _is_flux(folder: Path, index: dict[str, Any]) -> bool:
    if index.get("_class_name") not in DECLARED_BY and transformer_class(folder) != "FluxTransformer2DModel":
        return False
    # dev and schnell take the packed latents alone (16 channels x a 2x2 patch); Fill, Depth and Canny take an
    # image's latents beside them, through pipelines of their own
    if not all((folder / name / "config.json").is_file() for name in (FLUX_TRANSFORMER.component, "vae")):
        return True  # detection then says which component is missing
    channels = component_config(folder, FLUX_TRANSFORMER.component).get("in_channels", 64)
    if channels != 4 * component_config(folder, "vae").get("latent_channels", 16):
        raise DiffshipError(f"{folder} holds a Flux transformer of {channels} input channels: a Flux Fill / Depth / "
                            "Canny model, which conditions on an image through its own pipeline. diffship builds "
                            "Flux.1 dev and schnell (64 input channels) so far.")
    return True


FLUX = Family(
    "flux", "Flux.1", "Flux", ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"), PIPELINES,
    DECLARED_BY, matches=_is_flux, denoiser=FLUX_TRANSFORMER, tokenizer_classes=("CLIPTokenizer", "T5TokenizerFast"),
    t5_tokens=512, clip_tokens=0, loop="diffusers", negative_prompts=False,
    checkpoint_types=("flux-dev", "flux-schnell"),
    checkpoint_marks=(".double_blocks.0.img_attn.",))
