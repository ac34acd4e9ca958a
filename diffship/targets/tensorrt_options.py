"""The TensorRT target's precisions, options, what TensorRT is here (its module, the GPU, the versions an engine is
tied to), the checks made before any work, and the optimization profiles an engine is built for."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field

from diffship.errors import DiffshipError
from diffship.models.components import ComponentSpec
from diffship.targets.options import VaeOptions, VaePrecision

Shape = tuple[int, ...]
FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper onwards

NAME = "tensorrt"


PRECISIONS = ("fp16", "bf16", "tf32", "fp32", "int8", "int8-auto", "fp8")


PATCHABLE = ("fp16", "bf16", "tf32", "fp32")  # engines a LoRA swap can refit (built with refit = true)


REFIT_WEIGHTS = "weights.onnx"


CALIBRATED = ("int8", "int8-auto", "fp8")


ENGINE = "model.plan"


ENGINE_INFO = "engine.json"


# Kept in FP32 when the rest of a graph is converted to FP16: the quantize / dequantize pairs carry FP32 scales
# at opset 17, and Model Optimizer's FP8 pairs are TensorRT plugin ops the converter must not retype.
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear")


INSTALL = ("pip install 'diffship[tensorrt]' on a machine with an NVIDIA GPU and driver "
           "(or build docker/Dockerfile.tensorrt)")


class TrtOptions(VaeOptions):
    """The recipe's `[targets.options]` for TensorRT.

    device: CUDA device index. optimization_level: the builder's 0-5 (higher searches longer for faster
    kernels). workspace_gib: the builder's scratch memory limit (None: TensorRT's default, the device's memory).
    timing_cache: file of measured kernel timings reused across builds (None: one per GPU and TensorRT
    version in diffship's cache; "" off). static_shapes: build a static profile when the recipe fixes batch
    and resolution. opt_batch: the batch the dynamic profile is tuned for (None: the smallest).
    cuda_graph: replay a captured CUDA graph for static engines. vae_precision: see `VaeOptions`.
    smoothquant_alpha and conv_percentile: the INT8 denoiser's SmoothQuant migration strength and convolution-input
    percentile. refit: build refittable engines and keep the ONNX they were parsed from beside them (`weights.onnx`,
    its initializers name the engine's weights), so `diffship lora apply` can refit new weights without a rebuild.
    """

    title: ClassVar[str] = "TensorRT"

    device: int = 0
    optimization_level: int = Field(3, ge=0, le=5)
    workspace_gib: float | None = Field(None, gt=0)
    timing_cache: str | None = None
    static_shapes: bool = True
    opt_batch: int | None = Field(None, ge=1)
    cuda_graph: bool = True
    vae_precision: VaePrecision = "auto"
    smoothquant_alpha: float = Field(0.8, ge=0.0, le=1.0)
    conv_percentile: float = Field(99.99, gt=0.0, le=100.0)
    refit: bool = False


def parse_options(options: dict[str, Any]) -> TrtOptions:
    """The recipe's TensorRT options, with unknown keys and bad values named."""
    return TrtOptions.parse(options)


def writes_artifacts(precision: str, options: Any = None) -> bool:
    """Every TensorRT precision is a new engine."""
    return True


def needs_calibration(precision: str) -> bool:
    """INT8 and FP8 quantize the UNet on its captured inputs."""
    return precision in CALIBRATED


def model_index(family: str, components: list[str]) -> dict[str, Any]:
    """model_index.json entries for an engine folder (no hub pipeline loads TensorRT engines; diffship's does)."""
    return {"_class_name": "DiffshipTensorRTPipeline", **{c: ["diffship", "TensorRTEngine"] for c in components}}


def load_tensorrt() -> Any:
    """The tensorrt module, or a DiffshipError that says what to install."""
    try:
        import tensorrt  # optional: tensorrt
    except ModuleNotFoundError as exc:
        raise DiffshipError(f"The TensorRT target needs the 'tensorrt' package ({exc}): {INSTALL}.") from None
    except ImportError as exc:  # the bindings wheel alone imports without its libraries and fails here
        raise DiffshipError(f"TensorRT is installed but cannot load its libraries ({exc}): {INSTALL}.") from None
    return tensorrt


def cuda_device(device: int) -> Any:
    if not torch.cuda.is_available():
        raise DiffshipError("TensorRT engines build and run on an NVIDIA GPU, and PyTorch sees no CUDA device here "
                            "(torch.cuda.is_available() is False).")
    if not 0 <= device < torch.cuda.device_count():
        raise DiffshipError(f"CUDA device {device} does not exist; this machine has {torch.cuda.device_count()}.")
    return torch.device("cuda", device)


def environment(options: TrtOptions | None = None) -> dict[str, str]:
    """What an engine built here is tied to: GPU model, compute capability, TensorRT and CUDA versions."""
    options = options or TrtOptions()
    trt = load_tensorrt()
    device = cuda_device(options.device)
    major, minor = torch.cuda.get_device_capability(device)
    return {"gpu": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}",
            "tensorrt": trt.__version__, "cuda": str(torch.version.cuda)}


def check_compatible(built: dict[str, str], here: dict[str, str], path: Path | str = "engine") -> None:
    """Refuse an engine built for another GPU model, compute capability, or TensorRT / CUDA version."""
    differs = [f"{key} {built.get(key)!r} (here {here.get(key)!r})" for key in ("gpu", "compute_capability",
                                                                                 "tensorrt", "cuda")
               if built.get(key) != here.get(key)]
    if differs:
        raise DiffshipError(f"{path} was built for another machine or TensorRT: {'; '.join(differs)}. TensorRT "
                            "engines only run where they were built: rebuild it here with `diffship build`.")


def check_fp8(compute_capability: str, gpu: str = "this GPU") -> None:
    """Refuse FP8 below compute capability 8.9 (Ada, Hopper and later run FP8 kernels)."""
    major, minor = (int(p) for p in compute_capability.split("."))
    if (major, minor) < FP8_MIN_CAPABILITY:
        need = ".".join(map(str, FP8_MIN_CAPABILITY))
        raise DiffshipError(f"FP8 needs an Ada or Hopper (or newer) GPU, compute capability {need} or more; {gpu} "
                            f"has {compute_capability}. Use int8 or fp16 there.")


def preflight(precisions: list[str], options: TrtOptions) -> None:
    """Before any work: TensorRT loads, a GPU is present, and it can run every precision asked for."""
    trt = load_tensorrt()
    env = environment(options)
    if "fp8" in precisions:
        check_fp8(env["compute_capability"], env["gpu"])
    if "bf16" in precisions and not hasattr(trt.BuilderFlag, "BF16"):
        raise DiffshipError(f"TensorRT {trt.__version__} has no BF16 builder flag (TensorRT 11 types networks from "
                            "the ONNX), and diffship does not write BF16 ONNX yet: build fp16 instead.")


def profile_shapes(spec: ComponentSpec, ranges: dict[str, list[int]], opt_size: tuple[int, int],
                   guided: bool, opt_batch: int | None = None,
                   static: dict[str, Shape] | None = None) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) per input from the recipe's batch and pixel ranges; min = opt = max when `static`.

    The UNet takes twice the batch under classifier-free guidance, so its batch range runs from the smallest
    unguided batch to twice the largest, and it is tuned for the guided batch when the recipe guides."""
    if static is not None:
        return {name: (shape, shape, shape) for name, shape in static.items()}
    (b_low, b_high), (h_low, h_high), (w_low, w_high) = ranges["batch"], ranges["height"], ranges["width"]
    opt_b = opt_batch or b_low
    if not b_low <= opt_b <= b_high:
        raise DiffshipError(f"TensorRT opt_batch {opt_b} is outside shapes.batch [{b_low}, {b_high}].")
    # text tokens from one T5 token to T5's 512 where T5 feeds the component (SD3, Flux), else CLIP's fixed 77
    low = spec.axis_sizes(b_low, h_low, w_low, spec.min_sequence)
    high = spec.axis_sizes(spec.batch_for(b_high, True), h_high, w_high, spec.max_sequence)
    opt = spec.axis_sizes(spec.batch_for(opt_b, guided), *opt_size)
    return {t.name: (t.concrete(low), t.concrete(opt), t.concrete(high)) for t in spec.inputs}


def check_shape(name: str, shape: Shape, profile: tuple[Shape, Shape, Shape], path: Path | str = "engine") -> None:
    """Refuse an input shape outside the engine's profile, naming the range it was built for."""
    low, _, high = profile
    if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high, strict=True)):
        raise DiffshipError(f"Input {name!r} has shape {tuple(shape)}, outside the profile {path} was built for: "
                            f"min {tuple(low)}, max {tuple(high)}. Rebuild with wider [shapes] in the recipe.")
