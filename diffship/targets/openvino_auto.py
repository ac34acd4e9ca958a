"""`int8-auto` on OpenVINO: NNCF's full static INT8 of the UNet, then the activations with the worst quantization
noise on real steps kept in float (their FakeQuantize removed) until the gate holds; see `int8_search`.

A site kept in float keeps its layer's INT8-rounded weights and computes in the runtime's float precision, so
its speed cost is small; NNCF's weight-only INT8 is the fallback when even every site in float fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from diffship.targets.accuracy_gate import Clock, Gate, evaluate, worst
from diffship.targets.int8_search import SQNR_CALLS, Site, search, sqnr_db

Say = Callable[[str], None]


def quantize_auto(model: ov.Model, calls: list[dict[str, np.ndarray]], probes: list[dict[str, np.ndarray]],
                  gate: Gate, quantize_kwargs: dict[str, Any], config: dict[str, Any], say: Say,
                  gated: list[str], suspects: tuple[str, ...] = ()) -> tuple[ov.Model | None, dict[str, Any]]:
    """The accuracy-aware INT8 denoiser (or one of its deep-cache graphs) and what the search did; (None, record)
    when it fell back; `gated`: the outputs scored (`accuracy_gate.gated_outputs`); `suspects`: the layer-name parts
    the denoiser declares are searched first.

    calls: captured real steps; probes: validation's random-input parity cases (see `Gate.probes`).
    config: how the runtime compiles the result (its inference precision), so the gate scores what will run."""
    import nncf  # optional: openvino

    clock = Clock(gate)
    fp32 = ov.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    def outputs(compiled: ov.CompiledModel, call: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = compiled(call)
        return [result[n] for n in gated]

    references = [outputs(fp32, c) for c in calls]
    probe_references = [outputs(fp32, p) for p in probes]
    _, fp32_seconds = evaluate(lambda c: outputs(fp32, c), calls, references, gate)
    fp32 = None  # the FP32 model is not needed during the search
    settings = dict(quantize_kwargs)
    full = nncf.quantize(model, nncf.Dataset(calls), subset_size=len(calls),
                         advanced_parameters=settings.pop("advanced_quantization_parameters"), **settings)
    sites = _sites(full, calls[:SQNR_CALLS])
    say(f"      int8-auto: {len(sites)} quantized activations ranked by SQNR on {min(len(calls), SQNR_CALLS)} real "
        f"steps in {clock.elapsed():.0f} s")

    def trial(kept: list[Site]) -> tuple[float, float]:
        compiled = ov.compile_model(_without(full, {s.name for s in kept}), "CPU", config)
        scores, seconds = evaluate(lambda c: outputs(compiled, c), calls, references, gate)
        return min(scores), worst(lambda c: outputs(compiled, c), probes, probe_references, gate), seconds

    kept, record = search(sites, trial, gate, clock, fp32_seconds, say, suspects)
    record["library"] = f"NNCF {nncf.__version__} quantize (full static INT8); OpenVINO {ov.__version__}"
    return (None if kept is None else _without(full, {s.name for s in kept})), record


def _activation_quantizers(model: ov.Model) -> list[Any]:
    """FakeQuantize nodes on activations (NNCF has already folded the weights' into INT8 constants)."""
    return [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"
            and op.input_value(0).get_node().get_type_name() != "Constant"]


def _sites(quantized: ov.Model, calls: list[dict[str, np.ndarray]]) -> list[Site]:
    """Each activation quantizer's SQNR over `calls`, from two sums of squares the model computes itself (the
    tensors themselves would be GBs per call at full size)."""
    probe = quantized.clone()
    quantizers = _activation_quantizers(probe)
    consumers = [_consumers(fq) for fq in quantizers]
    flat = ops.constant(np.array([-1], dtype=np.int64))
    axis = ops.constant(np.array([0], dtype=np.int64))
    energies = []
    for fq in quantizers:
        x = ops.reshape(fq.input_value(0), flat, special_zero=False)
        noise = ops.subtract(ops.reshape(fq.output(0), flat, special_zero=False), x)
        energies.append((ops.reduce_sum(ops.multiply(x, x), axis), ops.reduce_sum(ops.multiply(noise, noise), axis)))
    probe.add_outputs([e.output(0) for pair in energies for e in pair])
    compiled = ov.compile_model(probe, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    base = len(quantized.outputs)
    totals = np.zeros((len(quantizers), 2))
    for call in calls:
        result = compiled(call)
        values = [float(np.asarray(result[o]).sum()) for o in compiled.outputs[base:]]
        totals += np.array(values, dtype=np.float64).reshape(-1, 2)
    return [Site(fq.get_friendly_name(), layers, sqnr_db(signal, noise))
            for fq, layers, (signal, noise) in zip(quantizers, consumers, totals, strict=True)]


def _consumers(fq: Any) -> tuple[str, ...]:
    return tuple(sorted({t.get_node().get_friendly_name() for t in fq.output(0).get_target_inputs()
                         if t.get_node().get_type_name() not in ("Result", "ShapeOf")}))


def _without(quantized: ov.Model, names: set[str]) -> ov.Model:
    """A copy of the quantized model with the named activation quantizers bypassed."""
    if not names:
        return quantized
    copy = quantized.clone()
    for fq in _activation_quantizers(copy):
        if fq.get_friendly_name() in names:
            fq.output(0).replace(fq.input_value(0))
    copy.validate_nodes_and_infer_types()
    return copy
