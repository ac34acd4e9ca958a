"""Torch-side compression passes (pruning, distillation, quantization, precision) run before export."""

from __future__ import annotations

import importlib
from types import ModuleType

from diffship.errors import DiffshipError


def import_extra(module: str, extra: str = "compress") -> ModuleType:
    """Import an optional library, or say which diffship extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DiffshipError(f"This step needs {module.split('.')[0]}, which is not installed: "
                            f"pip install 'diffship[{extra}]'.") from exc
