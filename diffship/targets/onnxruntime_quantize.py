"""The UNet's static QDQ INT8 for ONNX Runtime: `int8` (calibrated, sensitive layers kept in float by name) and
`int8-auto` (full INT8, then the activations with the worst real-step noise kept in float until the gate holds).

Both calibrate ranges on the captured real inputs in a session of diffship's own settings, then let
`quantize_static` quantize from those ranges. `int8-auto` ranks every activation quantizer by SQNR in one pass and
searches with `int8_search`; its candidates are small graphs sharing one weights file, so each costs one session.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import TensorsData, create_calibrator, save_tensors_data

from diffship.errors import DiffshipError
from diffship.host.memory import release_freed
from diffship.targets import CompileContext, calibration_inputs, onnx_graph
from diffship.targets.accuracy_gate import Clock, evaluate, gated_outputs, probe_inputs, worst
from diffship.targets.int8_search import SQNR_CALLS, Site, search, sqnr_db

QUANTIZED_OPS = ("Conv", "MatMul")
WEIGHTS = "weights.bin"  # the one external data file the search's candidate graphs share


def quantize_unet(source: Path, out: Path, context: CompileContext, method_name: str, max_outputs: int, large: bool,
                  keep_sensitive: bool = True, ranges: Path | None = None) -> dict[str, Any]:
    """Static QDQ INT8 UNet: tensor ranges from the captured inputs first, then quantization from those ranges.

    Two phases, so that the calibration session can run with settings that fit a full-size UNet at 512x512
    in memory (`quantize_static` builds its own); the ranges pass between them through onnxruntime's own
    calibration cache file (`ranges`, by default beside the model).
    """
    # One batch item per sample: the ranges are the same, the calibration session needs half the memory.
    samples = [row for call in calibration_inputs(context, "int8") for row in context.spec.rows(call)]

    class Reader(CalibrationDataReader):
        def __init__(self, chunk: list[dict[str, Any]]) -> None:
            self.samples = iter(chunk)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.samples, None)

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[method_name]
    ranges = ranges or out.parent / "calibration-ranges.json"
    # At most `max_outputs` samples' outputs held at once: one collect_data per chunk, each merged into the ranges.
    # Not onnxruntime's own `max_intermediate_outputs`: its MinMax calibrator (1.32) drops a full chunk without
    # reducing it, so only the last partial chunk's ranges survived (onnxruntime issue 18893).
    chunk = max_outputs or len(samples)
    with tempfile.TemporaryDirectory(prefix="diffship-calibrate-") as tmp:
        calibrator = create_calibrator(source, list(QUANTIZED_OPS), augmented_model_path=str(Path(tmp) / "model.onnx"),
                                       calibrate_method=method, use_external_data_format=large,
                                       providers=["CPUExecutionProvider"])
        # The calibrator's session runs in ONNX Runtime's default node order, which schedules the statistics
        # nodes after the whole graph and so keeps every calibrated tensor alive (13 GiB for SD 1.5's UNet at
        # 512x512, batch 1). Priority order runs each as soon as its input exists (4.5 GiB).
        # Its model proto (every weight, loaded to write the augmented copy) is not needed past that point: released
        # before the session maps the copy, the phase peaks at 4.53 GiB instead of 7.72 on sd15-arch's UNet.
        calibrator.infer_session = calibrator.model = None
        release_freed()
        calibrator.infer_session = ort.InferenceSession(calibrator.augmented_model_path, _lean_session(),
                                                        providers=["CPUExecutionProvider"])
        for start in range(0, len(samples), chunk):
            calibrator.collect_data(Reader(samples[start:start + chunk]))
        computed = calibrator.compute_data()  # in the order of a set's iteration: sorted, so the file is reproducible
        save_tensors_data(TensorsData(computed.calibration_method, dict(sorted(computed.data.items()))), ranges)
        del calibrator
        release_freed()
    excluded = []
    if keep_sensitive:  # the denoiser's declared layers INT8 hurts most and speeds up least
        sensitive = context.spec.denoiser.sensitive.searched_first
        graph = onnx.load(str(source), load_external_data=False).graph
        excluded = [n.name for n in graph.node
                    if n.op_type in QUANTIZED_OPS and any(part in n.name for part in sensitive)]
        del graph
    with quiet_root_logger():
        _quantize_static(source, out, excluded, large, method, ranges)
    kept = f"; {len(excluded)} sensitive Conv/MatMul kept float" if keep_sensitive else "; every Conv/MatMul quantized"
    return {"quantization": f"static QDQ S8S8, per-channel weights, {method_name} calibration on "
                            f"{len(samples)} captured denoiser inputs{kept}",
            "excluded_nodes": len(excluded), "calibration_samples": len(samples)}


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs advice on the root logger ("consider pre-processing") on every call."""
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR
    try:
        yield
    finally:
        root.setLevel(level)


def _lean_session() -> ort.SessionOptions:
    """A session that runs each node as soon as its inputs exist and is not rewritten (probes, calibration)."""
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session_options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    session_options.log_severity_level = 3
    return session_options


def _quantize_static(source: Path, out: Path, excluded: list[str], large: bool, method: Any, ranges: Path) -> None:
    quantize_static(source, out, None, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS),
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=excluded, use_external_data_format=large, calibrate_method=method,
                    calibration_cache_path=ranges, extra_options={
                        # MatMul outputs stay float (MatMulIntegerToFloat): the residual stream keeps its precision.
                        "OpTypesToExcludeOutputQuantization": ["MatMul"],
                        # One Q/DQ pair per consumer, so q/k/v projections sharing an input each fuse.
                        "DedicatedQDQPair": True})


def quantize_auto(source: Path, out: Path, context: CompileContext, method_name: str, max_outputs: int, large: bool,
                  runner: Callable[[Path, str], Any]) -> dict[str, Any]:
    """`int8-auto` of the denoiser or a deep-cache graph: the fewest activations in float that meet the gate (on every
    output) on the captured real steps; when even all of them in float fail (or the time runs out first), all of
    them: weight-only INT8. What it did, for the sidecar.

    runner(path, precision): a Runner made the way the build will load the artifact."""
    if context.gate is None:
        raise DiffshipError("int8-auto needs the recipe's INT8 gate for the denoiser.")
    gate, say, calls = context.gate, context.say or (lambda _: None), calibration_inputs(context, "int8-auto")
    clock = Clock(gate)
    fp32 = runner(source, "fp32")
    names = gated_outputs(context.spec)  # a deep-cache graph's cached features too

    def outputs(session: Any, call: dict[str, Any]) -> list[Any]:
        result = session.run(call)
        return [result[n] for n in names]

    references = [outputs(fp32, c) for c in calls]
    probes = probe_inputs(context.spec, gate)
    probe_references = [outputs(fp32, p) for p in probes]
    _, fp32_seconds = evaluate(lambda c: outputs(fp32, c), calls, references, gate)
    fp32 = None  # the FP32 session is not needed during the search
    with tempfile.TemporaryDirectory(prefix=".search-", dir=out.parent) as tmp:
        folder = Path(tmp)
        record = quantize_unet(source, folder / "full.onnx", context, method_name, max_outputs, large,
                               keep_sensitive=False, ranges=out.parent / "calibration-ranges.json")
        onnx.save_model(onnx.load(str(folder / "full.onnx")), str(folder / "search.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=WEIGHTS, size_threshold=1024)
        for path in folder.glob("full.onnx*"):
            path.unlink()
        model = onnx.load(str(folder / "search.onnx"), load_external_data=False)
        sites = _sites(model, folder, calls[:SQNR_CALLS])
        say(f"      int8-auto: {len(sites)} quantized activations ranked by SQNR on {min(len(calls), SQNR_CALLS)} "
            f"real steps in {clock.elapsed():.0f} s")

        def trial(kept: list[Site]) -> tuple[float, float, float]:
            path = folder / f"candidate-{len(kept)}.onnx"
            onnx.save_model(_without(model, {s.name for s in kept}), str(path))
            candidate = runner(path, "int8-auto")
            scores, seconds = evaluate(lambda c: outputs(candidate, c), calls, references, gate)
            return min(scores), worst(lambda c: outputs(candidate, c), probes, probe_references, gate), seconds

        kept, found = search(sites, trial, gate, clock, fp32_seconds, say,
                             context.spec.denoiser.sensitive.searched_first)
        if kept is None:
            say(f"      int8-auto fell back to weight-only INT8: {found['fell_back']}")
        else:
            say(f"      int8-auto kept {len(kept)} activation(s) in float; real-step score {found['chosen_score']:.5f} "
                f"in {found['seconds']:.0f} s")
        chosen = folder / "chosen.onnx"
        onnx.save_model(_without(model, {s.name for s in (sites if kept is None else kept)}), str(chosen))
        onnx_graph.save(onnx.load(str(chosen)), out, replace=True)
    found["library"] = f"onnxruntime {ort.__version__} quantize_static (full static QDQ INT8)"
    if kept is None:
        found["fell_back_to"] = "weight-only INT8: every activation quantizer removed, INT8 weights kept"
    return record | {"search": found}


def _pairs(model: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, onnx.NodeProto]]]:
    """Activation tensor -> its (QuantizeLinear, DequantizeLinear) pairs (one per consumer: dedicated pairs)."""
    initializers = {t.name for t in model.graph.initializer}
    dequantize = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    pairs: dict[str, list[tuple[onnx.NodeProto, onnx.NodeProto]]] = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in initializers and node.output[0] in dequantize:
            pairs.setdefault(node.input[0], []).append((node, dequantize[node.output[0]]))
    return pairs


def _sites(model: onnx.ModelProto, folder: Path, calls: list[dict[str, np.ndarray]]) -> list[Site]:
    """Each quantized activation's SQNR over `calls`, from two sums of squares the graph computes itself (the
    same SQNR as onnxruntime's `qdq_loss_debug`, whose helpers return every tensor whole: GBs per call at full size)."""
    pairs = _pairs(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = []
    for i, (tensor, group) in enumerate(pairs.items()):
        dq_out = group[0][1].output[0]
        probe.graph.node.extend([
            helper.make_node("Sub", [dq_out, tensor], [f"diffship_noise_{i}"]),
            helper.make_node("ReduceSumSquare", [f"diffship_noise_{i}"], [f"diffship_noise_energy_{i}"], keepdims=0),
            helper.make_node("ReduceSumSquare", [tensor], [f"diffship_signal_energy_{i}"], keepdims=0)])
        outputs += [f"diffship_signal_energy_{i}", f"diffship_noise_energy_{i}"]
    probe.graph.output.extend(helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, []) for o in outputs)
    path = folder / "sqnr-probe.onnx"
    onnx.save_model(probe, str(path))
    session = ort.InferenceSession(str(path), _lean_session(), providers=["CPUExecutionProvider"])
    totals = np.zeros(len(outputs))
    for call in calls:
        totals += np.array([float(v) for v in session.run(outputs, call)], dtype=np.float64)
    del session
    path.unlink()
    consumers: dict[str, list[onnx.NodeProto]] = {dq.output[0]: [] for group in pairs.values() for _, dq in group}
    for node in model.graph.node:
        for name in node.input:
            if name in consumers:
                consumers[name].append(node)
    return [Site(tensor, _layers([c for _, dq in group for c in consumers[dq.output[0]]]),
                 sqnr_db(totals[2 * i], totals[2 * i + 1]))
            for i, (tensor, group) in enumerate(pairs.items())]


def _layers(readers: list[onnx.NodeProto]) -> tuple[str, ...]:
    """The quantized layers among a tensor's readers (all of them when none is: shape logic reads it too)."""
    quantized = sorted({n.name for n in readers if n.op_type in QUANTIZED_OPS})
    return tuple(quantized or sorted({n.name for n in readers}))


def _without(model: onnx.ModelProto, tensors: set[str]) -> onnx.ModelProto:
    """A copy of the QDQ graph whose named activations reach their consumers unquantized (weights stay INT8)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if not tensors:
        return copy
    dropped, rewire = set(), {}  # dropped: the removed Q and DQ nodes, by output name
    for tensor, group in _pairs(copy).items():
        if tensor in tensors:
            for q, dq in group:
                dropped |= {q.output[0], dq.output[0]}
                rewire[dq.output[0]] = tensor
    nodes = [n for n in copy.graph.node if n.output[0] not in dropped]
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in rewire:
                node.input[i] = rewire[name]
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    return copy
