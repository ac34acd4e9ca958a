"""The search behind every target's `int8-auto`: start from full static INT8 and keep the quantized activations
with the worst local error in float, as few as the real-step gate allows.

Written here, not taken from NNCF's `quantize_with_accuracy_control` (which the first version used): its ranking
compiles the model once per quantizer group (111 groups at about 2.3 s each for tiny-sd's UNet, 4 to 6 min; hours
for a full-size one), and ONNX Runtime has no such search at all. Instead every quantized activation is ranked in
one pass (the inputs of the layers diffusion recipes keep in float, the denoiser's declared `searched_first`, first;
then by signal-to-noise ratio on captured real steps, the `qdq_err` of onnxruntime's `qdq_loss_debug`), and how
many of the first are kept in float is found by doubling then bisection: about 2·log2(sites) candidates, each one
compile and one pass over the real steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from diffship.targets.accuracy_gate import Clock, Gate, SearchTimeUp

Say = Callable[[str], None]
SQNR_CALLS = 4  # real steps the one-pass ranking runs on


@dataclass(frozen=True)
class Site:
    """One quantized activation: its quantizer's name, the layers that read it, its SQNR on the real steps."""

    name: str
    consumers: tuple[str, ...]
    sqnr_db: float


# A candidate with these sites in float: its worst score on the real steps, its worst score on validation's
# random-input parity cases (1.0 when there are none), and its median seconds per UNet call on the real steps.
Trial = Callable[[list[Site]], tuple[float, float, float]]


def sqnr_db(signal_energy: float, noise_energy: float) -> float:
    """20·log10(|x| / |x - qdq(x)|) from the two sums of squares (onnxruntime's SQNR, without the tensors)."""
    if noise_energy <= 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal_energy, 1e-30) / noise_energy)


def search(sites: list[Site], trial: Trial, gate: Gate, clock: Clock, fp32_seconds: float, say: Say,
           suspects: tuple[str, ...] = ()) -> tuple[list[Site] | None, dict[str, Any]]:
    """The fewest worst-SQNR sites whose float copy meets `gate.target` (None: not even all of them), and the record
    of every candidate tried. A time-out keeps the best passing candidate found so far, if any."""
    # A site whose probe measured no noise at all is unknown, not safe: on digits-sd the one site the gate needed
    # (an upsampler conv's input) measured none in the f32 probe and, ranked last, left every site in float.
    ranked = sorted(sites, key=lambda s: (not _suspect(s, suspects), not math.isinf(s.sqnr_db), s.sqnr_db))
    results: dict[int, float] = {}
    passing: set[int] = set()

    def passes(k: int) -> bool:
        if k not in results:
            clock.check()
            score, random_inputs, seconds = trial(ranked[:k])
            results[k] = score
            if score >= gate.target and random_inputs >= gate.min_cosine:
                passing.add(k)
            label = "full INT8" if k == 0 else ("every activation in float" if k == len(ranked) else f"first {k} in float")
            clock.candidates.append({"label": label, "kept": k, "score": score, "random_inputs": random_inputs,
                                     "seconds": seconds, "speedup_vs_fp32": fp32_seconds / seconds if seconds else None})
            speed = f"{fp32_seconds / seconds:.2f}x the FP32 model, " if seconds else ""
            say(f"      int8-auto {label}: real-step score {score:.5f} (target {gate.target:.5f}), random inputs "
                f"{random_inputs:.5f} (at least {gate.min_cosine}), {speed}{clock.elapsed():.0f} s")
        return k in passing

    chosen, stopped = None, None
    try:
        chosen = _fewest(len(ranked), passes)
    except SearchTimeUp as exc:
        stopped = str(exc)
        chosen = min(passing) if passing else None
    kept = None if chosen is None else ranked[:chosen]
    fell_back = None
    if kept is None:
        fell_back = stopped or "even with every quantized activation in float the gate was not met"
    return kept, _record(ranked, kept, results, gate, clock, fell_back, stopped, suspects)


def _db(site: Site) -> float | None:
    """The SQNR for JSON (None where no noise was measured: JSON has no infinity)."""
    return None if math.isinf(site.sqnr_db) else round(site.sqnr_db, 2)


def _noise(site: Site) -> str:
    if math.isinf(site.sqnr_db):
        return "no quantization noise measured on real steps (unknown, so tried early)"
    return f"input SQNR {site.sqnr_db:.1f} dB on real steps"


def _suspect(site: Site, suspects: tuple[str, ...]) -> bool:
    """Whether a layer reading the site is one the denoiser declares is searched first (`suspects`, name parts)."""
    return any(part in layer for layer in site.consumers for part in suspects)


def _fewest(n: int, passes: Callable[[int], bool]) -> int | None:
    """The smallest k in [0, n] with passes(k), assuming more kept is never worse: doubling, then bisection."""
    if passes(0):
        return 0
    low, k = 0, 1
    while k < n and not passes(k):
        low, k = k, k * 2
    high = min(k, n)
    if high == n and not passes(n):
        return None
    while high - low > 1:
        middle = (low + high) // 2
        if passes(middle):
            high = middle
        else:
            low = middle
    return high


def _record(ranked: list[Site], kept: list[Site] | None, results: dict[int, float], gate: Gate, clock: Clock,
            fell_back: str | None, stopped: str | None, suspects: tuple[str, ...]) -> dict[str, Any]:
    n = len(kept or [])
    rows = [{"layer": ", ".join(s.consumers) or s.name, "quantizer": s.name, "sqnr_db": _db(s),
             "why": f"{'a layer recipes keep in float; ' if _suspect(s, suspects) else ''}{_noise(s)}, rank {i + 1} of "
                    f"{len(ranked)}; {n - 1} in float scored "
                    f"{results.get(n - 1, float('nan')):.5f}, {n} scored {results[n]:.5f}"}
            for i, s in enumerate(kept or [])]
    return {"search": "full static INT8, then activations kept in float in rank order (recipes' sensitive layers, "
                      "then worst SQNR; SQNR and gate on captured real denoising steps; doubling then bisection)",
            "gate": {"min_cosine": gate.min_cosine, "max_rel_l2": gate.max_rel_l2, "target": gate.target,
                     "time_limit_s": gate.time_limit_s},
            "quantized_activations": len(ranked),
            "ranked_first": [{"quantizer": s.name, "layers": list(s.consumers), "sqnr_db": _db(s)}
                            for s in ranked[:10]],
            "candidates": clock.candidates, "kept_in_float": rows,
            "chosen_score": None if kept is None else results[len(kept)],
            "fell_back": fell_back, "stopped": stopped, "seconds": clock.elapsed()}
