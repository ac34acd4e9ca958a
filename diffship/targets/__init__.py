"""Targets: one module per backend, registered in `TARGETS`; `targets/base.py` is the protocol each follows
(`compile(source, precision, options, dest, context) -> Path`, `load(artifact, options, precision) -> Runner`, and
optional hooks with defaults)."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffship.errors import DiffshipError
from diffship.targets.base import Target

if TYPE_CHECKING:
    from diffship.models.components import ComponentSpec
    from diffship.targets.accuracy_gate import Gate
    from diffship.targets.calibration import CalibrationData


@dataclass(frozen=True)
class TargetInfo:
    """Where a target lives, the package it needs, and the extra that installs that package."""

    module: str
    requires: str
    extra: str | None


# A new target is one module plus one line here.
TARGETS = {
    "onnxruntime": TargetInfo("diffship.targets.onnxruntime", "onnxruntime", None),
    "openvino": TargetInfo("diffship.targets.openvino", "openvino", "openvino"),
    "tensorrt": TargetInfo("diffship.targets.tensorrt", "tensorrt", "tensorrt"),
    "coreml": TargetInfo("diffship.targets.coreml", "coremltools", "coreml"),
    "torch": TargetInfo("diffship.targets.pytorch", "torch", None),
    "web": TargetInfo("diffship.targets.web", "onnxruntime", None),
    "mobile": TargetInfo("diffship.targets.mobile", "onnxruntime", None),
}


@dataclass(frozen=True)
class Case:
    """One parity input: batch size and image resolution in pixels (validation's cases; a target with pinned shapes
    says which it can take)."""

    batch: int
    height: int
    width: int


@dataclass(frozen=True)
class CompileContext:
    """What a compile may need beyond the ONNX file: the component, fixed shapes, calibration data (lazily), and
    the smallest built resolution (height, width) for a quick probe run. Engines with shape
    profiles also take the recipe's ranges, the resolution to tune for and whether the UNet runs guided; targets
    that quantize from PyTorch (TensorRT INT8) take the model folder the ONNX came from."""

    spec: ComponentSpec
    static_shapes: dict[str, tuple[int, ...]] | None = None
    calibration: Callable[[], CalibrationData] | None = None
    probe_size: tuple[int, int] = (64, 64)
    shape_ranges: dict[str, list[int]] | None = None
    opt_size: tuple[int, int] | None = None
    guided: bool = False
    model_folder: Path | None = None
    allow_pickle: bool = False
    opset: int = 17
    gate: Gate | None = None  # what an accuracy-aware precision (int8-auto) must meet on real steps
    say: Callable[[str], None] | None = None  # progress lines of long compiles


def calibration_inputs(context: CompileContext, precision: str) -> list[dict[str, Any]]:
    """The component's captured calibration inputs, or an error saying what is missing (shared by every target
    that calibrates)."""
    name = context.spec.name
    if context.calibration is None:
        raise DiffshipError(f"{precision} needs calibration data for {name}.")
    calls = context.calibration().inputs.get(name)
    if not calls:
        raise DiffshipError(f"No calibration inputs were captured for {name}: set [calibration] prompts.")
    return calls


def check_available(name: str) -> TargetInfo:
    """Fail with what to install when target `name` is unknown, its package is missing, or it is not built yet."""
    if name not in TARGETS:
        raise DiffshipError(f"Unknown target {name!r}; available: {', '.join(TARGETS)}.")
    info = TARGETS[name]
    if importlib.util.find_spec(info.requires) is None:
        raise DiffshipError(
            f"Target {name!r} needs the {info.requires!r} package, which is not installed: "
            f"pip install 'diffship[{info.extra}]'."
        )
    if importlib.util.find_spec(info.module) is None:
        raise DiffshipError(f"Target {name!r} is planned but not implemented in this version of diffship.")
    return info


def get_target(name: str, installed: bool = True) -> Target:
    """Target `name` (its module imported on first use: backends are optional extras), with the protocol's defaults
    for the hooks it does not define (`targets/base.py`). With `installed` false its package need not be here: a
    farm's driver plans stages that other nodes run."""
    if installed:
        return Target(name, importlib.import_module(check_available(name).module))
    if name not in TARGETS:
        raise DiffshipError(f"Unknown target {name!r}; available: {', '.join(TARGETS)}.")
    return Target(name, importlib.import_module(TARGETS[name].module))
