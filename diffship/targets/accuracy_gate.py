"""What `int8-auto` must meet, shared by every target's accuracy-aware search: the recipe's INT8 gate on real steps.

The search sees the UNet's captured real denoising inputs (calibration) and the FP32 model's outputs on them. Its
target sits `margin` of the way from the recipe's threshold to a perfect score, because the build's own gate is
then checked on a different trajectory (the validation prompt and seed): the search must not stop at the edge.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from diffship.errors import DiffshipError

if TYPE_CHECKING:
    from diffship.models.components import ComponentSpec

# A graph's output, or all of them in order: deep-feature caching's graph returns the noise prediction and the
# features the shallow graph reuses, and validation gates both.
Outputs = np.ndarray | Sequence[np.ndarray]


@dataclass(frozen=True)
class Gate:
    """The recipe's threshold for the precision, how far inside it the search aims, and how long it may take."""

    min_cosine: float
    max_rel_l2: float
    margin: float = 0.1
    time_limit_s: float = 3600.0
    # Validation's parity cases for the UNet (batch, height, width): random inputs, which must reach the threshold
    # itself (no margin: validation runs exactly these). They are never used to rank layers.
    probes: tuple[tuple[int, int, int], ...] = ()

    @property
    def target(self) -> float:
        """The score a candidate must reach (scores are on the cosine scale, see `score`)."""
        return self.min_cosine + self.margin * (1.0 - self.min_cosine)


def probe_inputs(spec: ComponentSpec, gate: Gate) -> list[dict[str, np.ndarray]]:
    """The inputs of validation's parity cases, made exactly as `validation.parity.check_component` makes them."""
    return [spec.sample_inputs(b, h, w, seed=i) for i, (b, h, w) in enumerate(gate.probes)]


def gated_outputs(spec: ComponentSpec) -> list[str]:
    """The outputs validation gates, which the search must hold too: a caching UNet's features are, a caching
    transformer's residual is not (it is judged where it lands, in the images)."""
    return [t.name for t in spec.outputs if t.gated]


def worst(run: Callable[[dict[str, np.ndarray]], Outputs], calls: list[dict[str, np.ndarray]],
          references: list[Outputs], gate: Gate) -> float:
    """The lowest score over `calls` (1.0 when there are none)."""
    return min((score(r, run(c), gate) for c, r in zip(calls, references, strict=True)), default=1.0)


def score(expected: Outputs, actual: Outputs, gate: Gate) -> float:
    """One number for both parts of the gate, on the cosine scale: the cosine, or lower when the relative L2 error
    is the tighter limit (a rel L2 at `max_rel_l2` scores exactly `min_cosine`); the lowest over several outputs."""
    if not isinstance(expected, np.ndarray):
        return min(score(e, a, gate) for e, a in zip(expected, actual, strict=True))
    a, b = expected.ravel().astype(np.float64), actual.ravel().astype(np.float64)
    norm = float(np.linalg.norm(a))
    cosine = float(a @ b / max(norm * float(np.linalg.norm(b)), 1e-30))
    rel_l2 = float(np.linalg.norm(a - b)) / max(norm, 1e-30)
    return min(cosine, 1.0 - (1.0 - gate.min_cosine) * rel_l2 / gate.max_rel_l2)


class SearchTimeUp(DiffshipError):
    """Raised from inside a search when its time limit has passed (caught by the search, never by the user)."""


@dataclass
class Clock:
    """The search's deadline, and every candidate it evaluated: kept layers, score, seconds per UNet call."""

    gate: Gate
    started: float = field(default_factory=time.perf_counter)
    candidates: list[dict[str, Any]] = field(default_factory=list)

    def check(self) -> None:
        if time.perf_counter() - self.started > self.gate.time_limit_s:
            raise SearchTimeUp(f"the search reached its time limit of {self.gate.time_limit_s / 60:.0f} min")

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.started, 1)


def evaluate(run: Callable[[dict[str, np.ndarray]], Outputs], calls: list[dict[str, np.ndarray]],
             references: list[Outputs], gate: Gate) -> tuple[list[float], float]:
    """The score of each real step and the median seconds per UNet call."""
    scores, seconds = [], []
    for call, expected in zip(calls, references, strict=True):
        began = time.perf_counter()
        out = run(call)
        seconds.append(time.perf_counter() - began)
        scores.append(score(expected, out, gate))
    return scores, float(np.median(seconds))
