"""Named tensors as data: the one vocabulary component specs, families and targets describe inputs and outputs in.

Kept free of torch and numpy so that family declarations (read at detection, before any model loads) can build them.
"""

from __future__ import annotations

from dataclasses import dataclass

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: dtype and shape, strings being named dynamic axes."""

    name: str
    dtype: str  # numpy dtype name
    shape: tuple[Dim, ...]

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def concrete(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.shape)
