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

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


# command-line name -> field
NAMES = {"deep-cache": "deep_cache", "guidance": "guidance", "vae-decoder": "vae_decoder"}


class AccelerationGrid(_Strict):
    """What a build measures (the recipe's `[accelerations]`): `deep_cache` and `guidance` each one setting or a list
    of them (`deep_cache = [{ interval = 2 }, { interval = 3 }]`), so one build draws the speed / quality frontier
    across them. Every setting runs alone, and each pairing of one setting per acceleration runs all together."""

    deep_cache: tuple[DeepCache, ...] = ()
    guidance: tuple[GuidanceTruncation, ...] = ()
    vae_decoder: Path | None = None

    @field_validator("deep_cache", "guidance", mode="before")
    @classmethod
    def _one_or_several(cls, value: Any) -> Any:
        return [] if value is None else value if isinstance(value, list | tuple) else [value]

    @model_validator(mode="after")
    def _one_depth(self) -> AccelerationGrid:
        # each depth is two more exported graphs, calibrated on its own features: one per build
        if len({c.depth for c in self.deep_cache}) > 1:
            raise ValueError("deep_cache settings must share one depth (its two graphs are built once); "
                             "list several intervals instead")
        return self

    @property
    def active(self) -> bool:
        return bool(self.deep_cache or self.guidance or self.vae_decoder)

    @property
    def cache_depth(self) -> int | None:
        """The depth deep-feature caching's graphs are built for (None: not asked for)."""
        return self.deep_cache[0].depth if self.deep_cache else None

    @property
    def label(self) -> str:
        """Every combination's label but the model's own loop, `; `-separated (`none` when nothing is asked)."""
        return "; ".join(c.label for c in self.combinations()[1:]) or "none"

    def combinations(self) -> list[Accelerations]:
        """What a build measures for each set: the model's own loop, each setting alone (in declaration order), and
        every pairing of one setting per acceleration where more than one acceleration is asked for."""
        options = [[(name, v) for v in values] for name, values in (
            ("deep_cache", self.deep_cache), ("guidance", self.guidance),
            ("vae_decoder", (self.vae_decoder,) if self.vae_decoder is not None else ())) if values]
        alone = [Accelerations(**{name: value}) for choices in options for name, value in choices]
        together = [Accelerations(**dict(pick)) for pick in itertools.product(*options)] if len(options) > 1 else []
        return [Accelerations(), *alone, *together]

    def only(self, what: str) -> Accelerations:
        """The one combination asked for (`what` names the command refusing several)."""
        if len(self.deep_cache) > 1 or len(self.guidance) > 1:
            raise DiffshipError(f"{what} draws with one combination of accelerations: name each one once.")
        return self.combinations()[-1]


def parse_accelerations(values: list[str]) -> AccelerationGrid:
    """`--accelerate deep-cache:interval=3,depth=1 --accelerate guidance:until=0.5` (or `none`) as what to measure;
    `deep-cache` and `guidance` may repeat, each repeat one more setting."""
    fields: dict[str, Any] = {}
    for value in values:
        name, settings = named_settings(value, "--accelerate")
        if name == "none" and not settings:
            continue
        if name not in NAMES:
            raise DiffshipError(f"--accelerate {value!r}: unknown acceleration {name!r}; choose from "
                                f"{', '.join(NAMES)} (or none).")
        if name == "vae-decoder":  # a folder, not settings
            if NAMES[name] in fields:
                raise DiffshipError(f"--accelerate names {name} twice.")
            if set(settings) != {"path"}:
                raise DiffshipError(f"--accelerate {value!r}: give the decoder's folder as vae-decoder:path=DIR.")
            fields[NAMES[name]] = str(settings["path"])
            continue
        fields.setdefault(NAMES[name], []).append(settings)
    try:
        return AccelerationGrid.model_validate(fields)
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
    return [Step(guidance and i < guided_steps, denoiser_graph(i, a.deep_cache)) for i in range(steps)]


def diffusers_loop_refuses(accelerations: Accelerations | AccelerationGrid) -> str | None:
    """What of `accelerations` runs only in diffship's own loop (SD3 and Flux run diffusers', where a stand-in of the
    transformer can pick block caching's graphs each call but cannot drop a guidance half or swap the decoder)."""
    only_ours = [flag for flag in ("guidance", "vae-decoder") if getattr(accelerations, NAMES[flag])]
    return f"{' and '.join(only_ours)} run{'s' if len(only_ours) == 1 else ''} only" if only_ours else None


def denoiser_graph(i: int, deep_cache: DeepCache | None) -> Literal["denoiser", "caching", "shallow"]:
    """Which denoiser graph step `i` runs: the denoiser's own, or deep-feature caching's on its schedule."""
    if deep_cache is None:
        return "denoiser"
    return "caching" if i % deep_cache.interval == 0 else "shallow"
