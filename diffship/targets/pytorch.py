"""PyTorch as a target: the component wrappers themselves, tuned, and AOTInductor `.pt2` packages.

A precision names the number format and how the component runs: `fp32`, `fp16`, `bf16` (weights and activations in
that type), `fp16-autocast` / `bf16-autocast` (FP32 weights, `torch.autocast` picks the op precision and keeps norms
and softmax in FP32), each eager or with `-compile` (`torch.compile`, compiled on the first call at each shape), and
`fp32-aoti` / `fp16-aoti` / `bf16-aoti`: each component (or those in `aoti_components`) exported with
`torch.export` and compiled ahead of time by AOTInductor into a package that loads and runs without diffusers or
transformers. Eager and compiled sets ship the component's weights (`save_pretrained`, in the set's type);
AOTInductor sets ship the package (a component left out of `aoti_components`: its weights, run eager). The scheduler step
always runs in FP32 (the runtime pipeline's own), as diffusers does.

The module is `pytorch`, not `torch`, so that nothing can mistake it for the library.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch._inductor
from torch import nn
from torch._inductor import config as inductor_config
from torch.export import Dim

from diffship.errors import DiffshipError, DiskFull
from diffship.models.components import ComponentSpec, TensorSpec, wrap
from diffship.models.compressed import is_compressed, load_compressed
from diffship.models.loading import load_component, load_folder
from diffship.store.artifacts import atomic_write_json, staged_path
from diffship.targets import Case, CompileContext
from diffship.targets.pytorch_options import (
    DTYPES,
    INFO,
    NAME,
    PACKAGE,
    WEIGHTS,
    TorchOptions,
    freezing,
    resolve_device,
    variant,
)
from diffship.targets.pytorch_options import PATCH_REFUSAL as PATCH_REFUSAL
from diffship.targets.pytorch_options import PRECISIONS as PRECISIONS
from diffship.targets.pytorch_options import environment as environment
from diffship.targets.pytorch_options import model_index as model_index
from diffship.targets.pytorch_options import needs_calibration as needs_calibration
from diffship.targets.pytorch_options import parse_options as parse_options
from diffship.targets.pytorch_options import preflight as preflight
from diffship.targets.pytorch_options import writes_artifacts as writes_artifacts
from diffship.targets.pytorch_prepare import CastIO, apply_options, effective_dtype
from diffship.targets.records import Description, read_record

# --- compile: the artifact -------------------------------------------------------------------------------------


def compile(source: Path, precision: str, options: TorchOptions | None = None, dest: Path | None = None,
            context: CompileContext | None = None) -> Path:
    """Write one component's artifact into `dest`: its weights in the set's type (`weights/`, eager and compiled
    sets) or an AOTInductor package (`model.pt2`), with torch.json beside it saying how it was made."""
    from diffship.exporters.onnx import onnx_io  # start-up time: onnx

    options = options or TorchOptions()
    v = variant(precision)
    if dest is None or context is None or context.model_folder is None:
        raise DiffshipError("PyTorch compile needs an output folder, the component and the model folder it comes from.")
    spec = context.spec
    dtype, reason = effective_dtype(precision, spec, options)
    device = resolve_device(options)
    began = time.perf_counter()
    module = load_component(context.model_folder, spec.module, context.allow_pickle)
    mode = "eager" if v.mode == "aoti" and not packaged(spec, options) else v.mode
    info: dict[str, Any] = {"component": spec.name, "precision": precision, "dtype": dtype,
                            "autocast": v.autocast and reason is None,
                            "mode": mode, "kept_reason": reason, "spec": asdict(spec), "options": options.model_dump(),
                            "onnx_io": onnx_io(source) if source.is_file() else None, "environment": environment(options)}
    if mode == "aoti":
        artifact = dest / PACKAGE
        applied = apply_options(module, spec, options)
        dims = export_dims(spec, context)
        if dims["dynamic"] is not None and ("vae_slicing" in applied or "vae_tiling" in applied):
            raise DiffshipError(
                f"{precision}: VAE slicing and tiling branch on the input's batch and size, which a package exported "
                "for a range of shapes cannot do. Fix batch, height and width in [shapes] (one value each), or turn "
                "vae_slicing / vae_tiling off for AOTInductor sets.")
        with staged_path(artifact) as tmp:
            info |= export_package(module, spec, dtype, device, dims, tmp, freezing(options, device))
        dynamic = None if dims["dynamic"] is None else {
            name: {str(i): str(d) for i, d in axes.items()} if axes else None for name, axes in dims["dynamic"].items()}
        info |= {"device": device, "applied": applied, "dynamic": dynamic, "example": dims["example"]}
    else:
        artifact = dest / WEIGHTS
        with staged_path(artifact) as tmp:
            save_weights(module, spec, context.model_folder, dtype, tmp)
        if v.mode == "compile":  # the batch the pipeline calls it at, which parity checks it at (parity_cases)
            info["call_batch"] = spec.batch_for(1, context.guided)
    info["seconds"] = round(time.perf_counter() - began, 2)
    atomic_write_json(dest / INFO, info)
    return artifact


def packaged(spec: ComponentSpec, options: TorchOptions) -> bool:
    """Whether an `-aoti` set packages `spec`'s component (every one unless `aoti_components` names some)."""
    return options.aoti_components is None or spec.named_in(options.aoti_components)


def save_weights(module: nn.Module, spec: ComponentSpec, model_folder: Path, dtype: str, dest: Path) -> None:
    """The component's module as `save_pretrained` writes it (safetensors), in `dtype`. A compressed UNet's folder is
    copied as it is: its structure is not the config's, and diffship's loader rebuilds it."""
    if spec.is_denoiser and is_compressed(model_folder / spec.module):
        shutil.copytree(model_folder / spec.module, dest)
        return
    module.to(DTYPES[dtype]).save_pretrained(dest, safe_serialization=True)


def export_dims(spec: ComponentSpec, context: CompileContext) -> dict[str, Any]:
    """Example inputs' sizes and `torch.export` dynamic shapes for the recipe's ranges: batch, and height / width in
    steps of the denoiser's latent multiple (the UNet's 8 for its downsampling, a transformer's 2x2 patch); static
    where the recipe fixes the shapes. The example avoids sizes of 1, which `torch.export` would specialize."""
    step = spec.latent_multiple
    unit = spec.vae_scale * step  # pixels per step
    if context.static_shapes is not None or context.shape_ranges is None:
        shapes = context.static_shapes or {t.name: t.concrete(spec.axis_sizes(1, *context.probe_size)) for t in spec.inputs}
        first = shapes[spec.inputs[0].name]
        batch, (height, width) = first[0], spec.image_size(first) or context.probe_size
        return {"dynamic": None, "example": {"batch": batch, "height": height, "width": width}}
    ranges = context.shape_ranges
    batch_low, batch_high = ranges["batch"]
    batch_high = spec.batch_for(batch_high, context.guided)
    steps = {side: (ranges[side][0] // unit, ranges[side][1] // unit) for side in ("height", "width")}
    tokens = [spec.axis_sizes(1, ranges["height"][i], ranges["width"][i])["image_tokens"] for i in (0, 1)]
    dims = {"batch": Dim("batch", min=batch_low, max=batch_high) if batch_high > batch_low else None,
            **{side: Dim(side, min=low, max=high) if high > low else None for side, (low, high) in steps.items()},
            # a packed denoiser's image tokens (Flux), and a T5-fed component's text tokens: free sizes of their own
            "image_tokens": Dim("image_tokens", min=tokens[0], max=tokens[1]) if tokens[1] > tokens[0] else None,
            "sequence": Dim("sequence", min=max(2, spec.min_sequence), max=spec.max_sequence)
            if spec.max_sequence > spec.min_sequence else None}
    example = {"batch": min(max(2, batch_low), batch_high),
               **{side: unit * min(max(2, low), high) for side, (low, high) in steps.items()}}
    per_pixel = {"height": step if spec.latent_axes else unit, "latent_height": step,
                 "width": step if spec.latent_axes else unit, "latent_width": step}
    dynamic: dict[str, dict[int, Any] | None] = {}
    for t in spec.inputs:
        axes: dict[int, Any] = {}
        for i, axis in t.dynamic_axes.items():
            side = axis.removeprefix("latent_")
            if axis == "batch" and dims["batch"] is not None:
                axes[i] = dims["batch"]
            elif side in ("height", "width") and dims[side] is not None:
                axes[i] = per_pixel[axis] * dims[side]
            elif axis in ("image_tokens", "sequence") and dims[axis] is not None:
                axes[i] = dims[axis]
        dynamic[t.name] = axes or None
    ranges_out = {"batch": [batch_low, batch_high],
                  **{side: [low * unit, high * unit] for side, (low, high) in steps.items()}}
    return {"dynamic": dynamic, "example": example, "ranges": ranges_out}


def export_package(module: nn.Module, spec: ComponentSpec, dtype: str, device: str, dims: dict[str, Any],
                   package: Path, frozen: bool = False) -> dict[str, Any]:
    """`torch.export` the component (FP32 I/O around `dtype` inside) on example inputs and compile it with
    AOTInductor into `package`; return the seconds each took and the shapes it accepts."""
    wrapper = CastIO(wrap(spec, module.to(DTYPES[dtype])), spec, DTYPES[dtype]).to(device).eval()
    ex = dims["example"]
    inputs = spec.sample_inputs(ex["batch"], ex["height"], ex["width"])
    args = tuple(torch.from_numpy(inputs[t.name]).to(device) for t in spec.inputs)
    # CastIO takes *args, which torch.export sees as one tuple argument.
    dynamic = None if dims["dynamic"] is None else (tuple(dims["dynamic"][t.name] for t in spec.inputs),)
    began = time.perf_counter()
    try:
        with torch.no_grad():
            exported = torch.export.export(wrapper, args, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # torch.export raises UserError, Unsupported, GuardOnDataDependentSymNode...
        raise DiffshipError(f"torch.export could not export {spec.name}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    exported_s = time.perf_counter() - began
    began = time.perf_counter()
    with warnings.catch_warnings():  # torch's own pytree deprecation notices, raised from inside the packager
        warnings.simplefilter("ignore", FutureWarning)
        torch._inductor.aoti_compile_and_package(exported, package_path=str(package),
                                                 inductor_configs={"freezing": frozen})
    return {"export_seconds": round(exported_s, 2), "aoti_seconds": round(time.perf_counter() - began, 2),
            "shape_ranges": dims.get("ranges"), "freezing": frozen}


# --- reading and describing artifacts --------------------------------------------------------------------------


def read_info(artifact: Path) -> dict[str, Any]:
    """torch.json beside a set's weights folder or package, with a clear error when it is missing."""
    return read_record(artifact, INFO, "PyTorch artifact")


def component_spec(info: dict[str, Any]) -> ComponentSpec:
    """The ComponentSpec recorded in torch.json (what wraps the module and names its inputs and outputs)."""
    s = dict(info["spec"])
    for key in ("inputs", "outputs"):
        s[key] = tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in s[key])
    return ComponentSpec(**s)


def describe_artifact(artifact: Path) -> Description:
    """What an artifact is, for the report (read from torch.json)."""
    info = read_info(artifact)
    how = {"eager": "eager", "compile": "torch.compile", "aoti": "AOTInductor package"}[info["mode"]]
    dtype = "autocast " + info["precision"].split("-")[0].upper() if info["autocast"] else info["dtype"].upper()
    conversion = (f"torch.export {info['export_seconds']:.1f} s + AOTInductor {info['aoti_seconds']:.1f} s, "
                  + ("static shapes" if info["dynamic"] is None else "dynamic shapes")
                  + (", frozen weights" if info.get("freezing") else "") if info["mode"] == "aoti" else "")
    return Description(NAME, f"PyTorch {torch.__version__} {how}, {dtype}",
                       info["dtype"] + (" (kept)" if info["kept_reason"] else ""),
                       {"conversion": conversion, "reason": info["kept_reason"] or ""}, details={"mode": info["mode"]})


def parity_cases(spec: Any, artifact: Path, cases: tuple[Any, ...]) -> tuple[Any, ...]:
    """The cases an artifact can take: all of them for eager weights; for a component torch.compile compiles for
    static shapes, the cases at the batch the pipeline calls it at (each new shape compiles it again: parity at batch
    1 and the images at batch 2 compiled a tiny UNet twice); for an AOTInductor package, those inside the shapes it
    was exported for (its example shape when it is static or none fits)."""
    info = read_info(artifact)
    chosen = info["options"]
    if info["mode"] == "compile" and spec.named_in(chosen["compile_components"]) and not chosen["compile_dynamic"]:
        return tuple(dict.fromkeys(replace(c, batch=info.get("call_batch", c.batch)) for c in cases))
    if info["mode"] != "aoti":
        return cases
    ex = info["example"]
    example = Case(ex["batch"], ex["height"], ex["width"])
    ranges = info.get("shape_ranges")
    if info["dynamic"] is None or not ranges:
        return (example,)
    inside = tuple(c for c in cases if all(ranges[k][0] <= getattr(c, k) <= ranges[k][1]
                                           for k in ("batch", "height", "width")))
    return inside or (example,)


# --- running --------------------------------------------------------------------------------------------------

_RESIDENT: list[nn.Module] = []  # model offload: the one module on the GPU now


def release_resident() -> None:
    """Model offload: the module on the GPU back to CPU memory (a measurement starts from nothing resident)."""
    if _RESIDENT:
        _RESIDENT.pop().to("cpu")


class TorchRunner:
    """A Runner over one component in PyTorch: numpy in, numpy out, the options applied as the recipe says."""

    def __init__(self, artifact: Path, options: TorchOptions, precision: str | None = None):
        self.info = read_info(artifact)
        self.artifact, self.options = artifact, options
        self.spec = component_spec(self.info)
        self.variant = variant(self.info["precision"])
        self.dtype = DTYPES[self.info["dtype"]]
        self.device = resolve_device(options)
        self.input_names = tuple(t.name for t in self.spec.inputs)
        self.output_names = tuple(t.name for t in self.spec.outputs)
        self.applied: dict[str, Any] = {}
        self.compile_seconds: dict[str, float] = {}
        self.module: nn.Module | None = None
        # Whether torch.compile runs this component, and with Inductor's freezing: set where the function is made.
        self.compiled = self.frozen = False
        if self.info["mode"] == "aoti":
            self.fn = self._load_package()
        else:
            self.fn = self._load_module()

    def _load_package(self) -> Any:
        built_for = self.info["device"]
        if built_for != self.device:
            raise DiffshipError(f"{self.artifact} was compiled for {built_for}; this run uses {self.device}. Rebuild the "
                                f"package on a machine with the device it will run on (device = '{self.device}').")
        # The package is unzipped into the temp folder first; a full disk there reads only "write callback failed".
        needed, where = self.artifact.stat().st_size, Path(tempfile.gettempdir())
        if shutil.disk_usage(where).free < needed:
            raise DiskFull(where, needed)
        try:
            return torch._inductor.aoti_load_package(str(self.artifact))
        except RuntimeError as exc:
            if "write callback failed" in str(exc):  # miniz's word for a short write: the temp folder filled up
                raise DiskFull(where, needed) from exc
            raise

    def _load_module(self) -> Any:
        weights = self.artifact
        if self.spec.is_denoiser and is_compressed(weights):
            module = load_compressed(weights, False)
        else:
            config = json.loads((weights / "config.json").read_text(encoding="utf-8"))
            class_name = (config.get("architectures") or [config.get("_class_name")])[0]
            module = load_folder(weights, self.spec.module, class_name, dtype=self.dtype)
        module = module.to(self.dtype)
        self.applied = apply_options(module, self.spec, self.options)
        self.module = module
        wrapper = CastIO(wrap(self.spec, module), self.spec, self.dtype).eval()
        offload = self.options.offload
        if offload == "sequential":
            from accelerate import cpu_offload  # start-up time: accelerate

            cpu_offload(module, execution_device=torch.device("cuda"))
        elif offload == "none":
            wrapper.to(self.device)
        if self.variant.mode == "compile" and self.spec.named_in(self.options.compile_components):
            self.compiled, self.frozen = True, freezing(self.options, self.device)
            return torch.compile(wrapper, mode=self.options.compile_mode, dynamic=self.options.compile_dynamic)
        return wrapper

    def _resident(self) -> None:
        """Model offload: this component's module onto the GPU, the one there before back to CPU memory."""
        if _RESIDENT and _RESIDENT[0] is self.module:
            return
        if _RESIDENT:
            _RESIDENT.pop().to("cpu")
        assert self.module is not None
        self.module.to(self.device)
        _RESIDENT.append(self.module)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on named arrays; the first call at a new shape under torch.compile is timed as compile time."""
        if self.options.offload == "model":
            self._resident()
        args = [torch.from_numpy(np.ascontiguousarray(inputs[t.name])).to(self.device) for t in self.spec.inputs]
        if self.options.channels_last and args[0].dim() == 4:
            args[0] = args[0].contiguous(memory_format=torch.channels_last)
        shape_key = "x".join(str(s) for s in args[0].shape)
        first = self.compiled and shape_key not in self.compile_seconds
        began = time.perf_counter()
        autocast = torch.autocast(self.device, dtype=DTYPES[self.variant.dtype]) if self.info["autocast"] \
            else contextlib.nullcontext()
        frozen = contextlib.nullcontext()
        if self.frozen:  # read by Inductor when it compiles (first call at each shape)

            frozen = inductor_config.patch(freezing=True)
        with torch.inference_mode(), autocast, frozen:
            out = self.fn(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        result = {t.name: o.float().cpu().numpy() for t, o in zip(self.spec.outputs, out, strict=True)}
        if first:
            self.compile_seconds[shape_key] = round(time.perf_counter() - began, 2)
        return result

    def describe(self) -> Description:
        """The artifact's description plus what this run applied: device, attention, offload, compile times."""
        d = describe_artifact(self.artifact)
        conversion = d.graph["conversion"]
        if self.variant.mode == "compile":
            conversion = (f"torch.compile mode {self.options.compile_mode}{', frozen weights' if self.frozen else ''}"
                          ", first call per shape "
                          + (", ".join(f"{k}: {s:.1f} s" for k, s in self.compile_seconds.items()) or "not yet run")
                          if self.compiled else "eager (not in compile_components)")
        extras = [f"{k} {v}" if not isinstance(v, bool) else k for k, v in self.applied.items()]
        if self.options.offload != "none":
            extras.append(f"{self.options.offload} CPU offload")
        return replace(d, summary=f"{d.summary} on {self.device}" + (f" ({', '.join(extras)})" if extras else ""),
                       graph={**d.graph, "conversion": conversion},
                       details={**d.details, "device": self.device, "compiled": self.compiled,
                                "compile_seconds": dict(self.compile_seconds), "applied": self.applied,
                                "offload": self.options.offload})


def load(artifact: Path, options: TorchOptions | None = None, precision: str | None = None) -> TorchRunner:
    """A Runner for a weights folder or `.pt2` package written by `compile`."""
    return TorchRunner(artifact, options or TorchOptions(), precision)
