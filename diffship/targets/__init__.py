"""Targets: one module per backend, each with `compile(source, precision, options) -> Path` and `load(artifact) -> Runner`."""

from __future__ import annotations

import importlib
from types import ModuleType

from diffship.errors import DiffshipError

# A new target is one module plus one line here.
TARGETS = {
    "onnxruntime": "diffship.targets.onnxruntime",
}


def get_target(name: str) -> ModuleType:
    """The module implementing target `name`, imported on first use (backends are optional extras)."""
    if name not in TARGETS:
        raise DiffshipError(f"Unknown target {name!r}; available: {', '.join(TARGETS)}.")
    return importlib.import_module(TARGETS[name])
