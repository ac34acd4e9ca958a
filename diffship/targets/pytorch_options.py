"""The torch target's precisions, options and the hardware checks made before any work (targets/pytorch.py)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
from pydantic import ValidationInfo, field_validator

from diffship.errors import DiffshipError
from diffship.models.families import component_names
from diffship.targets.options import Names, VaeOptions, VaePrecision

NAME = "torch"
INFO = "torch.json"
WEIGHTS = "weights"
PACKAGE = "model.pt2"
PATCH_REFUSAL = ("PyTorch sets compile the weights into an AOTInductor package or trace them with torch.compile; "
                 "diffship does not patch them in place: rebuild with --lora")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("eager", "compile", "aoti")
PRECISIONS = (*DTYPES, "fp16-autocast", "bf16-autocast",
              *(f"{d}-compile" for d in DTYPES), "fp16-autocast-compile", "bf16-autocast-compile",
              *(f"{d}-aoti" for d in DTYPES))
# Inputs that stay FP32 whatever the set's type: diffusers embeds the timestep in FP32 and casts after (in BF16,
# timestep 999 would round to 1000).
FP32_INPUTS = ("timestep",)


@dataclass(frozen=True)
class Variant:
    """What a precision name means: the number format, whether autocast chooses op precision, and how it runs."""

    dtype: str
    autocast: bool
    mode: str  # eager, compile, aoti


def variant(precision: str) -> Variant:
    """Parse a precision of this target (`bf16-autocast-compile` -> bf16, autocast, compile)."""
    if precision not in PRECISIONS:
        raise DiffshipError(f"PyTorch precision {precision!r} is unknown; choose {', '.join(PRECISIONS)}.")
    parts = precision.split("-")
    mode = parts[-1] if parts[-1] in MODES else "eager"
    return Variant(parts[0], "autocast" in parts, mode)


class TorchOptions(VaeOptions):
    """PyTorch settings from the recipe's `[targets.options]`.

    device: "auto" (CUDA when present, else the CPU), "cpu" or "cuda".
    attention: "sdpa" (PyTorch's fused scaled-dot-product attention, diffusers' default) or "slicing" (the UNet's
    attention computed in slices of `attention_slice` heads: "auto" halves them, "max" one at a time, or a number).
    channels_last: UNet and VAE weights and activations in NHWC memory format.
    compile_mode / compile_components / compile_dynamic: for `-compile` precisions, `torch.compile(mode=...)` on those
    components (the UNet, called every step, and the VAE decoder by default), specialized per shape unless dynamic.
    aoti_components: for `-aoti` precisions, the components packaged with AOTInductor (None: every one, so the set
    runs without diffusers or transformers); the others ship their weights and run eager. Each package costs a
    C++ build (about 20 s for a tiny model's text encoder, minutes at full size).
    freezing: Inductor treats the weights as constants (folds them, pre-packs them for oneDNN) in compiled sets and
    packages; "auto" turns it on for the CPU, where it made the sd15-arch UNet 1.24x (FP32) faster than without.
    vae_slicing / vae_tiling: diffusers' VAE memory savers (one image at a time; tiles for large images).
    offload: "model" (one component on the GPU at a time) or "sequential" (layer by layer) CPU offload; GPU only.
    vae_precision: "auto" keeps SDXL's VAE in FP32 in FP16 sets (it overflows in FP16); "fp16" / "fp32" force it.
    """

    title: ClassVar[str] = "PyTorch"

    device: Literal["auto", "cpu", "cuda"] = "auto"
    attention: Literal["sdpa", "slicing"] = "sdpa"
    attention_slice: Literal["auto", "max"] | int = "auto"
    channels_last: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    compile_components: Names = ("denoiser", "vae_decoder")  # names, or "denoiser" for the model's
    compile_dynamic: bool = False
    aoti_components: Names | None = None
    freezing: bool | Literal["auto"] = "auto"
    vae_slicing: bool = False
    vae_tiling: bool = False
    offload: Literal["none", "model", "sequential"] = "none"
    vae_precision: VaePrecision = "auto"

    @field_validator("compile_components", "aoti_components")
    @classmethod
    def _known_components(cls, value: tuple[str, ...] | None, info: ValidationInfo) -> tuple[str, ...] | None:
        if bad := [c for c in value or () if c not in component_names()]:
            raise ValueError(f"{info.field_name} {', '.join(map(repr, bad))} unknown; choose from "
                             f"{', '.join(component_names())}.")
        return value

    @field_validator("attention_slice", mode="before")
    @classmethod
    def _slice(cls, value: Any) -> str | int:
        if value in ("auto", "max") or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"attention_slice must be 'auto', 'max' or a positive number of heads, not {value!r}.")


COMPILE_MODES: tuple[str, ...] = get_args(TorchOptions.model_fields["compile_mode"].annotation)


def parse_options(options: dict[str, Any]) -> TorchOptions:
    """The recipe's `[targets.options]` for PyTorch, with unknown keys and values named with their choices."""
    return TorchOptions.parse(options)


def writes_artifacts(precision: str, options: Any = None) -> bool:
    """Every set writes its own files: the weights in the set's type, or the AOTInductor package."""
    return True


def needs_calibration(precision: str) -> bool:
    """No precision of this target is calibrated."""
    return False


def model_index(family: str, components: list[str]) -> dict[str, Any]:
    """model_index.json entries for a PyTorch set's folder (diffship's pipeline loads it)."""
    return {"_class_name": "DiffshipTorchPipeline", **{c: ["diffship", "TorchComponent"] for c in components}}


# --- hardware ------------------------------------------------------------------------------------------------


def resolve_device(options: TorchOptions) -> str:
    """The device the options ask for: CUDA when present under "auto"; a clear error for CUDA without a GPU."""
    if options.device == "cuda" and not torch.cuda.is_available():
        raise DiffshipError("device = 'cuda' but PyTorch sees no CUDA GPU here (torch "
                            f"{torch.__version__}); use device = 'cpu' or 'auto'.")
    if options.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return options.device


def bf16_unsupported(device: str) -> str | None:
    """Why BF16 cannot run fast on `device`, or None: CUDA needs compute capability 8.0 (Ampere) or newer, the CPU
    AVX-512 BF16 or AMX (oneDNN's check). Elsewhere PyTorch emulates it, slower than FP32."""
    if device == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return None
        major, minor = torch.cuda.get_device_capability()
        return f"{torch.cuda.get_device_name()} (compute capability {major}.{minor}) has no BF16 kernels; 8.0 or newer does"
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return "this CPU has no BF16 instructions (AVX-512 BF16 or AMX), so PyTorch would emulate BF16, slower than FP32"


def environment(options: TorchOptions) -> dict[str, Any]:
    """What a compiled package is tied to: the device (GPU name, or the CPU's vector ISA) and the torch build."""
    device = resolve_device(options)
    return {"device": device, "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **({"gpu": torch.cuda.get_device_name()} if device == "cuda" else {})}


def preflight(precisions: list[str], options: TorchOptions) -> None:
    """Refuse, before any work, what this machine cannot run: CUDA or offload without a GPU, BF16 without BF16
    kernels, compiled code without a C++ compiler, and offload mixed with compilation."""
    device = resolve_device(options)
    variants = [variant(p) for p in precisions]
    if options.offload != "none":
        if device != "cuda":
            raise DiffshipError(f"offload = {options.offload!r} moves weights between CPU memory and a GPU; there is no "
                                "CUDA GPU here (set offload = 'none').")
        if compiled := [p for p, v in zip(precisions, variants, strict=True) if v.mode != "eager"]:
            raise DiffshipError(f"offload = {options.offload!r} cannot be combined with {', '.join(compiled)}: compiled "
                                "code fixes where each weight lives. Build an eager precision to offload.")
    if any(v.dtype == "bf16" for v in variants) and (reason := bf16_unsupported(device)):
        raise DiffshipError(f"BF16 requested ({', '.join(p for p in precisions if p.startswith('bf16'))}) but {reason}. "
                            "Build fp32 (or fp16 on a GPU) instead.")
    if device == "cpu" and any(v.mode != "eager" for v in variants) and not _cxx_compiler():
        raise DiffshipError("torch.compile and AOTInductor on the CPU generate C++ and need a C++ compiler (g++ or "
                            "clang++); none is on PATH. Install one (apt install g++) or build eager precisions.")


def freezing(options: TorchOptions, device: str) -> bool:
    """Whether Inductor freezes the weights: as the option says; "auto" on the CPU (PyTorch's advice for CPU
    inference, measured in docs/performance.md), off on CUDA."""
    return device == "cpu" if options.freezing == "auto" else bool(options.freezing)


def _cxx_compiler() -> str | None:
    return shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")
