"""Calibration data for the INT8 paths: the components' real inputs, captured from the PyTorch pipeline
(`validation/capture.py`).

The UNet is calibrated on what it actually sees: its inputs at every denoising step of real
generations for the recipe's calibration prompts (under classifier-free guidance, so batch 2), not on
random tensors. The same runs give the text encoders' token ids, the VAE decoder's latents and the
VAE encoder's images, for the modes that quantize those too. Shared by every INT8 target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffship.errors import DiffshipError

MIN_SAMPLES = 4  # fewer UNet calls than this cover too few denoising steps to set ranges for every layer


@dataclass
class CalibrationData:
    """Named input arrays per component, one dict per captured call, plus how they were made."""

    inputs: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        """Store as one .npz (keys `component/index/input`)."""
        arrays = {f"{c}/{i}/{name}": a for c, calls in self.inputs.items() for i, call in enumerate(calls)
                  for name, a in call.items()}
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: Path, info: dict[str, Any]) -> CalibrationData:
        data = cls(info=info)
        with np.load(path) as arrays:
            for key in sorted(arrays.files, key=lambda k: (k.split("/")[0], int(k.split("/")[1]))):
                component, index, name = key.split("/")
                calls = data.inputs.setdefault(component, [])
                while len(calls) <= int(index):
                    calls.append({})
                calls[int(index)][name] = arrays[key]
        return data


@dataclass(frozen=True)
class CalibrationFile:
    """Captured calibration inputs named by their file in the cache: what a compile in a child process loads."""

    path: Path
    info: dict[str, Any]

    def __call__(self) -> CalibrationData:
        return CalibrationData.load(self.path, self.info)


def check_calibration(prompts: list[str], samples: int) -> None:
    """Refuse calibration settings too small to calibrate with."""
    if not prompts:
        raise DiffshipError("INT8 needs calibration prompts: set [calibration] prompts in the recipe.")
    if samples < MIN_SAMPLES:
        raise DiffshipError(f"calibration.samples is {samples}; INT8 calibration needs at least {MIN_SAMPLES} denoiser calls.")
