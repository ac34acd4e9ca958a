"""The ONNX an engine is built from: what each component computes in (SDXL's VAE kept FP32 under FP16), and the
graph prepared for TensorRT's parser (FP16 weights, folded constants, QDQ kept)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffship.models.components import ComponentSpec
from diffship.targets import onnx_graph
from diffship.targets.options import vae_fp32_reason
from diffship.targets.tensorrt_options import CALIBRATED, QDQ_OPS, TrtOptions


def computes_in(spec: ComponentSpec, precision: str, options: TrtOptions) -> tuple[str, str | None]:
    """What component `spec` of a `precision` set computes in, and why when that differs from the set's."""
    if precision in CALIBRATED and not spec.is_denoiser:
        lowered = "fp16"
        reason = f"{precision.upper()} quantizes the denoiser; the other components run in FP16"
    else:
        lowered, reason = ("int8" if precision == "int8-auto" else precision), None
    if lowered in ("fp16", "bf16") and (kept := vae_fp32_reason(spec, options.vae_precision)):
        return "fp32", kept
    return lowered, reason


def prepare_onnx(source: Path, out: Path, compute: str) -> dict[str, Any]:
    """The ONNX TensorRT parses: constants folded (polygraphy), dead nodes removed and sorted (onnx-graphsurgeon),
    and converted to FP16 when the component computes in FP16 or around INT8 / FP8 quantizers."""
    import onnx_graphsurgeon as gs  # start-up time: onnx_graphsurgeon

    model = onnx_graph.load(source)
    before = onnx_graph.op_counts(model)
    quantized = any(op in before for op in QDQ_OPS)
    record: dict[str, Any] = {}
    if quantized:
        # Folding would evaluate each weight's quantize/dequantize pair into a float constant, and TensorRT
        # quantizes a weight only where it sees that pair.
        record["folded"] = "no: QDQ weights must stay as quantize/dequantize pairs"
    else:
        model = onnx_graph.fold_constants(model)
        record["folded"] = "polygraphy"
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    if compute in ("fp16", "int8", "fp8"):
        model = onnx_graph.to_fp16(model, keep_io_types=True, op_block_list=list(QDQ_OPS))
        record["conversion"] = "FP16 weights and compute, FP32 inputs/outputs" + (
            ", quantizers in FP32" if quantized else "")
    onnx_graph.save(model, out, replace=True)
    return record | onnx_graph.summary(before, onnx_graph.op_counts(model), {}, {})
