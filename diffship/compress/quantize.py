"""Post-training quantization in PyTorch: optimum-quanto on any device, bitsandbytes on CUDA.

optimum-quanto, not torchao: quanto calibrates static INT8 activation ranges on real inputs
(`Calibration()`), which torchao offers only as a prototype, and both quantize weights to INT8 / INT4.
Neither result is an ONNX graph: these steps are measured in PyTorch (the torch backend runs them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffship.compress import import_extra
from diffship.compress.distill import run_calls
from diffship.errors import DiffshipError
from diffship.store.artifacts import read_json


def quanto(denoiser: nn.Module, weights: str, activations: str, calls: list[dict[str, np.ndarray]],
           keep_float: tuple[str, ...]) -> dict[str, Any]:
    """Quantize the denoiser's conv and linear layers in place, except those whose names hold a part of `keep_float`
    (the denoiser's declared sensitive layers); INT8 activations are calibrated on its captured calls."""
    q = import_extra("optimum.quanto")

    kinds = {"int8": q.qint8, "int4": q.qint4}
    if weights not in kinds:
        raise DiffshipError(f"quantize: optimum-quanto quantizes weights to int8 or int4, not {weights!r} "
                            "(nf4 is bitsandbytes').")
    acts = q.qint8 if activations == "int8" else None
    q.quantize(denoiser, weights=kinds[weights], activations=acts, exclude=[f"*{p}*" for p in keep_float])
    if acts is not None:
        with q.Calibration():
            run_calls(denoiser, calls)
    q.freeze(denoiser)
    return {"library": "optimum-quanto", "weights": weights, "activations": activations,
            "layers": len(q.quantization_map(denoiser)), "calibration_calls": len(calls) if acts else 0}


def quanto_map(denoiser: nn.Module) -> dict[str, Any]:
    """quanto's record of which layer was quantized how, saved beside the weights to re-quantize on load."""
    from optimum.quanto import quantization_map  # optional: compress

    return quantization_map(denoiser)


def requanto(denoiser: nn.Module, state: dict[str, torch.Tensor], qmap: dict[str, Any]) -> nn.Module:
    """Rebuild a quanto-quantized UNet from its float structure, saved state and quantization map."""
    from optimum.quanto import requantize  # optional: compress

    requantize(denoiser, state, qmap, device=torch.device("cpu"))
    return denoiser


def bitsandbytes_denoiser(folder: Path, component: str, weights: str) -> tuple[nn.Module, dict[str, Any]]:
    """Load the denoiser `component` with bitsandbytes 8-bit or NF4 linear layers through diffusers (CUDA only)."""
    if not torch.cuda.is_available():
        raise DiffshipError("quantize with library = 'bitsandbytes' needs a CUDA GPU (bitsandbytes' 8-bit and NF4 "
                            "kernels); on a CPU use library = 'quanto'.")
    try:
        import bitsandbytes  # noqa: F401  optional: cuda
        import diffusers  # start-up time: diffusers
        from diffusers import BitsAndBytesConfig  # start-up time: diffusers
    except ImportError as exc:
        raise DiffshipError("quantize with library = 'bitsandbytes' needs the bitsandbytes package: "
                            "pip install 'diffship[cuda]'.") from exc
    if weights == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    elif weights == "nf4":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16)
    else:
        raise DiffshipError(f"quantize: bitsandbytes loads weights as int8 or nf4, not {weights!r}.")
    model_class = getattr(diffusers, read_json(folder / component / "config.json")["_class_name"])
    model = model_class.from_pretrained(folder, subfolder=component, quantization_config=config,
                                        torch_dtype=torch.float16)
    return model.eval().requires_grad_(False), {"library": "bitsandbytes", "weights": weights}
