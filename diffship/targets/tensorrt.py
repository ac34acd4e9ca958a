"""TensorRT target: ONNX -> a serialized engine per component, built with TensorRT's Python API.

Every precision is built as a strongly typed network from an ONNX file already in that precision (FP16 by
ONNX Runtime's converter, INT8 / FP8 as Model Optimizer's QDQ UNet with the rest in FP16): TensorRT 10
recommends strong typing for explicit quantization and TensorRT 11 removed the FP16 / INT8 builder flags.
BF16 is the exception: diffship has no BF16 ONNX converter, so it uses TensorRT 10's BF16 builder flag.

Engines are not portable: each `model.plan` has an `engine.json` beside it with the GPU, compute capability,
TensorRT and CUDA versions it was built with, and loading it anywhere else fails with that message before
TensorRT sees the bytes. The Runner moves named tensors through torch CUDA tensors (no other CUDA binding
package), checks shapes against the engine's profile, and replays a CUDA graph when the profile is static.

TensorRT is imported only where an engine is built or run, so profiles, ONNX preparation, the compatibility
check and option parsing work (and are tested) on machines without it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnx import numpy_helper

from diffship.errors import DiffshipError
from diffship.models.loading import load_component
from diffship.store.artifacts import atomic_write_bytes, atomic_write_json
from diffship.store.cache import cache_root, unwritable_reason
from diffship.targets import CompileContext, calibration_inputs, onnx_graph, qdq_unet
from diffship.targets.accuracy_gate import probe_inputs
from diffship.targets.records import Description, read_record
from diffship.targets.tensorrt_auto import search_unet
from diffship.targets.tensorrt_onnx import computes_in as computes_in
from diffship.targets.tensorrt_onnx import prepare_onnx as prepare_onnx
from diffship.targets.tensorrt_options import (
    CALIBRATED,
    ENGINE,
    ENGINE_INFO,
    NAME,
    REFIT_WEIGHTS,
    Shape,
    TrtOptions,
    check_compatible,
    check_fp8,
    check_shape,
    cuda_device,
    load_tensorrt,
    profile_shapes,
)
from diffship.targets.tensorrt_options import PATCHABLE as PATCHABLE
from diffship.targets.tensorrt_options import PRECISIONS as PRECISIONS
from diffship.targets.tensorrt_options import environment as environment
from diffship.targets.tensorrt_options import model_index as model_index
from diffship.targets.tensorrt_options import needs_calibration as needs_calibration
from diffship.targets.tensorrt_options import parse_options as parse_options
from diffship.targets.tensorrt_options import preflight as preflight
from diffship.targets.tensorrt_options import writes_artifacts as writes_artifacts
from diffship.targets.weight_patch import onnx_replacements, patch_onnx

# What a farm task of each stage needs besides CPU and memory: an engine is built and timed on the GPU kind it will
# run on (the build's [builds.farm] accelerator_type).
STAGE_RESOURCES = {"compile": "accelerator", "validate": "accelerator"}


# --- building -----------------------------------------------------------------------------------------------


def default_timing_cache(env: dict[str, str]) -> Path:
    """One timing cache per GPU model and TensorRT version in diffship's cache (timings are only valid there)."""
    slug = "-".join(env[k] for k in ("gpu", "compute_capability", "tensorrt", "cuda"))
    return cache_root() / "tensorrt-timing" / ("".join(c if c.isalnum() or c in ".-" else "_" for c in slug) + ".cache")


def timing_cache_path(options: TrtOptions, env: dict[str, str]) -> Path | None:
    """Where the timing cache lives for these options, or None when it is off."""
    if options.timing_cache == "":
        return None
    if options.timing_cache:
        return Path(options.timing_cache)

    return default_timing_cache(env) if unwritable_reason() is None else None


def build_engine(onnx_path: Path, compute: str, profile: dict[str, tuple[Shape, Shape, Shape]],
                 options: TrtOptions, cache_file: Path | None) -> bytes:
    """Parse `onnx_path` and build a serialized engine with one optimization profile (TensorRT's Python API)."""
    trt = load_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    weakly_typed = compute == "bf16"
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if weakly_typed or strongly is None else 1 << int(strongly))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DiffshipError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    if options.workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 2**30))
    if (tf32 := getattr(trt.BuilderFlag, "TF32", None)) is not None:
        (config.clear_flag if compute == "fp32" else config.set_flag)(tf32)
    if weakly_typed:
        config.set_flag(trt.BuilderFlag.BF16)
    if options.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    shapes = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        shapes.set_shape(name, low, opt, high)
    config.add_optimization_profile(shapes)
    if cache_file is not None:
        timing = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
        config.set_timing_cache(timing, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DiffshipError(f"TensorRT could not build an engine from {onnx_path} (its log above says why).")
    if cache_file is not None:
        atomic_write_bytes(cache_file, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


def compile(source: Path, precision: str, options: TrtOptions | None = None, dest: Path | None = None,
            context: CompileContext | None = None) -> Path:
    """Build the engine for one ONNX component into `dest` (model.plan + engine.json); return the plan's path."""
    options = options or TrtOptions()
    if precision not in PRECISIONS:
        raise DiffshipError(f"TensorRT precision {precision!r} is unknown; choose {', '.join(PRECISIONS)}.")
    if dest is None or context is None or context.shape_ranges is None:
        raise DiffshipError("TensorRT compile needs an output folder, the component, and the recipe's shape ranges.")
    if not source.is_file():
        raise DiffshipError(f"No ONNX model at {source}.")
    env = environment(options)
    spec = context.spec
    compute, reason = computes_in(spec, precision, options)
    static = context.static_shapes if options.static_shapes else None
    profile = profile_shapes(spec, context.shape_ranges, context.opt_size or context.probe_size, context.guided,
                             options.opt_batch, static)
    dest.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"set_precision": precision, "computes_in": compute, **({"reason": reason} if reason else {})}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".trt-", dir=dest) as tmp:
        if compute in CALIBRATED:
            if compute == "fp8":
                check_fp8(env["compute_capability"], env["gpu"])
            source, record["quantization"] = _quantized_unet(Path(tmp) / "qdq", compute, options, context,
                                                             auto=precision == "int8-auto")
        # A refittable engine keeps the graph it was parsed from: its initializers are the engine's weight names.
        prepared = dest / REFIT_WEIGHTS if options.refit else Path(tmp) / "prepared.onnx"
        record["prepare"] = prepare_onnx(source, prepared, compute)
        cache_file = timing_cache_path(options, env)
        engine = build_engine(prepared, compute, profile, options, cache_file)
    plan = dest / ENGINE
    atomic_write_bytes(plan, engine)
    atomic_write_json(dest / ENGINE_INFO, {
        "environment": env, **record, "build_seconds": round(time.perf_counter() - began, 2),
        "profile": {name: [list(s) for s in shapes] for name, shapes in profile.items()},
        "static": static is not None, "timing_cache": str(cache_file) if cache_file else None,
        "options": options.model_dump()})
    return plan


def _quantized_unet(folder: Path, mode: str, options: TrtOptions, context: CompileContext,
                    auto: bool = False) -> tuple[Path, dict[str, Any]]:
    """Model Optimizer's QDQ UNet, calibrated on the captured calls (on the GPU), exported from the CPU; with `auto`,
    the layers kept in float are chosen by int8-auto's search on the real steps instead of by name."""
    if context.calibration is None or context.model_folder is None:
        raise DiffshipError(f"TensorRT {mode} needs the denoiser's calibration inputs and its PyTorch weights.")
    calls = calibration_inputs(context, mode)
    denoiser = load_component(context.model_folder, context.spec.module, context.allow_pickle)
    denoiser = denoiser.to(cuda_device(options.device))
    settings = (mode, options.smoothquant_alpha, options.conv_percentile)
    if auto:
        if context.gate is None:
            raise DiffshipError("int8-auto needs the recipe's INT8 gate for the denoiser.")
        info = search_unet(denoiser, calls, probe_inputs(context.spec, context.gate), context.gate,
                           lambda u: qdq_unet.quantize_unet(u, calls, *settings, keep_float=()),
                           context.say or (lambda _: None), context.spec.denoiser.sensitive.searched_first)
    else:
        info = qdq_unet.quantize_unet(denoiser, calls, *settings, keep_float=context.spec.denoiser.sensitive.trained_float)
    return qdq_unet.export_qdq(denoiser.cpu(), context.spec, folder, context.opset), info


# --- running ------------------------------------------------------------------------------------------------


def read_engine_info(plan: Path) -> dict[str, Any]:
    """The engine.json beside a plan, or a clear error when the plan or its record is missing."""
    return read_record(plan, ENGINE_INFO, "TensorRT engine")


class TrtRunner:
    """A Runner over one TensorRT engine: numpy in and out, torch CUDA tensors in between."""

    def __init__(self, plan: Path, options: TrtOptions, precision: str | None = None):
        self.info = read_engine_info(plan)
        check_compatible(self.info["environment"], environment(options), plan)
        trt = load_tensorrt()
        self.device = cuda_device(options.device)
        torch.cuda.set_device(self.device)
        # The logger and runtime must outlive the engine they deserialized.
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise DiffshipError(f"TensorRT could not load {plan} (its log above says why); rebuild it.")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = tuple(n for n in names if is_input[n])
        self.output_names = tuple(n for n in names if not is_input[n])
        self.dtypes = {n: _torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.profile = {n: tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(n, 0))
                        for n in self.input_names}
        self.static = all(low == high for low, _, high in self.profile.values())
        self.stream = torch.cuda.Stream(self.device)
        self.plan, self.options, self.precision = plan, options, precision
        self.graph: Any = None
        self.graph_note = "on" if options.cuda_graph and self.static else (
            "off (dynamic profile)" if options.cuda_graph else "off (cuda_graph = false)")

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Infer on named arrays; float outputs come back as float32 numpy."""
        outputs = self.run_torch({n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in inputs.items()})
        return {n: (t.float() if t.is_floating_point() else t).cpu().numpy() for n, t in outputs.items()}

    def run_torch(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Infer on named torch tensors (any device); outputs are CUDA tensors the caller owns."""
        if set(inputs) != set(self.input_names):
            raise DiffshipError(f"{self.plan} takes inputs {list(self.input_names)}, got {sorted(inputs)}.")
        for name, tensor in inputs.items():
            check_shape(name, tuple(tensor.shape), self.profile[name], self.plan)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # inputs made on the caller's stream
        with torch.cuda.stream(self.stream):  # copies, engine and graph all on the Runner's own stream
            feed = {n: t.to(self.device, self.dtypes[n]).contiguous() for n, t in inputs.items()}
            if self.graph_note == "on":
                outputs = self._replay(feed)
            else:
                outputs = self._bind(feed)
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    raise DiffshipError(f"TensorRT failed to run {self.plan} (its log above says why).")
        self.stream.synchronize()
        return outputs

    def _bind(self, feed: dict[str, Any]) -> dict[str, Any]:
        for name, tensor in feed.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {n: torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self.dtypes[n], device=self.device)
                   for n in self.output_names}
        for name, tensor in outputs.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        return outputs

    def _replay(self, feed: dict[str, Any]) -> dict[str, Any]:
        """Static engines: copy into fixed buffers and replay the captured graph (captured on the first call).
        Runs on the Runner's stream; the caller synchronizes."""
        if self.graph is None:
            self.buffers = {n: t.clone() for n, t in feed.items()}
            self.outputs = self._bind(self.buffers)
            # One plain run first: TensorRT applies deferred shape and address updates outside capture.
            self.context.execute_async_v3(self.stream.cuda_stream)
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=self.stream):
                    self.context.execute_async_v3(self.stream.cuda_stream)
            except RuntimeError as exc:
                self.graph_note = f"off (capture failed: {exc})"
                return {n: t.clone() for n, t in self.outputs.items()}  # the plain run above computed them
            self.graph = graph
        for name, tensor in feed.items():
            self.buffers[name].copy_(tensor)
        self.graph.replay()
        return {n: t.clone() for n, t in self.outputs.items()}

    def describe(self) -> Description:
        """What runs: TensorRT version, GPU, what the component computes in, its profile and CUDA graph use."""
        env = self.info["environment"]
        q = self.info.get("quantization")
        graph = {**self.info.get("prepare", {}), "reason": self.info.get("reason", ""),
                 "quantization": f"Model Optimizer {q['mode'].upper()}: linear {q['linear']}, conv inputs "
                                 f"{q['conv_inputs']}, {len(q['kept_float'])} layer(s) or patterns in float" if q else ""}
        return Description(
            NAME, f"TensorRT {env['tensorrt']} {env['gpu']} {self.info.get('computes_in', '')}, "
                  f"{'static' if self.static else 'dynamic'} profile, CUDA graph {self.graph_note}",
            self.precision, graph, search=(q or {}).get("search") or None,
            details={"tensorrt": env["tensorrt"], "gpu": env["gpu"], "compute_capability": env["compute_capability"],
                     "cuda": env["cuda"], "computes_in": self.info.get("computes_in"), "reason": self.info.get("reason"),
                     "static_profile": self.static, "cuda_graph": self.graph_note})


def _torch_dtype(trt_dtype: Any) -> Any:
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in table:
        raise DiffshipError(f"An engine input or output has TensorRT type {name}, which diffship cannot feed.")
    return table[name]


def load(artifact: Path, options: TrtOptions | None = None, precision: str | None = None) -> TrtRunner:
    """A Runner for an engine (checked against this machine before TensorRT reads it)."""
    return TrtRunner(artifact, options or TrtOptions(), precision)


def patch_weights(artifact: Path, dest: Path, changes: list[Any]) -> dict[str, str]:
    """Refit the engine `artifact` with changed weights into `dest`: the weights are found by value in the ONNX the
    engine was parsed from (kept by `refit = true`), patched there, and handed to TensorRT's Refitter by name."""
    weights = artifact.parent / REFIT_WEIGHTS
    if not weights.is_file():
        raise DiffshipError(f"{artifact} was not built refittable (no {REFIT_WEIGHTS} beside it): rebuild with --lora, "
                            "or build with [targets.options] refit = true to swap LoRAs later.")
    landed = patch_onnx(weights, dest.parent / REFIT_WEIGHTS, changes)
    values = onnx_replacements(weights, changes)
    trt = load_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(artifact.read_bytes())
    refitter = trt.Refitter(engine, logger)
    for name, value in values.items():
        if not refitter.set_named_weights(name, trt.Weights(np.ascontiguousarray(value))):
            raise DiffshipError(f"TensorRT will not refit weight {name} of {artifact}: rebuild with --lora.")
    # Weights fused with a changed one must be given again, unchanged, from the graph the engine was built from.
    missing = [n for n in refitter.get_missing_weights() if n not in values]
    if missing:
        graph = {t.name: t for t in onnx_graph.load(weights).graph.initializer}
        for name in missing:
            refitter.set_named_weights(name, trt.Weights(np.ascontiguousarray(numpy_helper.to_array(graph[name]))))
    if not refitter.refit_cuda_engine():
        raise DiffshipError(f"TensorRT could not refit {artifact} (its log above says why): rebuild with --lora.")
    atomic_write_bytes(dest, bytes(memoryview(engine.serialize())))
    shutil.copyfile(artifact.parent / ENGINE_INFO, dest.parent / ENGINE_INFO)
    return landed

