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
    # whether parity gates this output; a residual (block caching's cached features) is a difference of two large
    # values, so its relative error says little: it is reported, and judged where it lands (the accelerated images)
    gated: bool = True

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def concrete(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.shape)
