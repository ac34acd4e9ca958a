"""Pipeline families (SD 1.x, SD 2.x, SDXL), detected from a diffusers folder's configs alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffship.artifacts import read_json
from diffship.errors import DiffshipError


@dataclass(frozen=True)
class Family:
    """What a pipeline family needs from its folder: its text encoders and how the UNet is conditioned."""

    name: str  # "sd1", "sd2", "sdxl"
    title: str
    text_encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]


SD1 = Family("sd1", "Stable Diffusion 1.x", ("text_encoder",), ("tokenizer",))
SD2 = Family("sd2", "Stable Diffusion 2.x", ("text_encoder",), ("tokenizer",))
SDXL = Family("sdxl", "Stable Diffusion XL", ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"))
FAMILIES = {f.name: f for f in (SD1, SD2, SDXL)}

SD_PIPELINES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "OnnxStableDiffusionPipeline",
                "ORTStableDiffusionPipeline"}
SDXL_PIPELINES = {"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "ORTStableDiffusionXLPipeline"}


def read_model_index(folder: Path) -> dict[str, Any]:
    """The folder's model_index.json, or an error saying this is not a diffusers pipeline folder."""
    if not (folder / "model_index.json").is_file():
        raise DiffshipError(
            f"{folder} is not a diffusers pipeline folder: it has no model_index.json. "
            "Point --model at the folder written by `DiffusionPipeline.save_pretrained` (the one with "
            "model_index.json, unet/, vae/, text_encoder/), or use a built-in name (see `diffship models`)."
        )
    return read_json(folder / "model_index.json")


def component_config(folder: Path, component: str) -> dict[str, Any]:
    """config.json of one component folder, with a clear error if the component is absent."""
    path = folder / component / "config.json"
    if not path.is_file():
        raise DiffshipError(
            f"{folder} is missing the `{component}` component ({component}/config.json not found); "
            "a Stable Diffusion pipeline folder needs it."
        )
    return read_json(path)


def detect_family(folder: Path) -> Family:
    """Tell SD 1.x, SD 2.x and SDXL apart from model_index.json and the component configs."""
    index = read_model_index(folder)
    class_name = index.get("_class_name", "")
    is_xl = class_name in SDXL_PIPELINES or bool(index.get("text_encoder_2"))
    if not is_xl and class_name not in SD_PIPELINES:
        raise DiffshipError(
            f"{folder} holds a `{class_name}`; diffship supports Stable Diffusion 1.x, 2.x and XL pipelines "
            f"({', '.join(sorted(SD_PIPELINES | SDXL_PIPELINES))})."
        )
    for name in ("unet", "vae", *(SDXL.text_encoders if is_xl else SD1.text_encoders)):
        component_config(folder, name)
    unet = component_config(folder, "unet")
    if is_xl:
        if unet.get("addition_embed_type") != "text_time":
            raise DiffshipError(
                f"{folder} looks like SDXL (two text encoders) but its UNet has "
                f"addition_embed_type={unet.get('addition_embed_type')!r}, not 'text_time'."
            )
        return SDXL
    # SD 2.x replaced CLIP ViT-L (quick_gelu) with OpenCLIP ViT-H (gelu) and linear projections in the UNet.
    text = component_config(folder, "text_encoder")
    return SD2 if text.get("hidden_act") == "gelu" or unet.get("use_linear_projection") else SD1


def prediction_type(folder: Path) -> str:
    """epsilon or v_prediction, from the scheduler config (SD 2.x 768 models predict v)."""
    path = folder / "scheduler" / "scheduler_config.json"
    return read_json(path).get("prediction_type", "epsilon") if path.is_file() else "epsilon"
