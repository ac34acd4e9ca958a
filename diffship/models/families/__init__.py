"""Pipeline families as declarations: one module per kind (`sd`, `sdxl`), asked in turn which one a folder holds.

Adding a family is one module declaring a `Family` plus its entry in `FAMILIES`; nothing else names families.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffship.errors import DiffshipError
from diffship.models.families.base import (
    MAX_T5_TOKENS,
    Denoiser,
    Family,
    Role,
    SensitiveLayers,
    Task,
    component_config,
    controlnet_names,
    controlnets_in,
    has_component,
    prediction_type,
    read_model_index,
)
from diffship.models.families.flux import FLUX
from diffship.models.families.sd import SD1, SD2
from diffship.models.families.sd3 import SD3
from diffship.models.families.sdxl import REFINER, SDXL

# Most specific first: the transformers' folders also name a text_encoder_2; a refiner is an SDXL folder without the
# first text encoder; SD 2.x is SD with OpenCLIP.
FAMILIES: dict[str, Family] = {f.name: f for f in (SD3, FLUX, REFINER, SDXL, SD2, SD1)}

__all__ = [
    "FAMILIES",
    "MAX_T5_TOKENS",
    "Denoiser",
    "Family",
    "Role",
    "SensitiveLayers",
    "Task",
    "component_config",
    "component_names",
    "controlnet_names",
    "controlnets_in",
    "denoiser_of",
    "detect_family",
    "family_named",
    "has_component",
    "prediction_type",
    "read_model_index",
    "tasks_of",
]


def component_names() -> tuple[str, ...]:
    """Every name a target option may give a component by: each family's text encoders and denoiser, the VAE's two
    halves, and "denoiser", which names whichever the model has."""
    encoders = sorted({name for f in FAMILIES.values() for name in f.text_encoders})
    denoisers = list(dict.fromkeys(f.denoiser.component for f in FAMILIES.values()))
    return (*encoders, *denoisers, "vae_encoder", "vae_decoder", "denoiser")


def family_named(name: str) -> Family:
    """The family recorded under `name` in a manifest or a built-in declaration."""
    if name not in FAMILIES:
        raise DiffshipError(f"Unknown model family {name!r}; known: {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def denoiser_of(pipe: Any) -> Denoiser:
    """The denoiser a loaded diffusers pipeline runs, from its class (families sharing a class share a denoiser)."""
    name = type(pipe).__name__
    for family in FAMILIES.values():
        if name in (*family.pipelines.values(), family.controlnet_pipeline):
            return family.denoiser
    raise DiffshipError(f"diffship knows no family that runs a {name}.")


def detect_family(folder: Path) -> Family:
    """The family of the diffusers folder, from model_index.json and the component configs alone."""
    index = read_model_index(folder)
    family = next((f for f in FAMILIES.values() if f.matches(folder, index)), None)
    if family is None:
        supported = sorted(set().union(*(f.declared_by for f in FAMILIES.values())))
        raise DiffshipError(f"{folder} holds a `{index.get('_class_name', '')}`; diffship supports Stable Diffusion "
                            f"1.x, 2.x, XL and 3 / 3.5 and Flux.1 pipelines ({', '.join(supported)}).")
    for name in (family.denoiser.component, "vae", *family.encoders_in(folder)):
        if not (folder / name / "config.json").is_file():
            raise DiffshipError(f"{folder} is declared a {family.title} pipeline folder but is missing the `{name}` component "
                                f"({name}/config.json not found), which a {family.short} pipeline needs.")
    return family


def tasks_of(folder: Path) -> tuple[str, ...]:
    """What the model in `folder` can do, its main task first (an inpainting UNet only inpaints; ControlNets beside
    the model add the "controlnet" task: text-to-image conditioned on control images)."""
    family = detect_family(folder)
    tasks = family.tasks_for(family.denoiser.in_channels(family.denoiser_config(folder)),
                             component_config(folder, "vae").get("latent_channels", 4))
    controlled = family.controlnet_pipeline and controlnets_in(folder) and "text2img" in tasks
    return (*tasks, "controlnet") if controlled else tasks
