"""`int8-auto` on OpenVINO: full static INT8 of the UNet, then NNCF's accuracy restorer keeps the most sensitive
layers in float until the real-step gate holds; weight-only INT8 when it cannot within the time limit.

NNCF's `quantize_with_accuracy_control` does the ranking (one candidate per quantizer group, scored by our
validation function) and the greedy restoring; diffship only supplies the gate, stops it at the time limit, and
records what it tried and what it kept, read from NNCF's own log lines.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import openvino as ov

from diffship.targets.accuracy_gate import Clock, Gate, SearchTimeUp, evaluate

Say = Callable[[str], None]
_REVERTED = re.compile(r"Reverted \d+ operations to the floating-point precision: \n(.*)", re.S)
_FINAL = re.compile(r"(\d+) out of (\d+) were reverted back to the floating-point precision:\n(.*)", re.S)


class _NncfLines(logging.Handler):
    """Follows NNCF's accuracy-control log: which phase it is in, what each restoring iteration reverted."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.phase, self.pending, self.final, self.total = "setup", [], None, None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Validation of initial model"):
            self.phase = "FP32"
        elif message.startswith("Validation of quantized model"):
            self.phase = "full INT8"
        elif message.startswith("Number of parallel workers") or message.startswith("Re-calculating ranking"):
            self.phase = "ranking"
        elif match := _REVERTED.match(message):
            self.phase, self.pending = "restoring", _names(match[1])
        elif match := _FINAL.match(message):
            self.final, self.total = _names(match[3]), int(match[2])
        elif message.startswith("Total number of quantized operations"):
            self.total = int(message.rsplit(":", 1)[1])


def _names(block: str) -> list[str]:
    return [line.strip() for line in block.splitlines() if line.strip()]


def quantize_auto(model: ov.Model, calls: list[dict[str, np.ndarray]], gate: Gate, quantize_kwargs: dict[str, Any],
                  say: Say) -> tuple[ov.Model | None, dict[str, Any]]:
    """The accuracy-controlled INT8 UNet and what the search did; (None, record) when it fell back."""
    import nncf

    fp32 = ov.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    references = [fp32(c)[0] for c in calls]
    del fp32
    clock, lines = Clock(gate), _NncfLines()
    restored: list[str] = []

    def validate(compiled: Any, items: Any) -> tuple[float, list[float]]:
        clock.check()
        batch = list(items)
        scores, seconds = evaluate(lambda c: compiled(c)[0], [c for c, _ in batch], [r for _, r in batch], gate)
        worst, label = min(scores), lines.phase
        if label == "setup" or (label != "ranking" and len(batch) < len(calls)):
            return worst, scores  # NNCF's probe, on one item, of what validate returns
        if label == "restoring":
            restored.extend(lines.pending)
            lines.pending = []
        clock.candidates.append({"label": label, "score": worst, "seconds": seconds, "kept": list(restored),
                                 "items": len(batch)})
        if label != "ranking":
            say(f"      int8-auto {label}{f' ({len(restored)} kept in float)' if restored else ''}: "
                f"real-step score {worst:.5f} (target {gate.target:.5f}), {clock.elapsed():.0f} s")
        return worst, scores

    nncf_logger = logging.getLogger("nncf")
    nncf_logger.addHandler(lines)
    try:
        quantized = nncf.quantize_with_accuracy_control(
            model, nncf.Dataset(calls), nncf.Dataset(list(zip(calls, references, strict=True))), validate,
            max_drop=1.0 - gate.target, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calls),
            advanced_accuracy_restorer_parameters=nncf.AdvancedAccuracyRestorerParameters(
                ranking_subset_size=min(4, len(calls))),
            **quantize_kwargs)
        fell_back = None
    except SearchTimeUp as exc:
        quantized, fell_back = None, str(exc)
    finally:
        nncf_logger.removeHandler(lines)
    final = next((c for c in reversed(clock.candidates) if c["label"] != "ranking"), None)
    if fell_back is None and (final is None or final["score"] < gate.target):
        quantized, fell_back = None, "even with the restorer's layers in float the gate was not met"
    record = _record(clock, lines, gate, final, fell_back)
    return quantized, record


def _record(clock: Clock, lines: _NncfLines, gate: Gate, final: dict[str, Any] | None,
            fell_back: str | None) -> dict[str, Any]:
    candidates = [c for c in clock.candidates if c["label"] != "ranking"]
    fp32 = candidates[0]["seconds"] if candidates else None
    kept_rows = []
    for i, c in enumerate(candidates[2:], start=2):
        for name in c["kept"][len(candidates[i - 1]["kept"]):]:
            kept_rows.append({"layer": name, "why": f"restoring step {i - 1}: real-step score "
                                                    f"{candidates[i - 1]['score']:.5f} -> {c['score']:.5f} with it in float"})
    if lines.final is not None:  # NNCF's own final list wins over our reconstruction (it undoes failed steps)
        kept_rows = [r for r in kept_rows if r["layer"] in lines.final]
    return {"search": "NNCF quantize_with_accuracy_control (full static INT8, then greedy restoring by ranking on "
                      "captured real denoising steps)",
            "gate": {"min_cosine": gate.min_cosine, "max_rel_l2": gate.max_rel_l2, "target": gate.target,
                     "time_limit_s": gate.time_limit_s},
            "quantized_operations": lines.total, "ranked_candidates": sum(c["label"] == "ranking" for c in clock.candidates),
            "candidates": [{**c, "speedup_vs_fp32": (fp32 / c["seconds"]) if fp32 else None, "kept": len(c["kept"])}
                           for c in candidates],
            "kept_in_float": kept_rows, "chosen_score": final["score"] if final and not fell_back else None,
            "fell_back": fell_back, "seconds": clock.elapsed()}
