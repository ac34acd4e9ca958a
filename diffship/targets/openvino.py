"""OpenVINO target: ONNX -> OpenVINO IR per component (FP32, FP16, weight-only INT8/INT4, calibrated INT8 with NNCF).

The IR is converted from the ONNX export rather than traced again from torch: it is the graph that
already passed parity, OpenVINO's ONNX frontend reads it (external data included) without Python model
code, and every target then starts from the same bytes. Files follow optimum-intel's layout
(`<component>/openvino_model.xml` + `.bin`) under diffusers' model_index.json, so its OVDiffusionPipeline and
OpenVINO GenAI's pipelines load the folder.

The CPU plugin runs an FP32 IR in bf16 on CPUs with AVX-512 BF16 unless told otherwise, so each
precision sets `INFERENCE_PRECISION_HINT` explicitly and the Runner reports the one actually used.
"""

from __future__ import annotations

import shutil
import weakref
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import openvino as ov
from pydantic import field_validator

from diffship.errors import DiffshipError
from diffship.host.memory import anonymous_bytes, budget, release_freed
from diffship.models.families import family_named
from diffship.store.artifacts import atomic_write_json, read_json
from diffship.store.cache import cache_root, unwritable_reason
from diffship.targets import CompileContext, calibration_inputs
from diffship.targets.accuracy_gate import gated_outputs, probe_inputs
from diffship.targets.onnx_weights import fp32_bytes
from diffship.targets.openvino_auto import quantize_auto
from diffship.targets.openvino_ir import as_clients_feed, check_scratch_disk, own_input_names, save_ir, through_disk
from diffship.targets.openvino_nncf import compress_matmul_weights as compress_matmul_weights
from diffship.targets.openvino_nncf import ignored_patterns, quantize_kwargs
from diffship.targets.openvino_nncf import quantize_calibrated as quantize_calibrated
from diffship.targets.openvino_streamed import NotStreamable, compressed_model
from diffship.targets.options import TargetOptions
from diffship.targets.ov_tokenizers import write_tokenizer_models
from diffship.targets.ovms import write_graph
from diffship.targets.records import Description
from diffship.targets.weight_patch import ir_replacements, patch_ir

NAME = "openvino"
XML = "openvino_model.xml"
PRECISIONS = ("fp32", "fp16", "bf16", "int8-weights", "int4-weights", "int8-hybrid", "int8-full", "int8-auto")
CALIBRATED = ("int8-hybrid", "int8-full", "int8-auto")
DEVICES = ("CPU", "GPU", "NPU", "AUTO", "HETERO", "MULTI")
HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
# What each precision computes in, unless the options say otherwise. FP32 and FP16 IRs run in f32 (FP16
# weights are upcast); the quantized modes run their remaining float ops in bf16, the fast path here.
INFERENCE_PRECISION = {"fp32": "f32", "fp16": "f32", "bf16": "bf16", "int8-weights": "bf16", "int4-weights": "bf16",
                       "int8-hybrid": "bf16", "int8-full": "bf16", "int8-auto": "bf16"}
SEARCH_FILE = "diffship-search.json"  # what int8-auto's search tried and kept, beside the IR
PATCHABLE = ("fp32", "fp16", "bf16")  # precisions whose IR constants a LoRA swap can overwrite in place


class OvOptions(TargetOptions):
    """Device, performance hint, inference precision (None: per precision), compiled-model cache, NNCF settings."""

    title: ClassVar[str] = "OpenVINO"

    device: str = "CPU"
    performance_hint: str = "LATENCY"
    inference_precision: Literal["f32", "bf16", "f16"] | None = None
    cache_dir: str | None = None  # None: the diffship cache; "" turns OpenVINO's model cache off
    int4_group_size: int = 128
    smooth_quant_alpha: float = 0.15
    preset: Literal["mixed", "performance"] = "mixed"  # NNCF: asymmetric activations, or symmetric
    bias_correction: bool = False  # NNCF's fast bias correction: +1.4 GiB peak on the SD 1.5 UNet for no gain seen
    static_shapes: bool = True  # reshape to static shapes when the recipe fixes batch and resolution
    # int8-hybrid's denoiser MatMuls with weights: "w8a8" quantizes their activations too; "w8" compresses their
    # weights data-free first and calibrates only the rest (optimum-intel's hybrid order, SmoothQuant off): less memory.
    matmuls: Literal["w8a8", "w8"] = "w8a8"
    # What the calibrated pass quantizes the activations of: "all" it can, or only "convolutions". Its statistics
    # reducers keep tensors alive and break the CPU plugin's fusions: on sdxl-arch at 1024x1024 with w8, "all" holds
    # 20.8 GiB, "convolutions" 12.0 (docs/performance.md).
    activations: Literal["all", "convolutions"] = "all"
    # int8-weights / int4-weights weight by weight from the export's data file (true, false, or "auto": where the
    # converter's copy of the FP32 weights would not fit), never holding them whole: a 12B transformer's path
    streamed: bool | Literal["auto"] = "auto"

    @field_validator("performance_hint")
    @classmethod
    def _hint(cls, value: str) -> str:
        if value.upper() not in HINTS:
            raise ValueError(f"Unknown OpenVINO performance_hint {value!r}; choose {', '.join(HINTS)}.")
        return value


def writes_artifacts(precision: str, options: Any = None) -> bool:
    """Every OpenVINO precision is a new IR."""
    return True


def needs_calibration(precision: str) -> bool:
    """The activation-quantized modes are calibrated on captured inputs."""
    return precision in CALIBRATED


def model_index(family: str, components: list[str]) -> dict[str, Any] | None:
    """None: the export's own model_index.json (diffusers' form): OpenVINO GenAI reads only diffusers' class names, and
    optimum-intel's OVDiffusionPipeline picks its class from `_class_name` and loads `<component>/openvino_model.xml`."""
    return None


def parse_options(options: dict[str, Any]) -> OvOptions:
    """The recipe's OpenVINO options, with unknown keys and values named, and the device checked on this machine."""
    parsed = OvOptions.parse(options)
    check_device(parsed.device)
    return parsed


def check_device(device: str, core: ov.Core | None = None) -> None:
    """Refuse an unknown device name, or a real device that is not present, naming the ones that are."""
    base = device.split(":")[0].split(".")[0].upper()
    if base not in DEVICES:
        raise DiffshipError(f"Unknown OpenVINO device {device!r}; devices are {', '.join(DEVICES)} (e.g. CPU, GPU.0, AUTO).")
    if base in ("CPU", "GPU", "NPU"):
        available = (core or ov.Core()).available_devices
        named = device.upper() in available
        any_of_kind = "." not in device and any(d.split(".")[0] == base for d in available)
        if not (named or any_of_kind):
            raise DiffshipError(f"OpenVINO device {device!r} is not present on this machine; available: {', '.join(available)}.")


def compile(source: Path, precision: str, options: OvOptions | None = None, dest: Path | None = None,
            context: CompileContext | None = None) -> Path:
    """Convert one ONNX component to IR in `dest` at `precision`; return the .xml path."""
    import nncf  # optional: openvino

    options = options or OvOptions()
    if precision not in PRECISIONS:
        raise DiffshipError(f"OpenVINO precision {precision!r} is unknown; choose {', '.join(PRECISIONS)}.")
    if dest is None or context is None:
        raise DiffshipError("OpenVINO compile needs an output folder and the component it converts.")
    # int8-hybrid's quantized MatMuls with INT8 weights alone go through IRs on disk (below): their room, up front
    through_scratch = precision == "int8-hybrid" and options.matmuls == "w8" and context.spec.denoises
    if through_scratch:
        check_scratch_disk(source, dest, f"{context.spec.name} {precision}")
    # weight-only INT8 (int8-hybrid's text encoders and VAE too), INT4, or FP16-stored weights: weight by weight,
    # never the FP32 weights whole (openvino_streamed.py)
    weight_only = precision in WEIGHT_ONLY or (precision == "int8-hybrid" and not context.spec.denoises)
    model, streamed = None, (weight_only or precision in ("fp16", "bf16")) and streams(source, options)
    if streamed:
        compress = weight_only_settings(precision, options) if weight_only else None
        try:
            model = compressed_model(source, compress, {"mode": nncf.CompressWeightsMode.INT8_ASYM})
        except NotStreamable:
            if options.streamed is True:
                raise
            streamed = False  # "auto": a graph of other layers (a VAE's convolutions) is converted whole
    if model is None:
        model = ov.convert_model(str(source))
    own_input_names(model, [t.name for t in context.spec.inputs])
    if options.static_shapes and context.static_shapes:
        model.reshape({name: ov.PartialShape(list(shape)) for name, shape in context.static_shapes.items()})
    # int8-auto searches the denoiser and each deep-cache graph on its own real steps (hybrid's fixed recipe failed
    # the caching graph's features on digits-sd where the UNet's search had to keep 72 of 114 activations in float)
    searched = context.spec.is_denoiser or context.spec.deep_cache_graph
    hybrid = precision == "int8-hybrid"
    quantize = precision == "int8-full" or (hybrid and context.spec.denoises)
    if precision == "int8-auto" and searched:
        model, search = _auto(model, context, options)
        dest.mkdir(parents=True, exist_ok=True)
        atomic_write_json(dest / SEARCH_FILE, search)
    elif quantize:
        calls = calibration_inputs(context, precision)
        kept = context.spec.denoiser.sensitive.kept_float if hybrid else ()
        sensitive, compressed = ignored_patterns(kept), []
        if through_scratch:
            # Each step reads the last one's IR back and frees its input: the converter holds up to 1.9x the FP32
            # weights, and compressing beside it would add the INT8 copies and the writer's buffers on top.
            model = through_disk(model, dest / "scratch-converted")
            release_freed()
            model, compressed = compress_matmul_weights(model, sensitive)
            model = through_disk(model, dest / "scratch-compressed")
            release_freed()
            # Nothing maps the converted IR now: its 4 bytes per weight go before calibration adds the final IR.
            shutil.rmtree(dest / "scratch-converted", ignore_errors=True)
        model = quantize_calibrated(model, calls, options, sensitive, compressed)
    elif precision in ("int8-weights", "int8-hybrid", "int8-auto", "int4-weights") and not (streamed and weight_only):
        model = nncf.compress_weights(model, **weight_only_settings(precision, options))
    model = as_clients_feed(model, whole_timesteps=not context.spec.in_denoising_loop
                            or context.spec.denoiser.whole_timesteps)
    # Where OpenVINO keeps a model's runtime options. The CPU plugin of 2026.4 applies only its KV-cache and
    # dynamic-quantization keys from there (Config::applyRtInfo), so clients pass this hint themselves
    # (docs/deploy.md); it is recorded here so the IR says what it was validated in.
    model.set_rt_info(inference_precision(precision, options), ["runtime_options", "INFERENCE_PRECISION_HINT"])
    dest.mkdir(parents=True, exist_ok=True)
    xml = dest / XML
    save_ir(model, xml, compress_to_fp16=precision != "fp32")
    for scratch in dest.glob("scratch-*"):  # through_disk's IRs, not part of the artifact
        shutil.rmtree(scratch, ignore_errors=True)
    return xml


WEIGHT_ONLY = ("int8-weights", "int4-weights")
# OpenVINO's ONNX converter holds up to 1.9x the FP32 weights (measured on sdxl-arch's UNet, issue 23)
WHOLE_MODEL_PEAK = 1.9


def weight_only_settings(precision: str, options: OvOptions) -> dict[str, Any]:
    """nncf.compress_weights' arguments for a precision's weight-only compression (INT8 unless int4-weights)."""
    import nncf  # optional: openvino

    if precision != "int4-weights":
        return {"mode": nncf.CompressWeightsMode.INT8_ASYM}
    from nncf.quantization.advanced_parameters import GroupSizeFallbackMode  # optional: openvino

    # Layers whose width the group size does not divide get the largest group size that does.
    return {"mode": nncf.CompressWeightsMode.INT4_SYM, "group_size": options.int4_group_size,
            "advanced_parameters": nncf.AdvancedCompressionParameters(
                group_size_fallback_mode=GroupSizeFallbackMode.ADJUST)}


def streams(source: Path, options: OvOptions) -> bool:
    """Whether a compile that can go weight by weight does: the options' `streamed`, or for "auto" whether the
    converter's copy of the weights (in FP32, as it upcasts them) would outgrow the memory budget."""
    return streams_bytes(fp32_bytes(source), options)


def streams_bytes(weights: int, options: OvOptions) -> bool:
    """`streams` for `weights` bytes of FP32 weights (what the preflight asks before the export exists)."""
    if options.streamed != "auto":
        return bool(options.streamed)
    return WHOLE_MODEL_PEAK * weights > budget()


def inference_precision(precision: str | None, options: OvOptions | None = None) -> str | None:
    """What a set at `precision` computes its float ops in: the options' choice, else the precision's own."""
    return (options.inference_precision if options else None) or INFERENCE_PRECISION.get(precision or "")


def _auto(model: ov.Model, context: CompileContext, options: OvOptions) -> tuple[ov.Model, dict[str, Any]]:
    """The UNet through the accuracy-aware search; weight-only INT8 when the search cannot meet the gate."""
    import nncf  # optional: openvino


    if context.gate is None:
        raise DiffshipError("int8-auto needs the recipe's INT8 gate for the denoiser.")
    calls = calibration_inputs(context, "int8-auto")
    say = context.say or (lambda _: None)
    config = {"INFERENCE_PRECISION_HINT": options.inference_precision or INFERENCE_PRECISION["int8-auto"]}
    probes = probe_inputs(context.spec, context.gate)
    quantized, record = quantize_auto(model, calls, probes, context.gate, quantize_kwargs(options), config, say,
                                     gated_outputs(context.spec), context.spec.denoiser.sensitive.searched_first)
    if quantized is None:
        say(f"      int8-auto fell back to weight-only INT8: {record['fell_back']}")
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM), record
    say(f"      int8-auto kept {len(record['kept_in_float'])} layer(s) in float; real-step score "
        f"{record['chosen_score']:.5f} in {record['seconds']:.0f} s")
    return quantized, record


def _public_name(port: Any) -> str:
    """The ONNX graph's name for a port. Static reshaping can fold a node into an input and give its tensor the
    node's internal name ('/unet/Expand_output_0') beside the real one ('timestep'); prefer the real one."""
    names = sorted(port.get_names())
    return next((n for n in names if not n.startswith("/")), port.any_name)


def default_cache_dir() -> Path | None:
    """OpenVINO's compiled-model cache under diffship's cache folder; none when that cannot be written."""
    return cache_root() / "openvino-model-cache" if unwritable_reason() is None else None


# OpenVINO's CPU plugin keeps a compiled model's activation buffers after each call (sd35m-arch at 1024x1024: 2.3 GiB
# for the VAE decoder, 2.9 GiB beyond its weights for the transformer; benchmarks/runtime_held.py), so a set held whole
# kept every component's at once and was killed at 20 GiB (issue 45). When another model runs and the process holds
# more than this share of the memory budget, the last one's are released (`CompiledModel.release_memory`; its repacked
# weights stay, and its next call allocates them again: about 13 % of the VAE decoder's call at 512x512).
SCRATCH_SHARE = 0.5
_last_run: list[weakref.ref[Any]] = []


def _release_last(runner: OvRunner) -> None:
    """Release the activation buffers of the model that ran last, when it is another and memory is short."""
    last = _last_run[0]() if _last_run else None
    if last is not None and last is not runner and anonymous_bytes() > SCRATCH_SHARE * budget():
        last.compiled.release_memory()
    _last_run[:] = [weakref.ref(runner)]


class OvRunner:
    """A Runner over an OpenVINO compiled model (one infer request, reused)."""

    def __init__(self, path: Path, options: OvOptions, precision: str | None = None,
                 weights: dict[str, np.ndarray] | None = None, taps: tuple[str, ...] = ()):
        if not path.is_file():
            raise DiffshipError(f"No OpenVINO IR at {path}.")
        if not path.with_suffix(".bin").is_file():
            raise DiffshipError(f"{path} has no weights file {path.with_suffix('.bin').name} beside it; the IR is incomplete.")
        core = ov.Core()
        check_device(options.device, core)
        cache = default_cache_dir() if options.cache_dir is None else (Path(options.cache_dir) if options.cache_dir else None)
        config: dict[str, Any] = {"PERFORMANCE_HINT": options.performance_hint.upper()}
        inference = inference_precision(precision, options)
        if inference:
            config["INFERENCE_PRECISION_HINT"] = inference
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(cache)
        model: Any = str(path)
        if weights or taps:
            model = _with_constants(core.read_model(str(path)), weights or {})
            if taps:  # inner tensors as outputs, found by the ONNX names the conversion kept
                model.add_outputs(list(taps))
            config.pop("CACHE_DIR", None)  # a compiled blob cached for the file's graph must not serve these
        try:
            self.compiled = core.compile_model(model, options.device, config)
        except RuntimeError as exc:
            raise DiffshipError(f"OpenVINO could not compile {path} for {options.device}: {exc}") from exc
        self.request = self.compiled.create_infer_request()
        self.path, self.options, self.precision = path, options, precision
        self.input_names = tuple(_public_name(i) for i in self.compiled.inputs)
        self.output_names = tuple(next((n for n in sorted(o.get_names()) if n in taps), None) or _public_name(o)
                                  for o in self.compiled.outputs)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Infer on named arrays; outputs are copies (the request's own buffers are reused by the next call)."""
        if set(inputs) != set(self.input_names):
            raise DiffshipError(f"{self.path} takes inputs {list(self.input_names)}, got {sorted(inputs)}.")
        ports = dict(zip(self.input_names, self.compiled.inputs, strict=True))
        _release_last(self)
        result = self.request.infer({ports[name]: value for name, value in inputs.items()}, share_outputs=False)
        return {name: np.asarray(result[o]) for name, o in zip(self.output_names, self.compiled.outputs, strict=True)}

    def describe(self) -> Description:
        """Device, what it computes in (read back from the compiled model, not assumed), hint and versions."""
        prop = self.compiled.get_property
        computes_in = prop("INFERENCE_PRECISION_HINT").get_type_name()  # "f32", "bf16", "f16": what really runs
        devices = list(prop("EXECUTION_DEVICES"))
        return Description(NAME, f"OpenVINO {'+'.join(devices)} {computes_in}", search=_search_of(self.path),
                           details={"openvino": ov.__version__, "device": self.options.device,
                                    "execution_devices": devices, "inference_precision": computes_in,
                                    "performance_hint": str(prop("PERFORMANCE_HINT")), "ir_precision": self.precision})


def _search_of(path: Path) -> dict[str, Any] | None:
    """int8-auto's record beside the IR, where a search chose it."""
    sidecar = path.parent / SEARCH_FILE
    return read_json(sidecar) if sidecar.is_file() else None


def load(artifact: Path, options: OvOptions | None = None, precision: str | None = None) -> OvRunner:
    """A Runner for an IR .xml."""
    return OvRunner(artifact, options or OvOptions(), precision)


def load_tapped(artifact: Path, options: OvOptions | None, precision: str | None, taps: list[str]) -> OvRunner:
    """A Runner that also returns the graph's tensors named `taps`."""
    return OvRunner(artifact, options or OvOptions(), precision, taps=tuple(taps))


def patch_weights(artifact: Path, dest: Path, changes: list[Any]) -> dict[str, str]:
    """Write the IR `artifact` (.xml + .bin) to `dest` with changed weights over the old constants."""
    return patch_ir(artifact, dest, changes)


def _with_constants(model: ov.Model, weights: dict[str, np.ndarray]) -> ov.Model:
    """`model` with the named constants replaced by new values (a LoRA at run time; the file is not touched)."""
    constants = {op.get_friendly_name(): op for op in model.get_ops() if op.get_type_name() == "Constant"}
    for name, value in weights.items():
        new = ov.op.Constant(np.ascontiguousarray(value))
        for target in list(constants[name].output(0).get_target_inputs()):
            target.replace_source_output(new.output(0))
    return model


def load_with_changes(artifact: Path, options: OvOptions | None, precision: str | None, changes: list[Any]) -> OvRunner:
    """A Runner compiled from the IR with changed constants, in memory: a LoRA at run time, no new files."""
    return OvRunner(artifact, options or OvOptions(), precision, ir_replacements(artifact, changes))


def finish_set(set_dir: Path, components: dict[str, Path], precision: str, options: OvOptions, family: str,
               say: Any) -> None:
    """OpenVINO tokenizer models beside the set's tokenizers (OpenVINO GenAI tokenizes with them), and OpenVINO Model
    Server's graph.pbtxt with the set's inference precision."""
    write_tokenizer_models(set_dir, tuple(t for t, _ in family_named(family).tokenizers_in(set_dir)), say)
    inference = inference_precision(precision, options)
    write_graph(set_dir, {"INFERENCE_PRECISION_HINT": inference} if inference else {}, options.device)
