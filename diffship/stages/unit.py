"""One stage of a build picked out to run alone: what a farm task runs. The stages it reads come from the cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Stage = Literal["compress", "export", "calibrate", "compile", "validate"]


@dataclass(frozen=True)
class Unit:
    """A stage and what it is narrowed to: a component (export, compile), a target and precision (compile, validate)."""

    stage: Stage
    component: str | None = None
    target: str | None = None
    precision: str | None = None

    def label(self) -> str:
        """`compile openvino-int8-hybrid unet`, `export unet`, `validate onnxruntime-fp32`, `calibrate`."""
        parts = [self.stage, f"{self.target}-{self.precision}" if self.target else None, self.component]
        return " ".join(p for p in parts if p)
