"""ONNX Runtime target: an exported ONNX file is the artifact; a Runner over an InferenceSession.

Providers are chosen from what is installed (CUDA before CPU unless the options say otherwise) and
the Runner reports the providers the session actually uses, so a silent CPU fallback is visible.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from diffship.errors import DiffshipError
from diffship.targets import CompileContext

NAME = "onnxruntime"
PRECISIONS = ("fp32", "int8")
QUANTIZED_OPS = ("Conv", "MatMul")
# UNet layers INT8 hurts most and speeds up least: timestep embedding, first and last convolutions.
UNET_SENSITIVE = ("time_embedding", "time_proj", "conv_in", "conv_out")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class OrtOptions:
    """Session settings: providers (None: best installed), graph optimization level, intra-op threads (0: ORT's default)."""

    providers: tuple[str, ...] | None = None
    graph_optimization: str = "all"
    intra_op_threads: int = 0
    calibration_method: str = "minmax"
    # Collect calibration statistics for at most this many tensors per pass (0: all at once). Full-size UNets
    # need it: ORT makes every quantized tensor a graph output and runs out of memory otherwise.
    calib_max_intermediate_outputs: int = 0
    extra: dict[str, str] = field(default_factory=dict)


def parse_options(options: dict[str, Any]) -> OrtOptions:
    """The recipe's `[targets.options]` for ONNX Runtime, with unknown keys named."""
    known = {f.name for f in fields(OrtOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise DiffshipError(f"Unknown ONNX Runtime option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
    values = dict(options)
    if values.get("providers") is not None:
        values["providers"] = tuple(values["providers"])
    parsed = OrtOptions(**values)
    if parsed.calibration_method not in CALIBRATION_METHODS:
        raise DiffshipError(
            f"Unknown calibration_method {parsed.calibration_method!r}; choose {', '.join(CALIBRATION_METHODS)}.")
    return parsed


def default_providers() -> tuple[str, ...]:
    """CUDA first when the installed onnxruntime has it, then CPU."""
    available = ort.get_available_providers()
    return tuple(p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available)


def writes_artifacts(precision: str) -> bool:
    """Whether `compile` makes new files for `precision` (FP32 runs the exported ONNX as it is)."""
    return precision != "fp32"


def needs_calibration(precision: str) -> bool:
    """Whether `precision` is calibrated on captured inputs (the UNet's static INT8)."""
    return precision == "int8"


def model_index(family: str, components: list[str]) -> dict[str, Any]:
    """model_index.json entries of diffusers' / optimum's ONNX pipelines for this folder."""
    from diffship.exporters.pipeline import ONNX_PIPELINE_CLASS

    return {"_class_name": ONNX_PIPELINE_CLASS[family], **{c: ["diffusers", "OnnxRuntimeModel"] for c in components}}


def compile(source: Path, precision: str = "fp32", options: OrtOptions | None = None, dest: Path | None = None,
            context: CompileContext | None = None) -> Path:
    """The ONNX Runtime artifact for `source`: the export itself for FP32; for INT8 a quantized model in `dest`.

    INT8: the UNet as static QDQ (Conv and MatMul; per-channel INT8 weights; INT8 activations, S8S8 being
    ONNX Runtime's recommended QDQ format on x86; calibrated on its captured real inputs; sensitive layers
    left in float); text encoders with dynamic INT8 MatMuls; the VAE stays FP32 (its activations do not
    survive INT8; see the OpenVINO int8-full results).
    """
    options = options or OrtOptions()
    if precision not in PRECISIONS:
        raise DiffshipError(f"ONNX Runtime precision {precision!r} is not available; choose {', '.join(PRECISIONS)}.")
    if not source.is_file():
        raise DiffshipError(f"No ONNX model at {source}.")
    if precision == "fp32":
        return source
    if dest is None or context is None:
        raise DiffshipError("ONNX Runtime INT8 needs an output folder and the component it quantizes.")
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / source.name
    large = (source.parent / f"{source.name}_data").is_file()
    name = context.spec.name
    if name == "unet":
        _quantize_unet(source, out, context, options, large)
    elif name.startswith("text_encoder"):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(source, out, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                         use_external_data_format=large)
    else:
        for path in source.parent.iterdir():
            if path.name.startswith(source.name):
                try:
                    os.link(path, dest / path.name)
                except OSError:
                    shutil.copy2(path, dest / path.name)
    return out


def _quantize_unet(source: Path, out: Path, context: CompileContext, options: OrtOptions, large: bool) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    if context.calibration is None:
        raise DiffshipError("ONNX Runtime INT8 needs calibration data for the UNet.")
    calls = context.calibration().inputs["unet"]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.calls = iter(calls)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.calls, None)

    graph = onnx.load(str(source), load_external_data=False).graph
    excluded = [n.name for n in graph.node if any(part in n.name for part in UNET_SENSITIVE)]
    extra: dict[str, Any] = {}
    if k := options.calib_max_intermediate_outputs:
        # onnxruntime raises "No data is collected" when the sample count is a multiple of this.
        extra["CalibMaxIntermediateOutputs"] = k - 1 if len(calls) % k == 0 else k
    quantize_static(source, out, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS),
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=excluded, use_external_data_format=large,
                    calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                      "percentile": CalibrationMethod.Percentile}[options.calibration_method],
                    extra_options=extra)


class OrtRunner:
    """A Runner over an onnxruntime.InferenceSession."""

    def __init__(self, path: Path, options: OrtOptions, precision: str = "fp32"):
        if options.graph_optimization not in GRAPH_LEVELS:
            raise DiffshipError(
                f"Unknown graph optimization level {options.graph_optimization!r}; choose {', '.join(GRAPH_LEVELS)}."
            )
        requested = options.providers or default_providers()
        missing = [p for p in requested if p not in ort.get_available_providers()]
        if missing:
            raise DiffshipError(
                f"Execution provider(s) {', '.join(missing)} are not available in this onnxruntime "
                f"(available: {', '.join(ort.get_available_providers())})."
            )
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = GRAPH_LEVELS[options.graph_optimization]
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), session_options, providers=list(requested))
        except Exception as exc:  # onnxruntime raises its own untyped errors for a bad file
            raise DiffshipError(f"ONNX Runtime could not load {path}: {exc}") from exc
        self.path, self.options, self.precision = path, options, precision
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session on named arrays; missing or unexpected names are an error, not a guess."""
        if set(inputs) != set(self.input_names):
            raise DiffshipError(f"{self.path} takes inputs {list(self.input_names)}, got {sorted(inputs)}.")
        outputs = self.session.run(list(self.output_names), inputs)
        return dict(zip(self.output_names, outputs, strict=True))

    def describe(self) -> dict[str, object]:
        providers = self.session.get_providers()
        return {"target": NAME, "onnxruntime": ort.__version__, "providers": providers,
                "graph_optimization": self.options.graph_optimization,
                "precision": self.precision,
                "summary": f"ONNX Runtime {providers[0].removesuffix('ExecutionProvider')} {self.precision}"}


def load(artifact: Path, options: OrtOptions | None = None, precision: str | None = None) -> OrtRunner:
    """A Runner for an ONNX file."""
    return OrtRunner(artifact, options or OrtOptions(), precision or "fp32")
