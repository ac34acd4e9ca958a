"""Core ML target: each component -> an ML program package (`model.mlpackage`), converted with coremltools from the
same torch wrapper the ONNX export traced, in FP16 (FP32 on request), optionally with weights compressed by
coremltools' optimize API: 8-bit linear quantization, or 6 / 4-bit palettization (k-means look-up tables).

coremltools no longer converts ONNX, so this target starts from the PyTorch weights (`CompileContext.model_folder`).
The ONNX export stays the reference: each package's spec is checked against its names, dtypes and shapes.
Packages only run on macOS. Elsewhere they are converted and their specs verified, and the report says parity
was not run; it never reports it as passed.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import platform
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffship.errors import DiffshipError
from diffship.store.artifacts import atomic_write_json, staged_path
from diffship.targets import Case, CompileContext
from diffship.targets.coreml_attention import IMPLEMENTATIONS, use_attention
from diffship.targets.onnx_graph import vae_fp32_reason

if TYPE_CHECKING:
    from diffship.models.components import ComponentSpec

NAME = "coreml"
PACKAGE = "model.mlpackage"
INFO = "coreml.json"
PATCH_REFUSAL = ("Core ML packages keep their weights in the package's own weight blob, converted (and often "
                 "compressed) by coremltools, which offers no in-place update of converted weights: rebuild with --lora")
# What each precision does to the weights of the components named in the `compress` option (the rest are FP16).
COMPRESSION: dict[str, dict[str, Any] | None] = {
    "fp16": None,
    "fp32": None,
    "int8-weights": {"kind": "linear", "nbits": 8},
    "palette6": {"kind": "palette", "nbits": 6},
    "palette4": {"kind": "palette", "nbits": 4},
}
PRECISIONS = tuple(COMPRESSION)
# No client loads a Core ML package in optimum's layout: a text encoder's package holds the outputs the pipeline reads
# (`ComponentSpec.pipeline_outputs`); per-layer hidden states also break its naming (dots, one value twice).
CLIENT_OUTPUTS_KEPT = False
VAE_MODES = ("auto", "fp16", "fp32")
COMPUTE_UNITS = ("ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY")
OLDEST_TARGETS = {"iOS": 16, "macOS": 13, "tvOS": 16, "watchOS": 9}  # compressed weights (constexpr ops) need these
GROUPED_PALETTE_SPEC = 9  # per-grouped-channel look-up tables: iOS 18 / macOS 15
TORCH_MIN = "2.1.0"  # coremltools' own floor for its torch integration (_CT_OPTIMIZE_TORCH_MIN_VERSION)
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")
# The consumers whose constant inputs are compressed: layer weights and embedding tables. Other constants (the
# text encoder's causal mask, which holds -inf in FP16) must stay exact.
WEIGHT_CONSUMERS = ("linear", "conv", "conv_transpose", "matmul", "gather")
WEIGHT_ROLES = {"linear.weight", "conv.weight", "conv_transpose.weight", "matmul.x", "matmul.y", "gather.x"}


@dataclass(frozen=True)
class CoremlOptions:
    """Deployment target, attention, extra resolutions, what to compress and how, and how packages are run on a Mac."""

    minimum_deployment_target: str = "iOS18"
    attention: str = "split_einsum"  # Apple's converter's default, for the Neural Engine
    resolutions: tuple[tuple[int, int], ...] = ()  # more (height, width) the packages accept, as enumerated shapes
    vae_precision: str = "auto"  # auto: SDXL's VAE in FP32, the others FP16
    compress: tuple[str, ...] = ("unet",)  # the components the compressed precisions compress
    palette_group_size: int = 16  # output channels sharing one look-up table (per grouped channel, iOS 18+)
    weight_threshold: int = 2048  # weights with at most this many elements stay FP16 (coremltools' default)
    compute_units: str = "ALL"  # for prediction on macOS
    untested_torch: str = "warn"  # torch newer than coremltools has tested: "warn" and convert, or "refuse"
    require_parity: bool = False  # fail a set whose parity cannot run here (not on macOS) instead of spec-checking it


def parse_options(options: dict[str, Any]) -> CoremlOptions:
    """The recipe's Core ML options, with unknown keys and bad values named."""
    known = {f.name for f in fields(CoremlOptions)}
    if unknown := sorted(set(options) - known):
        raise DiffshipError(f"Unknown Core ML option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
    values = dict(options)
    try:
        values["resolutions"] = tuple((int(h), int(w)) for h, w in values.get("resolutions", ()))
    except (TypeError, ValueError):
        raise DiffshipError(f"Core ML resolutions must be [height, width] pairs, got {options['resolutions']!r}.") from None
    values["compress"] = tuple(values.get("compress", CoremlOptions.compress))
    parsed = CoremlOptions(**values)
    if parsed.attention not in IMPLEMENTATIONS:
        raise DiffshipError(f"Unknown Core ML attention {parsed.attention!r}; choose {', '.join(IMPLEMENTATIONS)}.")
    if parsed.vae_precision not in VAE_MODES:
        raise DiffshipError(f"Unknown Core ML vae_precision {parsed.vae_precision!r}; choose {', '.join(VAE_MODES)}.")
    if parsed.compute_units not in COMPUTE_UNITS:
        raise DiffshipError(f"Unknown Core ML compute_units {parsed.compute_units!r}; choose {', '.join(COMPUTE_UNITS)}.")
    if parsed.untested_torch not in ("warn", "refuse"):
        raise DiffshipError(f"Core ML untested_torch must be 'warn' or 'refuse', got {parsed.untested_torch!r}.")
    if bad := [c for c in parsed.compress if c not in COMPONENTS]:
        raise DiffshipError(f"Core ML compress names unknown component(s) {', '.join(bad)}; choose from {', '.join(COMPONENTS)}.")
    if any(h <= 0 or w <= 0 for h, w in parsed.resolutions):
        raise DiffshipError(f"Core ML resolutions must be positive, got {list(parsed.resolutions)}.")
    if parsed.palette_group_size < 1 or parsed.weight_threshold < 0:
        raise DiffshipError("Core ML palette_group_size must be at least 1 and weight_threshold at least 0.")
    spec_version(parsed.minimum_deployment_target)
    return parsed


# What a farm task of each stage needs besides CPU and memory: packages convert anywhere, but only macOS predicts, so
# validation (parity, images, latency) runs on a node with the custom `macos` resource.
STAGE_RESOURCES = {"validate": "macos"}


def writes_artifacts(precision: str, options: Any = None) -> bool:
    """Every Core ML precision is a new package."""
    return True


def needs_calibration(precision: str) -> bool:
    """Weight compression is data-free (k-means / min-max over the weights themselves)."""
    return False


def model_index(family: str, components: list[str]) -> dict[str, Any]:
    """model_index.json entries for a package folder (diffship's pipeline runs them; Apple's Swift one reads .mlmodelc)."""
    return {"_class_name": "DiffshipCoreMLPipeline", **{c: ["diffship", "CoreMLPackage"] for c in components}}


# --- coremltools, torch versions and deployment targets -------------------------------------------------------


def _ct() -> Any:
    """coremltools, imported without its import-time chatter (native proxies missing off macOS, untested torch),
    which diffship reports itself."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    import coremltools

    return coremltools


def torch_support() -> dict[str, Any]:
    """The torch in use against the range coremltools supports: floor, newest tested, and whether it is inside."""
    import torch
    from packaging.version import Version

    ct = _ct()
    from coremltools import _deps

    newest = getattr(_deps, "_TORCH_MAX_VERSION", None)
    current = Version(torch.__version__.split("+")[0])
    return {"torch": torch.__version__, "coremltools": ct.__version__, "minimum": TORCH_MIN, "newest_tested": newest,
            "supported": current >= Version(TORCH_MIN), "tested": newest is None or current <= Version(newest)}


def check_torch(options: CoremlOptions) -> dict[str, Any]:
    """Refuse a torch coremltools cannot convert from (or, with untested_torch = 'refuse', one it never tested)."""
    s = torch_support()
    window = f"{s['minimum']} to {s['newest_tested']}"
    if not s["supported"]:
        raise DiffshipError(f"coremltools {s['coremltools']} converts from torch {window}; this is torch {s['torch']}. "
                            f"Install a torch in that range for the Core ML target.")
    if not s["tested"] and options.untested_torch == "refuse":
        raise DiffshipError(f"torch {s['torch']} is newer than coremltools {s['coremltools']} has tested (it supports "
                            f"{window}), and the recipe says untested_torch = 'refuse'. Install a torch in that range, "
                            "or set untested_torch = 'warn' to convert anyway.")
    return s


def spec_version(target: str) -> int:
    """The Core ML specification version a deployment target name (iOS18, macOS15...) stands for; unknown or too
    old names are refused."""
    members = _ct().target.__members__
    if target not in members:
        names = [n for n in members if _platform_version(n)[1] >= OLDEST_TARGETS.get(_platform_version(n)[0], 99)]
        raise DiffshipError(f"Unknown Core ML minimum_deployment_target {target!r}; choose one of {', '.join(names)}.")
    system, version = _platform_version(target)
    if version < OLDEST_TARGETS.get(system, 99):
        raise DiffshipError(f"Core ML minimum_deployment_target {target} is too old: diffship's packages need "
                            f"{system}{OLDEST_TARGETS[system]} or newer (compressed weights and FP16 ML programs).")
    return int(members[target].value)


def _platform_version(name: str) -> tuple[str, int]:
    system = name.rstrip("0123456789_")
    return system, int(name[len(system):].split("_")[0] or 0)


def preflight(precisions: list[str], options: CoremlOptions) -> None:
    """Before any work: a torch coremltools converts from, and a deployment target that can hold the precisions."""
    check_torch(options)
    spec_version(options.minimum_deployment_target)


def prediction_unavailable() -> str | None:
    """Why Core ML prediction cannot run on this machine, or None where it can (macOS with coremltools' runtime)."""
    if platform.system() != "Darwin":
        return f"Core ML prediction needs macOS; this machine runs {platform.system()}"
    try:
        _ct()
        import coremltools.libcoremlpython  # noqa: F401  (the native runtime bridge, built only for macOS)
    except ImportError as exc:
        return f"coremltools' runtime bridge is missing ({exc})"
    return None


# --- conversion -----------------------------------------------------------------------------------------------


def package_shapes(context: CompileContext, options: CoremlOptions) -> list[dict[str, tuple[int, ...]]]:
    """The input shapes each package accepts: the validation resolution first (the default), then the extra
    resolutions from the options. Batch is the recipe's smallest; the UNet's is doubled under guidance."""
    spec = context.spec
    if context.static_shapes:
        first = dict(context.static_shapes)
        batch = next(iter(first.values()))[0]
    else:
        batch = spec.batch_for((context.shape_ranges or {"batch": [1, 1]})["batch"][0], context.guided)
        height, width = context.opt_size or context.probe_size
        sizes = spec.axis_sizes(batch, height, width)
        first = {t.name: t.concrete(sizes) for t in spec.inputs}
    sets = [first]
    for height, width in options.resolutions:
        sizes = spec.axis_sizes(batch, height, width)  # refuses a resolution this model cannot take
        shapes = {t.name: t.concrete(sizes) for t in spec.inputs}
        if shapes not in sets:
            sets.append(shapes)
    return sets


def compute_precision(precision: str, spec: ComponentSpec, options: CoremlOptions) -> tuple[str, str | None]:
    """What a component computes in ("fp16" / "fp32") and, when an FP16 set keeps it FP32, why."""
    if precision == "fp32":
        return "fp32", None
    reason = vae_fp32_reason(spec, options.vae_precision, "vae_precision")
    return ("fp32", reason) if reason else ("fp16", None)


def convert(wrapper: Any, spec: Any, shape_sets: list[dict[str, tuple[int, ...]]], compute: str, target: str) -> Any:
    """Trace `wrapper` on inputs of the first shape set and convert it to an ML program: inputs and outputs named as
    in the ONNX export, float32 I/O, enumerated shapes where the sets differ. Errors name the op that failed."""
    import torch

    ct = _ct()
    rng = np.random.default_rng(0)
    example = {t.name: _example(t, shape_sets[0][t.name], rng, spec) for t in spec.inputs}
    inputs = []
    for t in spec.inputs:
        shapes = [s[t.name] for s in shape_sets]
        shape: Any = shapes[0] if len(set(shapes)) == 1 else ct.EnumeratedShapes(shapes=shapes, default=shapes[0])
        inputs.append(ct.TensorType(name=t.name, shape=shape, dtype=np.dtype(t.dtype).type))
    outputs = [ct.TensorType(name=o.name, dtype=np.float32) for o in spec.outputs]
    args = tuple(torch.from_numpy(example[t.name]) for t in spec.inputs)
    # coremltools prints tqdm bars for every pass; the build prints its own step line per component.
    with torch.inference_mode(False), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        traced = torch.jit.trace(wrapper, args, strict=False, check_trace=False)
        try:
            return ct.convert(traced, inputs=inputs, outputs=outputs, convert_to="mlprogram",
                              compute_precision=ct.precision.FLOAT16 if compute == "fp16" else ct.precision.FLOAT32,
                              minimum_deployment_target=getattr(ct.target, target))
        except Exception as exc:  # coremltools raises NotImplementedError, ValueError, RuntimeError... naming the op
            support = torch_support()
            hint = "" if support["tested"] else (
                f" (torch {support['torch']} is newer than coremltools {support['coremltools']} has tested, "
                f"{support['minimum']} to {support['newest_tested']}; a torch in that range may convert it)")
            raise DiffshipError(f"Core ML could not convert {spec.name}: {type(exc).__name__}: {exc}{hint}") from exc


def _example(t: Any, shape: tuple[int, ...], rng: np.random.Generator, spec: Any) -> np.ndarray:
    if t.dtype.startswith("int"):
        return rng.integers(0, max(spec.vocab_size - 1, 2), size=shape).astype(t.dtype)
    return rng.standard_normal(size=shape).astype(t.dtype)


def compress_weights(mlmodel: Any, precision: str, options: CoremlOptions, spec_ver: int) -> tuple[Any, dict[str, Any]]:
    """8-bit symmetric per-channel linear quantization, or k-means palettization with one look-up table per group
    of output channels (iOS 18+; one per tensor before): the compressed model and what was done."""
    import coremltools.optimize.coreml as cto

    mode = COMPRESSION[precision]
    if mode is None:
        raise DiffshipError(f"Core ML precision {precision!r} does not compress weights.")
    # Constants that feed no layer weight stay exact. Keyed by name: MIL merges identical constants, so one
    # zero vector can be a layer norm's beta and a linear's bias at once, and a per-op-type rule would conflict.
    keep = dict.fromkeys(_non_weight_constants(mlmodel.get_spec()))

    def only_weights(config: Any) -> Any:
        return cto.OptimizationConfig(global_config=config, op_name_configs=keep)

    if mode["kind"] == "linear":
        config: Any = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                                  weight_threshold=options.weight_threshold)
        record = {"method": "linear_symmetric int8", "granularity": "per_channel"}
    else:
        grouped = spec_ver >= GROUPED_PALETTE_SPEC
        config = cto.OpPalettizerConfig(
            mode="kmeans", nbits=mode["nbits"], granularity="per_grouped_channel" if grouped else "per_tensor",
            group_size=options.palette_group_size, weight_threshold=options.weight_threshold)
        record = {"method": f"k-means palettization, {mode['nbits']}-bit",
                  "granularity": f"per_grouped_channel ({options.palette_group_size} channels)" if grouped else
                  "per_tensor (per grouped channel needs iOS18 / macOS15)"}
    began = time.perf_counter()
    # One process: coremltools' k-means worker pool forks, which hangs in a process whose PyTorch threads are up.
    optimize = cto.linear_quantize_weights if mode["kind"] == "linear" else cto.palettize_weights
    with contextlib.redirect_stderr(io.StringIO()):
        compressed = optimize(mlmodel, only_weights(config))
        if mode["kind"] == "palette" and grouped:
            # coremltools skips weights whose output channels are not a multiple of the group size; they get one
            # table per tensor in a second pass, so every weight above the threshold is compressed.
            before = _op_counts(compressed.get_spec())["constexpr_lut_to_dense"]
            compressed = optimize(compressed, only_weights(cto.OpPalettizerConfig(
                mode="kmeans", nbits=mode["nbits"], granularity="per_tensor", weight_threshold=options.weight_threshold)))
            record["per_tensor_fallback"] = _op_counts(compressed.get_spec())["constexpr_lut_to_dense"] - before
    return compressed, {**record, "weight_threshold": options.weight_threshold,
                        "seconds": round(time.perf_counter() - began, 2)}


def _operations(spec: Any) -> Iterator[Any]:
    """Every operation of an ML program spec, nested blocks included."""
    def walk(block: Any) -> Iterator[Any]:
        for op in block.operations:
            yield op
            for inner in op.blocks:
                yield from walk(inner)

    for function in spec.mlProgram.functions.values():
        yield from walk(function.block_specializations[function.opset])


def _feeds(spec: Any) -> dict[str, set[str]]:
    """For each value name, the op inputs it feeds, as "linear.weight", "layer_norm.beta"..."""
    feeds: dict[str, set[str]] = {}
    for op in _operations(spec):
        for role, value in op.inputs.items():
            for argument in value.arguments:
                if argument.WhichOneof("binding") == "name":
                    feeds.setdefault(argument.name, set()).add(f"{op.type}.{role}")
    return feeds


def _non_weight_constants(spec: Any) -> list[str]:
    """Names of the const ops whose values feed no layer weight or embedding table (masks, biases, norm scales)."""
    feeds = _feeds(spec)
    return [op.attributes["name"].immediateValue.tensor.strings.values[0] for op in _operations(spec)
            if op.type == "const" and not feeds.get(op.outputs[0].name, set()) & WEIGHT_ROLES]


def _op_counts(spec: Any) -> Counter[str]:
    return Counter(op.type for op in _operations(spec))


def compile(source: Path, precision: str, options: CoremlOptions | None = None, dest: Path | None = None,
            context: CompileContext | None = None) -> Path:
    """Convert one component from its PyTorch weights into `dest/model.mlpackage` (with coreml.json beside it:
    how it was made, the ONNX export's I/O it must match, and what the package holds); return the package path."""
    from diffship import __version__
    from diffship.exporters.onnx import onnx_io
    options = options or CoremlOptions()
    if precision not in PRECISIONS:
        raise DiffshipError(f"Core ML precision {precision!r} is unknown; choose {', '.join(PRECISIONS)}.")
    if dest is None or context is None or context.model_folder is None:
        raise DiffshipError("Core ML compile needs an output folder, the component and the model folder it converts "
                            "from (coremltools converts PyTorch, not ONNX).")
    if not source.is_file():
        raise DiffshipError(f"No ONNX export at {source}: Core ML packages are checked against it.")
    support = check_torch(options)
    target_spec = spec_version(options.minimum_deployment_target)
    spec = context.spec.pipeline_outputs()  # no client loads a Core ML package in optimum's layout
    shape_sets = package_shapes(context, options)
    compute, reason = compute_precision(precision, spec, options)

    base, converted = converted_package(context, spec, compute, shape_sets, options)
    mlmodel = _ct().models.MLModel(str(base / PACKAGE), skip_model_load=True)
    compression = None
    if COMPRESSION[precision] and spec.name in options.compress:
        mlmodel, compression = compress_weights(mlmodel, precision, options, target_spec)

    mlmodel.author = "diffship"
    mlmodel.version = __version__
    # Packages are cached by their ONNX file's hash, which models sharing a component share: no model name here.
    mlmodel.short_description = f"{spec.name} of a Stable Diffusion pipeline, converted by diffship {__version__}"
    for tensors, described in ((spec.inputs, mlmodel.input_description), (spec.outputs, mlmodel.output_description)):
        for t in tensors:
            described[t.name] = _DESCRIPTIONS.get((spec.name, t.name)) or _DESCRIPTIONS.get(t.name, t.name)
    mlmodel.user_defined_metadata.update({
        "diffship.version": __version__,
        "diffship.component": spec.name, "diffship.precision": precision, "diffship.compute_precision": compute,
        "diffship.attention": options.attention, "diffship.compression": json.dumps(compression) if compression else "none",
    })
    package = dest / PACKAGE
    with staged_path(package) as tmp, contextlib.redirect_stderr(io.StringIO()):
        mlmodel.save(str(tmp))
    atomic_write_json(dest / INFO, {
        "component": spec.name, "precision": precision, "compute_precision": compute, "kept_fp32_reason": reason,
        "minimum_deployment_target": options.minimum_deployment_target, "specification_version": target_spec,
        "attention": options.attention, "attention_layers": converted["attention_layers"],
        "shapes": [{k: list(v) for k, v in s.items()} for s in shape_sets],
        "onnx_io": _held_io(onnx_io(source), spec), "compression": compression, "convert_seconds": converted["seconds"],
        "conversion_reused": converted["reused"],
        "versions": support, "options": asdict(options), "package": inspect_package(package),
    })
    return package


def _held_io(io: dict[str, Any], spec: ComponentSpec) -> dict[str, Any]:
    """The ONNX export's I/O less the outputs the package leaves out (`ComponentSpec.pipeline_outputs`)."""
    kept = {o.name for o in spec.outputs}
    return {**io, "outputs": [f for f in io["outputs"] if f["name"] in kept]}


def converted_package(context: CompileContext, spec: ComponentSpec, compute: str,
                      shape_sets: list[dict[str, tuple[int, ...]]], options: CoremlOptions) -> tuple[Path, dict[str, Any]]:
    """The component converted from PyTorch (no compression, no diffship metadata), kept in the diffship cache so
    every precision of a build converts it once and compresses that, as Apple's flow does. Returns the cache entry
    holding model.mlpackage, and how long the conversion took, whether it was reused and how many attention layers
    the options changed."""
    from diffship.models.components import wrap
    from diffship.models.loading import load_component
    from diffship.store import cache
    from diffship.store.versions import source_fingerprint

    assert context.model_folder is not None
    entry_key = cache.key(stage="coreml-convert", weights=cache.folder_hash(context.model_folder / spec.module),
                          component=spec.name, outputs=[o.name for o in spec.outputs], compute=compute,
                          shapes=[{k: list(v) for k, v in s.items()} for s in shape_sets],
                          attention=options.attention, target=options.minimum_deployment_target,
                          versions=[torch_support(), source_fingerprint()])

    def produce(staging: Path, info: dict[str, Any]) -> None:
        began = time.perf_counter()
        module = load_component(context.model_folder, spec.module, context.allow_pickle)
        layers = use_attention(module, options.attention)
        mlmodel = convert(wrap(spec, module), spec, shape_sets, compute, options.minimum_deployment_target)
        del module
        with contextlib.redirect_stderr(io.StringIO()):
            mlmodel.save(str(staging / PACKAGE))
        info |= {"seconds": round(time.perf_counter() - began, 2), "attention_layers": layers}

    done = cache.cached_step("coreml-convert", entry_key, f"{spec.name} Core ML conversion", produce)
    return done.path, {**done.info, "reused": done.hit}


_DESCRIPTIONS: dict[Any, str] = {
    "input_ids": "CLIP token ids (start, prompt, end, padding), int32",
    ("unet", "sample"): "noisy latents, scaled for the current timestep",
    ("vae_encoder", "sample"): "image, channels first, in [-1, 1]",
    ("vae_decoder", "sample"): "image, channels first, in about [-1, 1]",
    "timestep": "the denoising timestep, one per batch row",
    "encoder_hidden_states": "the text encoder's hidden states (SDXL: both encoders', concatenated)",
    "text_embeds": "SDXL: the second text encoder's pooled, projected embedding",
    "time_ids": "SDXL: original size, crop top-left and target size",
    "out_sample": "the UNet's prediction (noise or v, as the scheduler expects)",
    "latent_sample": "unscaled latents (divide by the VAE's scaling factor first)",
    "latent_parameters": "mean and log-variance of the latent distribution, concatenated on channels",
    "last_hidden_state": "the text encoder's last hidden state",
    "penultimate_hidden_state": "the hidden state before the last layer (what SDXL feeds its UNet)",
    "pooler_output": "the pooled output at the end-of-text token",
}


# --- what a package holds, and checks against the ONNX export --------------------------------------------------


def inspect_package(package: Path) -> dict[str, Any]:
    """Read a package's spec (no Core ML runtime needed): I/O with dtypes and shapes, op counts, how its weights are
    stored (dtype of each weight blob), the largest weight still in float, and the size on disk."""
    ct = _ct()
    from coremltools.proto import MIL_pb2

    spec = ct.utils.load_spec(str(package))
    storage: Counter[str] = Counter()
    float_consts: dict[str, int] = {}  # const output name -> elements, for consts stored in float
    compressed: list[str] = []  # outputs of constexpr (decompressing) ops
    lut_entries: Counter[int] = Counter()  # look-up table sizes: 2 ** bits
    dtype_name = MIL_pb2.DataType.Name
    for op in _operations(spec):
        for role, value in [*((k, a.value) for k, v in op.inputs.items() for a in v.arguments
                              if a.WhichOneof("binding") == "value"), *op.attributes.items()]:
            if value.HasField("blobFileValue"):
                dtype = dtype_name(value.type.tensorType.dataType)
                storage[f"{op.type}.{role} {dtype}"] += 1
                dims = [d.constant.size for d in value.type.tensorType.dimensions]
                if op.type == "constexpr_lut_to_dense" and role == "lut":  # (..., entries, 1) from iOS 18, (entries,)
                    lut_entries[dims[-2] if len(dims) > 1 else dims[0]] += 1
                if op.type == "const" and dtype.startswith("FLOAT"):
                    float_consts[op.outputs[0].name] = int(np.prod(dims))
        if op.type.startswith("constexpr_"):
            compressed.append(op.outputs[0].name)
    roles = _feeds(spec)
    ops = _op_counts(spec)
    return {
        "specification_version": spec.specificationVersion, "ml_program": spec.WhichOneof("Type") == "mlProgram",
        "functions": {name: f.opset for name, f in spec.mlProgram.functions.items()},
        "inputs": [_feature(f) for f in spec.description.input],
        "outputs": [_feature(f) for f in spec.description.output], "metadata": dict(spec.description.metadata.userDefined),
        "ops": dict(ops.most_common()), "op_count": sum(ops.values()), "weights": dict(storage.most_common()),
        # Biases and normalization scales are never compressed; what compression must reach are the layers' weights.
        "largest_float_weight": max((n for name, n in float_consts.items()
                                     if any(r.endswith(".weight") for r in roles.get(name, ()))), default=0),
        "lut_entries": {str(k): n for k, n in sorted(lut_entries.items())},
        "compressed_feeds": sorted({r for name in compressed for r in roles.get(name, ())}),
        "bytes": sum(p.stat().st_size for p in package.rglob("*") if p.is_file()),
    }


_ARRAY_DTYPES = {0x10000 | 32: "float32", 0x10000 | 16: "float16", 0x10000 | 64: "float64", 0x20000 | 32: "int32",
                 0x20000 | 8: "int8"}


def _feature(f: Any) -> dict[str, Any]:
    array = f.type.multiArrayType
    return {"name": f.name, "dtype": _ARRAY_DTYPES.get(array.dataType, str(array.dataType)), "shape": list(array.shape),
            "enumerated": [list(s.shape) for s in array.enumeratedShapes.shapes]}


def check_package(package: Path) -> dict[str, Any]:
    """Verify a converted package against what it had to be: the ONNX export's input and output names and dtypes,
    the shapes it was built for (and none beyond), the deployment target, the weights' storage for its precision,
    and its metadata. Each check with its detail; `passed` when all pass."""
    info = read_info(package)
    held = inspect_package(package)
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "passed": bool(ok), "detail": detail})

    check("ML program", held["ml_program"] and held["specification_version"] == info["specification_version"],
          f"specification {held['specification_version']} ({info['minimum_deployment_target']} needs "
          f"{info['specification_version']})")
    expected_in, expected_out = info["onnx_io"]["inputs"], info["onnx_io"]["outputs"]
    for role, have, want in (("inputs", held["inputs"], expected_in), ("outputs", held["outputs"], expected_out)):
        names = [f["name"] for f in have]
        check(f"{role}: names", names == [f["name"] for f in want], f"{names} (ONNX: {[f['name'] for f in want]})")
        dtypes = {f["name"]: f["dtype"] for f in have}
        wrong = {f["name"]: (dtypes.get(f["name"]), f["dtype"]) for f in want if dtypes.get(f["name"]) != f["dtype"]}
        check(f"{role}: dtypes", not wrong, "as ONNX" if not wrong else
              "; ".join(f"{n}: {h} (ONNX {w})" for n, (h, w) in wrong.items()))
    built = info["shapes"]
    problems = []
    for f, onnx_f in zip(held["inputs"], expected_in, strict=False):
        accepts = f["enumerated"] or [f["shape"]]
        wanted = [s[f["name"]] for s in built if f["name"] in s]
        if sorted(map(tuple, accepts)) != sorted(set(map(tuple, wanted))):
            problems.append(f"{f['name']} accepts {accepts}, built for {wanted}")
        for shape in accepts:
            fixed = [(i, d) for i, d in enumerate(onnx_f["shape"]) if isinstance(d, int) and d > 0]
            if len(shape) != len(onnx_f["shape"]) or any(shape[i] != d for i, d in fixed):
                problems.append(f"{f['name']} shape {shape} does not fit the ONNX input {onnx_f['shape']}")
    check("inputs: shapes", not problems, "; ".join(problems) or
          ", ".join(f"{f['name']} {f['enumerated'] or f['shape']}" for f in held["inputs"]))
    out_problems = []
    for f, onnx_f in zip(held["outputs"], expected_out, strict=False):
        if f["shape"] and len(f["shape"]) != len(onnx_f["shape"]):
            out_problems.append(f"{f['name']} has rank {len(f['shape'])}, ONNX {len(onnx_f['shape'])}")
        elif f["shape"] and any(isinstance(d, int) and d > 0 and f["shape"][i] != d for i, d in enumerate(onnx_f["shape"])):
            out_problems.append(f"{f['name']} shape {f['shape']} does not fit the ONNX output {onnx_f['shape']}")
    check("outputs: shapes", not out_problems, "; ".join(out_problems) or
          ", ".join(f"{f['name']} {f['shape'] or 'follows the input shape'}" for f in held["outputs"]))
    check("weights", *_storage_verdict(info, held))
    meta = held["metadata"]
    check("metadata", meta.get("diffship.precision") == info["precision"] and "diffship.component" in meta
          and "diffship.version" in meta, f"precision {meta.get('diffship.precision')}, "
          f"component {meta.get('diffship.component')}")
    return {"checks": checks, "passed": all(c["passed"] for c in checks), "op_count": held["op_count"],
            "ops": held["ops"], "weights": held["weights"], "bytes": held["bytes"]}


def _storage_verdict(info: dict[str, Any], held: dict[str, Any]) -> tuple[bool, str]:
    """Whether the weights are stored as the precision says: all float in the compute precision when uncompressed;
    compressed (int8 data, or uint4 / uint6 look-up indices) above the size threshold when compressed."""
    weights, compression = held["weights"], info["compression"]
    floats = {k: n for k, n in weights.items() if k.startswith("const.")}
    summary = ", ".join(f"{n} x {k}" for k, n in weights.items())
    if compression is None:
        want = "FLOAT16" if info["compute_precision"] == "fp16" else "FLOAT32"
        ok = bool(floats) and all(k.endswith(want) for k in floats) and all(k.startswith("const.") for k in weights)
        return ok, f"{summary} (expected every weight {want}, none compressed)"
    precision, ios18 = info["precision"], info["specification_version"] >= GROUPED_PALETTE_SPEC
    bits = (COMPRESSION.get(precision) or {}).get("nbits", 0)
    if precision == "int8-weights":
        want = "constexpr_blockwise_shift_scale.data INT8" if ios18 else "constexpr_affine_dequantize.quantized_data INT8"
    else:  # n-bit indices from iOS 18 on; packed into bytes before, where the table size tells the bits
        want = f"constexpr_lut_to_dense.indices UINT{bits if ios18 else 8}"
    tables = held.get("lut_entries", {})
    wrong_tables = precision != "int8-weights" and set(tables) != {str(2**bits)}
    threshold = compression["weight_threshold"]
    stray = [r for r in held["compressed_feeds"] if r.split(".")[0] not in WEIGHT_CONSUMERS]
    ok = weights.get(want, 0) > 0 and held["largest_float_weight"] <= threshold and not stray and not wrong_tables
    if precision != "int8-weights":
        want += f", look-up tables of {2**bits} entries (found {', '.join(tables) or 'none'})"
    return ok, (f"{summary}; largest weight left in float: {held['largest_float_weight']} elements "
                f"(threshold {threshold}; expected {want}); compressed values feed "
                f"{', '.join(held['compressed_feeds'])}" + (f" (not layer weights: {', '.join(stray)})" if stray else ""))


def read_info(package: Path) -> dict[str, Any]:
    """The coreml.json beside a package, or a clear error when the package or its record is missing."""
    if not package.is_dir():
        raise DiffshipError(f"No Core ML package at {package}.")
    path = package.parent / INFO
    if not path.is_file():
        raise DiffshipError(f"{package} has no {INFO} beside it, so what it was converted from is unknown; rebuild it.")
    return json.loads(path.read_text(encoding="utf-8"))


def describe_artifact(package: Path) -> dict[str, Any]:
    """What a package is, for the report's 'how each component runs' table (read from coreml.json, no runtime)."""
    info = read_info(package)
    c = info["compression"]
    graph = {"conversion": f"coremltools {info['versions']['coremltools']} from torch {info['versions']['torch']}"
                           + ("" if info["versions"]["tested"] else " (untested pair)")
                           + f", {info['package']['op_count']} ops, attention "
                           + (info["attention"] if info["attention_layers"] else "as the model defines it"),
             "quantization": f"{c['method']}, {c['granularity']}" if c else "",
             "reason": info["kept_fp32_reason"] or ""}
    shapes = "fixed" if len(info["shapes"]) == 1 else f"{len(info['shapes'])} enumerated shapes"
    return {"target": NAME, "precision": info["compute_precision"] + (" (kept)" if info["kept_fp32_reason"] else ""),
            "minimum_deployment_target": info["minimum_deployment_target"], "attention": info["attention"],
            "shapes": shapes, "graph": graph,
            "summary": f"Core ML ML program, {info['minimum_deployment_target']}, {info['compute_precision'].upper()}, "
                       f"{shapes}"}


def parity_cases(spec: Any, package: Path, cases: tuple[Any, ...]) -> tuple[Any, ...]:
    """Parity cases at exactly the shapes a package was built for (batch, and the image size its first input means);
    text encoders do not depend on the image size, so they keep the given cases' first resolution."""
    built = []
    for shapes in read_info(package)["shapes"]:
        shape = shapes[spec.inputs[0].name]
        built.append(Case(shape[0], *(spec.image_size(shape) or (cases[0].height, cases[0].width))))
    return tuple(built)


def verify(components: dict[str, Path]) -> dict[str, Any]:
    """Spec checks of every package of a set (runs anywhere): per component, and whether all passed."""
    results = {name: check_package(path) for name, path in components.items()}
    return {"components": results, "passed": all(r["passed"] for r in results.values())}


# --- running (macOS only) --------------------------------------------------------------------------------------


class CoremlRunner:
    """A Runner over one package through Core ML (macOS): numpy in, numpy out, the shapes it was built for only."""

    def __init__(self, package: Path, options: CoremlOptions, precision: str | None = None):
        if reason := prediction_unavailable():
            raise DiffshipError(f"Cannot run {package}: {reason}. The package is converted and spec-checked; run it "
                                "on a Mac (macOS 13 or newer).")
        ct = _ct()
        self.info = read_info(package)
        self.package, self.options, self.precision = package, options, precision
        self.model = ct.models.MLModel(str(package), compute_units=getattr(ct.ComputeUnit, options.compute_units))
        self.input_names = tuple(f["name"] for f in self.info["onnx_io"]["inputs"])
        self.output_names = tuple(f["name"] for f in self.info["onnx_io"]["outputs"])
        self.accepted = [{k: tuple(v) for k, v in s.items()} for s in self.info["shapes"]]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Predict on named arrays; a shape the package was not built for is refused with the ones it was."""
        shapes = {k: tuple(v.shape) for k, v in inputs.items()}
        if shapes not in self.accepted:
            raise DiffshipError(f"{self.package} was built for input shapes {self.accepted}, got {shapes}; add the "
                                "resolution to the Core ML resolutions option and rebuild.")
        out = self.model.predict({k: np.ascontiguousarray(v) for k, v in inputs.items()})
        return {name: np.asarray(out[name], dtype=np.float32) for name in self.output_names}

    def describe(self) -> dict[str, object]:
        """The package's description plus the compute units it was loaded for."""
        return {**describe_artifact(self.package), "compute_units": self.options.compute_units}


def load(artifact: Path, options: CoremlOptions | None = None, precision: str | None = None) -> CoremlRunner:
    """A Runner for a .mlpackage (macOS only; elsewhere a clear error saying so)."""
    return CoremlRunner(artifact, options or CoremlOptions(), precision)
