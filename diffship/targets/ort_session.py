"""ONNX Runtime sessions as Runners, and their options: what the ONNX Runtime target runs its sets with, and what
the web and mobile targets check their graphs on (a layer below the targets, so none imports another for it).

Providers are chosen from what is installed (CUDA before CPU unless the options say otherwise) and the Runner
reports the providers the session actually uses, so a silent CPU fallback is visible.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import onnxruntime as ort

from diffship.errors import DiffshipError
from diffship.targets import onnx_graph
from diffship.targets.options import Names, VaeOptions, VaePrecision
from diffship.targets.records import Description

RUNTIME = "onnxruntime"  # the target a session's description names (the web and mobile targets put their own)
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
    streamed: int8's text encoders quantized one MatMul at a time (targets/onnxruntime_streamed.py).
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
    # int8's text encoders quantized one MatMul at a time from the export's data file (true, false, or "auto": where
    # quantizing the model whole would not fit, T5-XXL's 19 GB)
    streamed: bool | Literal["auto"] = "auto"
    # Reduce calibration statistics every this many samples (0: at the end), bounding what is held in memory.
    calib_max_intermediate_outputs: int = 0
    cpu_mem_arena: bool = True


def default_providers() -> tuple[str, ...]:
    """The best providers the installed onnxruntime has: TensorRT, CUDA, DirectML, then CPU."""
    available = ort.get_available_providers()
    return tuple(p for p in (*FP16_NATIVE, "CPUExecutionProvider") if p in available)


def providers(options: OrtOptions) -> tuple[str, ...]:
    requested = options.providers or default_providers()
    missing = [p for p in requested if p not in ort.get_available_providers()]
    if missing:
        raise DiffshipError(
            f"Execution provider(s) {', '.join(missing)} are not available in this onnxruntime "
            f"(available: {', '.join(ort.get_available_providers())})."
        )
    return requested


def _session_options(options: OrtOptions) -> ort.SessionOptions:
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = GRAPH_LEVELS[options.graph_optimization]
    session_options.intra_op_num_threads = options.intra_op_threads
    session_options.inter_op_num_threads = options.inter_op_threads
    session_options.execution_mode = EXECUTION_MODES[options.execution_mode]
    session_options.log_severity_level = 3
    session_options.enable_cpu_mem_arena = options.cpu_mem_arena
    return session_options


# A share of the memory budget beyond which a session keeps 16-bit stored weights as they are (`keeps_stored`)
STORED_SHARE = 0.5
EXTERNAL_GRAPH_BYTES = 1 << 26  # a graph whose weights are all external is a few MB


def keeps_stored(path: Path) -> bool:
    """Whether a session of `path` keeps its 16-bit weights behind their Casts, cast on each call, instead of letting
    constant folding upcast them all at load (a streamed export's `stored_weights`): where their FP32 form would take
    STORED_SHARE of the memory budget. T5-XXL is 9.5 GB stored and 19 GB folded; a call then casts each weight as it
    runs (a text encoder runs once per image, so the time is small beside the memory)."""
    from diffship.host.memory import budget  # start-up time: psutil, only for graphs with external weights
    from diffship.targets.onnx_weights import upcast_bytes  # start-up time: onnx

    # only a streamed export keeps weights behind Casts, and its weights are external: a larger file holds its own;
    # upcast, they take at most twice the external data, so a small model is not even parsed
    if path.suffix != ".onnx" or path.stat().st_size > EXTERNAL_GRAPH_BYTES:
        return False
    external = sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(f"{path.name}_data"))
    limit = STORED_SHARE * budget()
    return 2 * external > limit and upcast_bytes(path) > limit


class OrtRunner:
    """A Runner over an onnxruntime.InferenceSession, FP32 arrays in and out whatever the model's I/O types."""

    def __init__(self, path: Path, options: OrtOptions, precision: str = "fp32",
                 weights: dict[str, np.ndarray] | None = None, taps: tuple[str, ...] = ()):
        requested = providers(options)
        session_options = _session_options(options)
        # Initializers given to the session replace the file's (a LoRA at run time); ONNX Runtime reads them from
        # these arrays, which must outlive the session.
        self._weights = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in (weights or {}).items()}
        for name, value in self._weights.items():
            session_options.add_initializer(name, value)
        try:
            disabled = list(INT8_DISABLED_OPTIMIZERS) if precision in INT8 else []
            self.kept_stored = precision == "fp32" and keeps_stored(path)
            if self.kept_stored:
                disabled.append("ConstantFolding")
            if self._weights:
                # onnxruntime 1.32's NCHWc layout pass re-lays Conv filters from the file's initializer, not the
                # override (found here: a LoRA's convolution updates were lost at level "all", kept without it).
                disabled.append("NchwcTransformer")
            model: str | bytes = str(path)
            if taps:  # the graph (without its weights) with inner tensors as outputs; weights read from its folder
                model = _tapped(path, taps)
                session_options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                                         str(path.parent))
            self.session = ort.InferenceSession(model, session_options, providers=list(requested),
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
            RUNTIME, f"ONNX Runtime {providers[0].removesuffix('ExecutionProvider')} {self.precision}", precision,
            graph={k: v for k, v in (self.graph or {}).items() if k != "search"},
            search=(self.graph or {}).get("search") or None, latency_skipped=skipped,
            details={"onnxruntime": ort.__version__, "providers": providers,
                     "graph_optimization": self.options.graph_optimization,
                     "threads": {"intra_op": self.options.intra_op_threads, "inter_op": self.options.inter_op_threads},
                     "disabled_optimizers": list(INT8_DISABLED_OPTIMIZERS) if self.precision in INT8 else
                                            ["ConstantFolding"] if self.kept_stored else [],
                     **({"weights": "kept in 16 bits behind their Casts (cast per call): in FP32 they would take "
                                    f"{STORED_SHARE:.0%} of the memory budget or more"} if self.kept_stored else {})})


def _tapped(path: Path, taps: tuple[str, ...]) -> bytes:
    import onnx  # start-up time: onnx

    model = onnx.load(str(path), load_external_data=False)
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in taps if name not in known)
    return model.SerializeToString()
