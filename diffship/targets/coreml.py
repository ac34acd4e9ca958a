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
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import numpy as np
import torch
from packaging.version import Version
from pydantic import BeforeValidator, Field, field_validator

from diffship import __version__
from diffship.errors import DiffshipError
from diffship.models.components import wrap
from diffship.models.families import component_names
from diffship.models.loading import load_component
from diffship.store import cache
from diffship.store.artifacts import atomic_write_json, staged_path
from diffship.store.versions import source_fingerprint
from diffship.targets import Case, CompileContext
from diffship.targets.coreml_attention import IMPLEMENTATIONS, use_attention
from diffship.targets.coreml_convert import compress_weights, convert
from diffship.targets.coreml_package import (
    COMPRESSION,
    INFO,
    PACKAGE,
    held_io,
    inspect_package,
    load_coremltools,
    read_info,
)
from diffship.targets.coreml_package import verify as verify
from diffship.targets.coreml_shapes import compute_precision, package_shapes
from diffship.targets.options import Names, VaeOptions, VaePrecision
from diffship.targets.records import Description

if TYPE_CHECKING:
    from diffship.models.components import ComponentSpec

NAME = "coreml"
PINNED_SHAPES = True  # the denoiser at the guided batch of each shape it was built for
PATCH_REFUSAL = ("Core ML packages keep their weights in the package's own weight blob, converted (and often "
                 "compressed) by coremltools, which offers no in-place update of converted weights: rebuild with --lora")
PRECISIONS = tuple(COMPRESSION)
# No client loads a Core ML package in optimum's layout: a text encoder's package holds the outputs the pipeline reads
# (`ComponentSpec.pipeline_outputs`); per-layer hidden states also break its naming (dots, one value twice).
CLIENT_OUTPUTS_KEPT = False
OLDEST_TARGETS = {"iOS": 16, "macOS": 13, "tvOS": 16, "watchOS": 9}  # compressed weights (constexpr ops) need these
TORCH_MIN = "2.1.0"  # coremltools' own floor for its torch integration (_CT_OPTIMIZE_TORCH_MIN_VERSION)


def _pairs(value: Any) -> Any:
    """TOML's [[h, w], ...] as ((h, w), ...); anything else is said as what the option takes."""
    try:
        return tuple((int(h), int(w)) for h, w in value)
    except (TypeError, ValueError):
        raise ValueError(f"Core ML resolutions must be [height, width] pairs, got {value!r}.") from None


class CoremlOptions(VaeOptions):
    """Deployment target, attention, extra resolutions, what to compress and how, and how packages are run on a Mac."""

    title: ClassVar[str] = "Core ML"

    minimum_deployment_target: str = "iOS18"
    attention: str = "split_einsum"  # Apple's converter's default, for the Neural Engine
    # more (height, width) the packages accept, as enumerated shapes
    resolutions: Annotated[tuple[tuple[int, int], ...], BeforeValidator(_pairs)] = ()
    vae_precision: VaePrecision = "auto"  # auto: SDXL's VAE in FP32, the others FP16
    compress: Names = ("denoiser",)  # the components the compressed precisions compress (or their role)
    palette_group_size: int = Field(16, ge=1)  # output channels sharing one look-up table (per grouped channel, iOS 18+)
    weight_threshold: int = Field(2048, ge=0)  # weights with at most this many elements stay FP16 (coremltools')
    compute_units: Literal["ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY"] = "ALL"  # for prediction on macOS
    # torch newer than coremltools has tested: "warn" and convert, or "refuse"
    untested_torch: Literal["warn", "refuse"] = "warn"
    require_parity: bool = False  # fail a set whose parity cannot run here (not on macOS) instead of spec-checking it

    @field_validator("attention")
    @classmethod
    def _attention(cls, value: str) -> str:
        if value not in IMPLEMENTATIONS:
            raise ValueError(f"Unknown Core ML attention {value!r}; choose {', '.join(IMPLEMENTATIONS)}.")
        return value

    @field_validator("compress")
    @classmethod
    def _components(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if bad := [c for c in value if c not in component_names()]:
            raise ValueError(f"Core ML compress names unknown component(s) {', '.join(bad)}; choose from "
                             f"{', '.join(component_names())}.")
        return value

    @field_validator("resolutions")
    @classmethod
    def _positive(cls, value: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
        if any(h <= 0 or w <= 0 for h, w in value):
            raise ValueError(f"Core ML resolutions must be positive, got {[list(r) for r in value]}.")
        return value


def parse_options(options: dict[str, Any]) -> CoremlOptions:
    """The recipe's Core ML options, with unknown keys and bad values named (the deployment target against the
    installed coremltools)."""
    parsed = CoremlOptions.parse(options)
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


def torch_support() -> dict[str, Any]:
    """The torch in use against the range coremltools supports: floor, newest tested, and whether it is inside."""
    ct = load_coremltools()
    from coremltools import _deps  # optional: coreml

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
    members = load_coremltools().target.__members__
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
        load_coremltools()
        import coremltools.libcoremlpython  # noqa: F401  optional: coreml, its native runtime bridge (macOS only)
    except ImportError as exc:
        return f"coremltools' runtime bridge is missing ({exc})"
    return None


# --- conversion -----------------------------------------------------------------------------------------------


def compile(source: Path, precision: str, options: CoremlOptions | None = None, dest: Path | None = None,
            context: CompileContext | None = None) -> Path:
    """Convert one component from its PyTorch weights into `dest/model.mlpackage` (with coreml.json beside it:
    how it was made, the ONNX export's I/O it must match, and what the package holds); return the package path."""
    from diffship.exporters.onnx import onnx_io  # start-up time: onnx
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
    spec = context.spec.pipeline_outputs()  # as the compile stage hands it (CLIENT_OUTPUTS_KEPT); so for direct calls
    shape_sets = package_shapes(context, options)
    compute, reason = compute_precision(precision, spec, options)

    base, converted = converted_package(context, spec, compute, shape_sets, options)
    mlmodel = load_coremltools().models.MLModel(str(base / PACKAGE), skip_model_load=True)
    compression = None
    if COMPRESSION[precision] and spec.named_in(options.compress):
        mlmodel, compression = compress_weights(mlmodel, precision, options, target_spec)

    mlmodel.author = "diffship"
    mlmodel.version = __version__
    # Packages are cached by their ONNX file's hash, which models sharing a component share: no model name here.
    mlmodel.short_description = f"{spec.name} of a Stable Diffusion pipeline, converted by diffship {__version__}"
    for tensors, described in ((spec.inputs, mlmodel.input_description), (spec.outputs, mlmodel.output_description)):
        for t in tensors:
            described[t.name] = _DESCRIPTIONS.get((spec.role, t.name)) or _DESCRIPTIONS.get(t.name, t.name)
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
        "onnx_io": held_io(onnx_io(source), spec), "compression": compression, "convert_seconds": converted["seconds"],
        "conversion_reused": converted["reused"],
        "versions": support, "options": options.model_dump(), "package": inspect_package(package),
    })
    return package


def converted_package(context: CompileContext, spec: ComponentSpec, compute: str,
                      shape_sets: list[dict[str, tuple[int, ...]]], options: CoremlOptions) -> tuple[Path, dict[str, Any]]:
    """The component converted from PyTorch (no compression, no diffship metadata), kept in the diffship cache so
    every precision of a build converts it once and compresses that, as Apple's flow does. Returns the cache entry
    holding model.mlpackage, and how long the conversion took, whether it was reused and how many attention layers
    the options changed."""
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
        mlmodel = convert(wrap(spec, module), spec, shape_sets, compute, options.minimum_deployment_target,
                          torch_support())
        del module
        with contextlib.redirect_stderr(io.StringIO()):
            mlmodel.save(str(staging / PACKAGE))
        info |= {"seconds": round(time.perf_counter() - began, 2), "attention_layers": layers}

    done = cache.cached_step("coreml-convert", entry_key, f"{spec.name} Core ML conversion", produce)
    return done.path, {**done.info, "reused": done.hit}


_DESCRIPTIONS: dict[Any, str] = {
    "input_ids": "CLIP token ids (start, prompt, end, padding), int32",
    ("denoiser", "sample"): "noisy latents, scaled for the current timestep",
    ("vae_encoder", "sample"): "image, channels first, in [-1, 1]",
    ("vae_decoder", "sample"): "image, channels first, in about [-1, 1]",
    "timestep": "the denoising timestep, one per batch row",
    "encoder_hidden_states": "the text encoder's hidden states (SDXL: both encoders', concatenated)",
    "text_embeds": "SDXL: the second text encoder's pooled, projected embedding",
    "time_ids": "SDXL: original size, crop top-left and target size",
    "out_sample": "the denoiser's prediction (noise or v, as the scheduler expects)",
    "latent_sample": "unscaled latents (divide by the VAE's scaling factor first)",
    "latent_parameters": "mean and log-variance of the latent distribution, concatenated on channels",
    "last_hidden_state": "the text encoder's last hidden state",
    "penultimate_hidden_state": "the hidden state before the last layer (what SDXL feeds its denoiser)",
    "pooler_output": "the pooled output at the end-of-text token",
}


# --- describing a package and its parity cases (the checks are in coreml_package) -------------------------------


def describe_artifact(package: Path) -> Description:
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
    return Description(NAME, f"Core ML ML program, {info['minimum_deployment_target']}, "
                             f"{info['compute_precision'].upper()}, {shapes}",
                       info["compute_precision"] + (" (kept)" if info["kept_fp32_reason"] else ""), graph,
                       details={"minimum_deployment_target": info["minimum_deployment_target"],
                                "attention": info["attention"], "shapes": shapes})


def parity_cases(spec: Any, package: Path, cases: tuple[Any, ...]) -> tuple[Any, ...]:
    """Parity cases at exactly the shapes a package was built for (batch, and the image size its first input means);
    text encoders do not depend on the image size, so they keep the given cases' first resolution."""
    built = []
    for shapes in read_info(package)["shapes"]:
        shape = shapes[spec.inputs[0].name]
        built.append(Case(shape[0], *(spec.image_size(shape) or (cases[0].height, cases[0].width))))
    return tuple(built)


# --- running (macOS only) --------------------------------------------------------------------------------------


class CoremlRunner:
    """A Runner over one package through Core ML (macOS): numpy in, numpy out, the shapes it was built for only."""

    def __init__(self, package: Path, options: CoremlOptions, precision: str | None = None):
        if reason := prediction_unavailable():
            raise DiffshipError(f"Cannot run {package}: {reason}. The package is converted and spec-checked; run it "
                                "on a Mac (macOS 13 or newer).")
        ct = load_coremltools()
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

    def describe(self) -> Description:
        """The package's description plus the compute units it was loaded for."""
        described = describe_artifact(self.package)
        return replace(described, details=described.details | {"compute_units": self.options.compute_units})


def load(artifact: Path, options: CoremlOptions | None = None, precision: str | None = None) -> CoremlRunner:
    """A Runner for a .mlpackage (macOS only; elsewhere a clear error saying so)."""
    return CoremlRunner(artifact, options or CoremlOptions(), precision)
