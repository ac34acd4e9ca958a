"""What cached results depend on besides their inputs: library versions and diffship's own code."""

from __future__ import annotations

import hashlib
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from diffship import __version__


def library_versions() -> dict[str, str]:
    """Versions of everything an artifact's bytes or numbers depend on."""
    import diffusers  # start-up time: diffusers
    import onnx  # start-up time: onnx
    import onnxruntime  # start-up time: onnxruntime
    import torch  # start-up time: torch
    import transformers  # start-up time: transformers

    return {"python": platform.python_version(), "diffship": __version__, "diffship_source": source_fingerprint(),
            "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__, **target_library_versions()}


def target_library_versions() -> dict[str, str]:
    """Versions of the optional target libraries that are installed (read from their metadata, not imported)."""
    found = {}
    for name in ("openvino", "nncf", "coremltools", "tensorrt", "nvidia-modelopt"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def source_fingerprint() -> str:
    """Hash of diffship's own code, so a changed exporter or validator never reuses results cached by the old one."""
    package = Path(__file__).parents[1]  # the diffship package
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]
