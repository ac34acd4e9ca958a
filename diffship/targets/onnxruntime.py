"""ONNX Runtime target: an exported ONNX file is the artifact; a Runner over an InferenceSession.

Providers are chosen from what is installed (CUDA before CPU unless the options say otherwise) and
the Runner reports the providers the session actually uses, so a silent CPU fallback is visible.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

from diffship.errors import DiffshipError
from diffship.store.artifacts import atomic_write_json
from diffship.targets import CompileContext, onnx_graph
from diffship.targets import onnxruntime_quantize as quantize
from diffship.targets.options import Names, VaeOptions, VaePrecision, vae_fp32_reason
from diffship.targets.records import Description
from diffship.targets.weight_patch import onnx_replacements, patch_onnx

NAME = "onnxruntime"
PRECISIONS = ("fp32", "fp16", "int8", "int8-auto")
INT8 = ("int8", "int8-auto")
# Optimizers that undo what INT8 needs: common-subexpression elimination merges the dedicated Q/DQ pairs again,
# leaving q/k/v projections in float (SD 1.5 UNet: 2.61 s with it, 2.25 s without).
INT8_DISABLED_OPTIMIZERS = ("CommonSubexpressionElimination",)
GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
EXECUTION_MODES = {"sequential": ort.ExecutionMode.ORT_SEQUENTIAL, "parallel": ort.ExecutionMode.ORT_PARALLEL}
# Providers that run FP16 kernels natively; on the others an FP16 model is checked for parity, not timed.
FP16_NATIVE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "DmlExecutionProvider")
GPU_PROVIDERS = FP16_NATIVE
# Precisions whose weights a LoRA swap can overwrite in place (the quantized ones need re-quantizing).
PATCHABLE = ("fp32", "fp16")


class OrtOptions(VaeOptions):
    """ONNX Runtime settings from the recipe's `[targets.options]`.

    providers: execution providers in order (None: TensorRT, CUDA, DirectML, CPU, as installed).
    graph_optimization / intra_op_threads / inter_op_threads / execution_mode: the session's own settings.
    optimize: prepare the graph (transformer fusions, then constant folding) instead of using the export as is:
    true, false, or "auto": on for GPU providers, whose fused kernels it targets, and for INT8 on the CPU (the
    quantized SD 1.5 UNet runs 1.10x faster from the prepared graph); off for FP32/FP16 on the CPU, where it
    measured no faster (docs/performance.md).
    fp16_keep_io_types: FP16 models keep FP32 inputs and outputs. vae_precision (`VaeOptions`; it was `fp16_vae`):
    "auto" keeps SDXL's VAE in FP32 (it overflows in FP16), "fp16"/"fp32" force it; any FP16 component whose probe
    output is not finite falls back to FP32.
    fp16_op_block_list: op types kept in FP32 besides ONNX Runtime's defaults.
    calibration_method / calib_max_intermediate_outputs: the denoiser's INT8 calibration.
    cpu_mem_arena: ONNX Runtime's CPU memory arena. Off, a session's activation memory is freed after each run
    instead of kept and grown: sd15-arch's FP32 UNet at 512x512, batch 2, held 5.63 GiB after two runs with it and
    3.48 without, at the same speed (issue 23; the 24 GiB recipes turn it off).
    """

    title: ClassVar[str] = "ONNX Runtime"

    providers: Names | None = None
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    optimize: bool | Literal["auto"] = "auto"
    fp16_keep_io_types: bool = True
    vae_precision: VaePrecision = "auto"
    fp16_op_block_list: Names = ()
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    # Reduce calibration statistics every this many samples (0: at the end), bounding what is held in memory.
    calib_max_intermediate_outputs: int = 0
    cpu_mem_arena: bool = True


def parse_options(options: dict[str, Any]) -> OrtOptions:
    """The recipe's `[targets.options]` for ONNX Runtime, with unknown keys and values named."""
    return OrtOptions.parse(options)


def default_providers() -> tuple[str, ...]:
    """The best providers the installed onnxruntime has: TensorRT, CUDA, DirectML, then CPU."""
    available = ort.get_available_providers()
    return tuple(p for p in (*FP16_NATIVE, "CPUExecutionProvider") if p in available)


def _providers(options: OrtOptions) -> tuple[str, ...]:
    requested = options.providers or default_providers()
    missing = [p for p in requested if p not in ort.get_available_providers()]
    if missing:
        raise DiffshipError(
            f"Execution provider(s) {', '.join(missing)} are not available in this onnxruntime "
            f"(available: {', '.join(ort.get_available_providers())})."
        )
    return requested


def prepares_graph(options: OrtOptions, precision: str = "fp32") -> bool:
    """Whether compile prepares (fuses, folds) the graph for these options and precision."""
    if options.optimize == "auto":
        return _providers(options)[0] in GPU_PROVIDERS or precision in INT8
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
        if context.spec.is_denoiser or (context.spec.denoises and precision == "int8"):
            with tempfile.TemporaryDirectory(prefix=".prepared-", dir=dest) as tmp:
                record = {}
                if prepares_graph(options, precision):
                    prepared = Path(tmp) / source.name
                    record = _prepare(source, prepared, name, "int8", options, context)
                    source, large = prepared, (Path(tmp) / f"{source.name}_data").is_file()
                settings = (source, out, context, options.calibration_method, options.calib_max_intermediate_outputs, large)
                if precision == "int8":
                    record |= quantize.quantize_unet(*settings)
                else:
                    record |= quantize.quantize_auto(*settings, lambda path, p: OrtRunner(path, options, p))
        elif context.spec.role == "text_encoder":
            with quantize.quiet_root_logger():
                quantize_dynamic(source, out, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                                 use_external_data_format=large)
            record = {"quantization": "dynamic INT8 MatMul weights, activations quantized per call"}
        else:
            _link_export(source, dest)
            record = {"kept": "fp32", "reason": "VAE activations lose too much in INT8" if context.spec.role.startswith(
                "vae") else "ControlNet components are not calibrated yet (their residual inputs are not captured)"}
    else:
        record = _prepare(source, out, name, precision, options, context)
    atomic_write_json(dest / onnx_graph.GRAPH_FILE, {"precision": precision, **record})
    return out


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
        gpu = _providers(options)[0] in GPU_PROVIDERS
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


def _session_options(options: OrtOptions) -> ort.SessionOptions:
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = GRAPH_LEVELS[options.graph_optimization]
    session_options.intra_op_num_threads = options.intra_op_threads
    session_options.inter_op_num_threads = options.inter_op_threads
    session_options.execution_mode = EXECUTION_MODES[options.execution_mode]
    session_options.log_severity_level = 3
    session_options.enable_cpu_mem_arena = options.cpu_mem_arena
    return session_options


class OrtRunner:
    """A Runner over an onnxruntime.InferenceSession, FP32 arrays in and out whatever the model's I/O types."""

    def __init__(self, path: Path, options: OrtOptions, precision: str = "fp32",
                 weights: dict[str, np.ndarray] | None = None):
        requested = _providers(options)
        session_options = _session_options(options)
        # Initializers given to the session replace the file's (a LoRA at run time); ONNX Runtime reads them from
        # these arrays, which must outlive the session.
        self._weights = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in (weights or {}).items()}
        for name, value in self._weights.items():
            session_options.add_initializer(name, value)
        try:
            disabled = list(INT8_DISABLED_OPTIMIZERS) if precision in INT8 else []
            if self._weights:
                # onnxruntime 1.32's NCHWc layout pass re-lays Conv filters from the file's initializer, not the
                # override (found here: a LoRA's convolution updates were lost at level "all", kept without it).
                disabled.append("NchwcTransformer")
            self.session = ort.InferenceSession(str(path), session_options, providers=list(requested),
                                                disabled_optimizers=disabled)
        except Exception as exc:  # onnxruntime raises its own untyped errors for a bad file
            raise DiffshipError(f"ONNX Runtime could not load {path}: {exc}") from exc
        used = self.session.get_providers()
        if used[0] != requested[0]:
            # onnxruntime drops a provider whose libraries fail to load and carries on with the next one.
            raise DiffshipError(f"ONNX Runtime was asked for {requested[0]} but the session runs on {used[0]} "
                                f"(its libraries did not load); set providers explicitly to run on {used[0]}.")
        self.path, self.options, self.precision = path, options, precision
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self._input_types = {i.name: np.float16 if i.type == "tensor(float16)" else None for i in self.session.get_inputs()}
        sidecar = path.parent / onnx_graph.GRAPH_FILE
        self.graph = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else None

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session on named arrays; missing or unexpected names are an error, not a guess."""
        if set(inputs) != set(self.input_names):
            raise DiffshipError(f"{self.path} takes inputs {list(self.input_names)}, got {sorted(inputs)}.")
        feed = {n: v.astype(self._input_types[n]) if self._input_types[n] else v for n, v in inputs.items()}
        outputs = self.session.run(list(self.output_names), feed)
        return {n: v.astype(np.float32) if v.dtype == np.float16 else v
                for n, v in zip(self.output_names, outputs, strict=True)}

    def describe(self) -> Description:
        providers = self.session.get_providers()
        precision = self.precision
        if self.graph and self.graph.get("kept"):
            precision = f"{self.graph['kept']} (kept)"
        skipped = None
        if self.precision == "fp16" and providers[0] not in FP16_NATIVE:
            skipped = (f"{providers[0]} has no native FP16 kernels for most ops, so FP16 latency here says nothing "
                       "about a GPU; parity only")
        return Description(
            NAME, f"ONNX Runtime {providers[0].removesuffix('ExecutionProvider')} {self.precision}", precision,
            graph={k: v for k, v in (self.graph or {}).items() if k != "search"},
            search=(self.graph or {}).get("search") or None, latency_skipped=skipped,
            details={"onnxruntime": ort.__version__, "providers": providers,
                     "graph_optimization": self.options.graph_optimization,
                     "threads": {"intra_op": self.options.intra_op_threads, "inter_op": self.options.inter_op_threads},
                     "disabled_optimizers": list(INT8_DISABLED_OPTIMIZERS) if self.precision in INT8 else []})


def load(artifact: Path, options: OrtOptions | None = None, precision: str | None = None) -> OrtRunner:
    """A Runner for an ONNX file."""
    return OrtRunner(artifact, options or OrtOptions(), precision or "fp32")


def patch_weights(artifact: Path, dest: Path, changes: list[Any]) -> dict[str, str]:
    """Write `artifact` (ONNX, external data included) to `dest` with changed weights in place of the old ones."""
    return patch_onnx(artifact, dest, changes)


def load_with_changes(artifact: Path, options: OrtOptions | None, precision: str | None,
                      changes: list[Any]) -> OrtRunner:
    """A Runner whose session takes changed weights as initializer overrides: a LoRA at run time, no new files."""
    return OrtRunner(artifact, options or OrtOptions(), precision or "fp32", onnx_replacements(artifact, changes))

