"""Pipeline accelerations: ways to draw an image with less work than the model's full loop, each approximate and each
validated like a precision (its images against the FP32 baseline's, judged by the recipe's quality budget).

- `deep_cache` (DeepCache, Ma et al. 2023): every `interval`-th step runs the whole UNet and keeps its deep features;
  the steps between run only its outer layers on them, down to skip connection `depth` (two exported graphs,
  `families/unet_cache.py`).
- `guidance` truncation: classifier-free guidance for the first `until` fraction of the steps only, then the text
  half alone (batch 1 instead of 2), as diffusers' guidance-interval callbacks do.
- `vae_decoder`: a smaller decoder folder (diffusers' `AutoencoderTiny`, TAESD; or another `AutoencoderKL`), exported and
  validated as the component `tiny_vae_decoder`, decoding the final latents instead of the pipeline's VAE.

Plain data (pydantic, as the recipe is): the recipe's `[accelerations]`, `--accelerate` on the command line, the
manifest's `recommended` and the runtime's per-step plan all read these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from diffship.errors import DiffshipError
from diffship.named_settings import named_settings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeepCache(_Strict):
    """Run the whole denoiser every `interval` steps; between them only its outer layers: conv_in, the down layers
    that make its first `depth` skip connections, the up layers that take them back (1: DeepCache's shallowest)."""

    interval: int = Field(3, ge=2, le=50)
    depth: int = Field(1, ge=1, le=50)


class GuidanceTruncation(_Strict):
    """Classifier-free guidance for the first `until` fraction of the steps (at least the first step)."""

    until: float = Field(0.5, gt=0, lt=1)


class Accelerations(_Strict):
    """One combination of accelerations (none set: the model's own loop)."""

    deep_cache: DeepCache | None = None
    guidance: GuidanceTruncation | None = None
    vae_decoder: Path | None = None

    @property
    def active(self) -> bool:
        return any(getattr(self, name) is not None for name in NAMES.values())

    @property
    def label(self) -> str:
        """How the command line writes it (`deep-cache:interval=3,depth=1+guidance:until=0.5`; `none`)."""
        parts = []
        for flag, name in NAMES.items():
            value = getattr(self, name)
            if value is not None:
                fields = value.model_dump() if isinstance(value, BaseModel) else {"path": value}
                parts.append(f"{flag}:" + ",".join(f"{k}={v}" for k, v in fields.items()))
        return "+".join(parts) or "none"

    def alone(self) -> list[Accelerations]:
        """Each acceleration set here on its own, in declaration order."""
        return [Accelerations(**{name: value}) for name in NAMES.values()
                if (value := getattr(self, name)) is not None]

    def combinations(self) -> list[Accelerations]:
        """What a build measures for each set: the model's own loop, each acceleration alone, and all together."""
        each = self.alone()
        return [Accelerations(), *each, *([self] if len(each) > 1 else [])]


# command-line name -> field
NAMES = {"deep-cache": "deep_cache", "guidance": "guidance", "vae-decoder": "vae_decoder"}


def parse_accelerations(values: list[str]) -> Accelerations:
    """`--accelerate deep-cache:interval=3,depth=1 --accelerate guidance:until=0.5` (or `none`) as Accelerations."""
    fields: dict[str, Any] = {}
    for value in values:
        name, settings = named_settings(value, "--accelerate")
        if name == "none" and not settings:
            continue
        if name not in NAMES:
            raise DiffshipError(f"--accelerate {value!r}: unknown acceleration {name!r}; choose from "
                                f"{', '.join(NAMES)} (or none).")
        if NAMES[name] in fields:
            raise DiffshipError(f"--accelerate names {name} twice.")
        if name == "vae-decoder":  # a folder, not settings
            if set(settings) != {"path"}:
                raise DiffshipError(f"--accelerate {value!r}: give the decoder's folder as vae-decoder:path=DIR.")
            fields[NAMES[name]] = str(settings["path"])
            continue
        fields[NAMES[name]] = settings
    try:
        return Accelerations.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise DiffshipError(f"--accelerate: {problems}") from None


@dataclass(frozen=True)
class Step:
    """What one denoising step runs: both guidance halves or the text half alone, and which denoiser graph."""

    guided: bool
    graph: Literal["denoiser", "caching", "shallow"]


def step_plan(steps: int, accelerations: Accelerations | None, guidance: bool) -> list[Step]:
    """The denoising loop's plan under `accelerations`: a shallow step always follows a caching one of the same run."""
    a = accelerations or Accelerations()
    guided_steps = steps if not guidance else (
        max(1, math.ceil(a.guidance.until * steps)) if a.guidance else steps)
    plan = []
    for i in range(steps):
        graph: Literal["denoiser", "caching", "shallow"] = "denoiser"
        if a.deep_cache is not None:
            graph = "caching" if i % a.deep_cache.interval == 0 else "shallow"
        plan.append(Step(guidance and i < guided_steps, graph))
    return plan
