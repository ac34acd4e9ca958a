"""ONNX Runtime target: an exported ONNX file is the artifact (prepared, converted or quantized); its Runner is a
session from `ort_session`."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from diffship.errors import DiffshipError
from diffship.host.memory import budget
from diffship.store.artifacts import atomic_write_json
from diffship.targets import CompileContext, onnx_graph
from diffship.targets import onnxruntime_quantize as quantize
from diffship.targets.onnx_weights import fp32_bytes, upcast_stored, weights_behind_casts
from diffship.targets.onnxruntime_streamed import quantize_dynamic_streamed
from diffship.targets.options import vae_fp32_reason
from diffship.targets.ort_session import GPU_PROVIDERS as GPU_PROVIDERS
from diffship.targets.ort_session import INT8 as INT8
from diffship.targets.ort_session import OrtOptions as OrtOptions
from diffship.targets.ort_session import OrtRunner as OrtRunner
from diffship.targets.ort_session import default_providers as default_providers
from diffship.targets.ort_session import providers
from diffship.targets.weight_patch import onnx_replacements, patch_onnx

NAME = "onnxruntime"
PRECISIONS = ("fp32", "fp16", "int8", "int8-auto")
# Precisions whose weights a LoRA swap can overwrite in place (the quantized ones need re-quantizing).
PATCHABLE = ("fp32", "fp16")


def parse_options(options: dict[str, Any]) -> OrtOptions:
    """The recipe's `[targets.options]` for ONNX Runtime, with unknown keys and values named."""
    return OrtOptions.parse(options)


def prepares_graph(options: OrtOptions, precision: str = "fp32") -> bool:
    """Whether compile prepares (fuses, folds) the graph for these options and precision."""
    if options.optimize == "auto":
        return providers(options)[0] in GPU_PROVIDERS or precision in INT8
    return bool(options.optimize)


def writes_artifacts(precision: str, options: OrtOptions | None = None) -> bool:
    """Whether `compile` makes new files (FP32 without graph preparation runs the exported ONNX as it is)."""
    return precision != "fp32" or prepares_graph(options or OrtOptions())


def needs_calibration(precision: str) -> bool:
    """Whether `precision` is calibrated on captured inputs (the UNet's static INT8)."""
    return precision in INT8


def model_index(family: str, components: list[str]) -> dict[str, Any] | None:
    """None: the export's own model_index.json (diffusers' form), which optimum-onnx's ORTDiffusionPipeline loads."""
    return None


def compile(source: Path, precision: str = "fp32", options: OrtOptions | None = None, dest: Path | None = None,
            context: CompileContext | None = None) -> Path:
    """The ONNX Runtime artifact for `source` in `dest`, with what preparation did in `diffship-graph.json`.

    fp32: the prepared graph (fusions for the session's providers, then constant folding), or the export
    itself without `optimize`. fp16: the prepared graph in FP16. int8: the UNet as static QDQ (Conv and
    MatMul; per-channel INT8 weights; INT8 activations, S8S8 being ONNX Runtime's recommended QDQ format on
    x86; calibrated on its captured real inputs; sensitive layers left in float); text encoders with dynamic
    INT8 MatMuls; the VAE as FP32 (its activations do not survive INT8; see the OpenVINO int8-full results).
    """
    options = options or OrtOptions()
    if precision not in PRECISIONS:
        raise DiffshipError(f"ONNX Runtime precision {precision!r} is not available; choose {', '.join(PRECISIONS)}.")
    if not source.is_file():
        raise DiffshipError(f"No ONNX model at {source}.")
    if not writes_artifacts(precision, options):
        return source
    if dest is None or context is None:
        raise DiffshipError(f"ONNX Runtime {precision} needs an output folder and the component it prepares.")
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / source.name
    name = context.spec.name
    if precision in INT8:
        large = (source.parent / f"{source.name}_data").is_file()
        if context.spec.is_denoiser or (context.spec.denoises and (precision == "int8" or context.spec.deep_cache_graph)):
            with tempfile.TemporaryDirectory(prefix=".prepared-", dir=dest) as tmp:
                record = {}
                if weights_behind_casts(source):  # folding would hold the 16-bit and the FP32 weights at once
                    (Path(tmp) / "upcast").mkdir()
                    source, large = upcast_stored(source, Path(tmp) / "upcast" / source.name), True
                    record["stored_weights"] = "16-bit weights written as FP32 initializers one at a time first"
                if prepares_graph(options, precision):
                    prepared = Path(tmp) / source.name
                    record |= _prepare(source, prepared, name, "int8", options, context)
                    source, large = prepared, (Path(tmp) / f"{source.name}_data").is_file()
                settings = (source, out, context, options.calibration_method, options.calib_max_intermediate_outputs, large)
                if precision == "int8":  # int8-auto: the denoiser and each deep-cache graph searched on its own
                    record |= quantize.quantize_unet(*settings)
                else:
                    record |= quantize.quantize_auto(*settings, lambda path, p: OrtRunner(path, options, p))
        elif context.spec.role == "text_encoder":
            record = {"quantization": "dynamic INT8 MatMul weights, activations quantized per call"}
            with quantize.quiet_root_logger():
                if _streams(source, options):  # T5-XXL: one MatMul at a time (onnxruntime_streamed.py)
                    record |= quantize_dynamic_streamed(source, out)
                else:
                    quantize_dynamic(source, out, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                                     use_external_data_format=large)
        else:
            _link_export(source, dest)
            record = {"kept": "fp32", "reason": "VAE activations lose too much in INT8" if context.spec.role.startswith(
                "vae") else "ControlNet components are not calibrated yet (their residual inputs are not captured)"}
    else:
        record = _prepare(source, out, name, precision, options, context)
    atomic_write_json(dest / onnx_graph.GRAPH_FILE, {"precision": precision, **record})
    return out


# onnxruntime's quantize_dynamic holds the FP32 weights and writes a second model beside them (about 1.9x)
WHOLE_MODEL_PEAK = 1.9


def _streams(source: Path, options: OrtOptions) -> bool:
    """The options' `streamed`, or for "auto": weights kept in 16 bits behind Casts (which `quantize_dynamic` would
    leave in float), or quantizing the model whole would outgrow the memory budget."""
    if options.streamed != "auto":
        return bool(options.streamed)
    return weights_behind_casts(source) or streams_bytes(fp32_bytes(source), options)


def streams_bytes(weights: int, options: OrtOptions) -> bool:
    """For `weights` bytes of FP32 weights: whether int8's text encoder goes one MatMul at a time."""
    if options.streamed != "auto":
        return bool(options.streamed)
    return WHOLE_MODEL_PEAK * weights > budget()


def _link_export(source: Path, dest: Path) -> None:
    for path in source.parent.iterdir():
        if path.name.startswith(source.name):
            try:
                os.link(path, dest / path.name)
            except OSError:
                shutil.copy2(path, dest / path.name)


def _prepare(source: Path, out: Path, name: str, precision: str, options: OrtOptions,
             context: CompileContext) -> dict[str, Any]:
    """The FP32 / FP16 artifact, or the graph INT8 quantizes: fused for the session's providers and folded when
    preparation is on; FP16 converted and probed for overflow."""
    record: dict[str, Any] = {}
    fused: dict[str, int] = {}
    prepared = prepares_graph(options, precision)
    model = onnx_graph.load_graph(source)
    before = onnx_graph.op_counts(model)
    if prepared:
        gpu = providers(options)[0] in GPU_PROVIDERS
        model, fused = onnx_graph.prepare(model, source.parent, onnx_graph.model_type(context.spec), gpu)  # weights stay on disk
        record["prepared_for"] = "gpu" if gpu else "cpu"
    keep_fp32 = (vae_fp32_reason(context.spec, options.vae_precision)
                 if precision == "fp16" else None)
    if keep_fp32:
        record |= {"kept": "fp32", "reason": keep_fp32}
    elif precision == "fp16":
        onnx.load_external_data_for_model(model, str(source.parent))  # the conversion rewrites every weight
        fp32_model = model
        model = onnx_graph.to_fp16(model, options.fp16_keep_io_types, list(options.fp16_op_block_list))
        onnx_graph.save(model, out)
        if overflow := _fp16_overflow(out, context):
            model = fp32_model
            record |= {"kept": "fp32", "reason": overflow}
        else:
            record["conversion"] = "FP16 weights and compute" + (
                ", FP32 inputs/outputs" if options.fp16_keep_io_types else ", FP16 inputs/outputs")
        del fp32_model
    if "conversion" not in record:
        onnx_graph.save_prepared(model, source.parent, out)
    return record | onnx_graph.summary(before, onnx_graph.op_counts(model), fused,
                                       {"folded_by": "polygraphy" if prepared else None})


def _fp16_overflow(path: Path, context: CompileContext) -> str | None:
    """Run the saved FP16 model on a probe input; a reason to fall back when an output is NaN or Inf."""
    batch, (height, width) = 1, context.probe_size
    inputs = context.spec.sample_inputs(batch, height, width)
    outputs = OrtRunner(path, OrtOptions(providers=("CPUExecutionProvider",)), "fp16").run(inputs)
    bad = [n for n, v in outputs.items() if not np.isfinite(v).all()]
    if bad:
        return (f"FP16 {', '.join(bad)} not finite (NaN/Inf) on a probe input at {batch}x{height}x{width}: "
                f"fell back to FP32")
    return None


def load(artifact: Path, options: OrtOptions | None = None, precision: str | None = None) -> OrtRunner:
    """A Runner for an ONNX file."""
    return OrtRunner(artifact, options or OrtOptions(), precision or "fp32")


def load_tapped(artifact: Path, options: OrtOptions | None, precision: str | None, taps: list[str]) -> OrtRunner:
    """A Runner that also returns the graph's tensors named `taps`."""
    return OrtRunner(artifact, options or OrtOptions(), precision or "fp32", taps=tuple(taps))


def patch_weights(artifact: Path, dest: Path, changes: list[Any]) -> dict[str, str]:
    """Write `artifact` (ONNX, external data included) to `dest` with changed weights in place of the old ones."""
    return patch_onnx(artifact, dest, changes)


def load_with_changes(artifact: Path, options: OrtOptions | None, precision: str | None,
                      changes: list[Any]) -> OrtRunner:
    """A Runner whose session takes changed weights as initializer overrides: a LoRA at run time, no new files."""
    return OrtRunner(artifact, options or OrtOptions(), precision or "fp32", onnx_replacements(artifact, changes))

