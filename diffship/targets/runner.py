"""The Runner contract every target returns from `load`: named numpy arrays in, named numpy arrays out."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from diffship.targets.records import Description


@runtime_checkable
class Runner(Protocol):
    """A loaded artifact. `run` maps input names to arrays and returns output names to arrays."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def describe(self) -> Description:
        """What actually runs (device, provider, precision), for the report."""
        ...
