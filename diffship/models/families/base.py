"""What a pipeline family declares, and the folder readers every family's detection uses.

A family is data: its text encoders and tokenizers, the diffusers pipeline that is its baseline per task (and the
`_class_name` its deployed folders declare), the pipeline classes that may name it in model_index.json, and how its
denoiser is conditioned. Runtime, baseline, capture, validation and targets read these fields; none names a family.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from diffship.errors import DiffshipError
from diffship.store.artifacts import read_json

Role = Literal["text_encoder", "denoiser", "vae_encoder", "vae_decoder", "controlnet", "controlled_denoiser"]
Task = Literal["text2img", "img2img", "inpaint", "controlnet"]


@dataclass(frozen=True)
class Family:
    """One pipeline kind (SD 1.x, SD 2.x, SDXL base, SDXL refiner), declared once."""

    name: str  # the key in cache keys and manifests: "sd1", "sd2", "sdxl", "sdxl-refiner"
    title: str
    short: str  # for messages: "SD 1.x", "SDXL"
    text_encoders: tuple[str, ...]  # pipeline folders, in the order their hidden states are concatenated
    tokenizers: tuple[str, ...]  # one per text encoder
    pipelines: Mapping[str, str]  # task -> the diffusers pipeline class that is the baseline for it
    declared_by: frozenset[str]  # model_index.json `_class_name`s that may hold this kind
    matches: Callable[[Path, dict[str, Any]], bool] = field(repr=False)  # (folder, model_index) -> is this kind
    hidden_state: str = "last_hidden_state"  # the text encoder output the denoiser cross-attends to
    pooled_from: str | None = None  # the text encoder whose projected pooled output is the denoiser's text_embeds
    time_ids: int = 0  # SDXL micro-conditioning values per sample (6: sizes and crop; 5: the refiner's aesthetics)
    vae_overflows_fp16: bool = False  # its VAE's activations exceed FP16's range (SDXL): kept FP32 under "auto"
    controlnet_pipeline: str | None = None  # the diffusers pipeline that runs its ControlNets (the "controlnet" task)

    @property
    def aesthetic_conditioning(self) -> bool:
        """Whether the time ids carry an aesthetic score (the SDXL refiner's 5) instead of a target size."""
        return self.time_ids == 5

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.pipelines)

    def tasks_for(self, denoiser_channels: int, latent_channels: int) -> tuple[str, ...]:
        """What a model of this family can do: an inpainting denoiser (latents + mask + masked-image latents as
        input channels) only inpaints."""
        return ("inpaint",) if denoiser_channels == 2 * latent_channels + 1 else self.tasks

    def time_id_values(self, height: int, width: int, aesthetic_score: float = 6.0) -> list[float]:
        """The time ids diffusers builds for an image of height x width with no crop (original = target size)."""
        if self.time_ids == 6:
            return [height, width, 0, 0, height, width]
        if self.time_ids == 5:
            return [height, width, 0, 0, aesthetic_score]
        return []


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


def has_component(index: dict[str, Any], component: str) -> bool:
    """Whether model_index.json lists `component` with a class (diffusers writes [null, null] for an absent one)."""
    entry = index.get(component)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def prediction_type(folder: Path) -> str:
    """epsilon or v_prediction, from the scheduler config (SD 2.x 768 models predict v)."""
    path = folder / "scheduler" / "scheduler_config.json"
    return read_json(path).get("prediction_type", "epsilon") if path.is_file() else "epsilon"
