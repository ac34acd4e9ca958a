"""INT8 fake quantization of the UNet with NVIDIA Model Optimizer, for QAT and QDQ export.

Model Optimizer inserts per-channel weight and per-tensor input quantizers on every conv and linear layer,
calibrates their ranges on the UNet's captured inputs, trains through them (straight-through estimator),
and exports them as ONNX QuantizeLinear / DequantizeLinear pairs with torch's TorchScript exporter, which
is the QDQ form ONNX Runtime, OpenVINO and TensorRT all turn into INT8 kernels.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from torch import nn

from diffship.compress import import_extra
from diffship.compress.distill import run_calls

# Kept in float, as the ONNX Runtime INT8 path does: the time embedding, the first and last convs, and the
# shortcut convs on the up blocks' unnormalised skip concatenations (they carried the whole INT8 loss there).
STATE_FILE = "modelopt_state.pth"


def modelopt_quantization() -> Any:
    """modelopt.torch.quantization, or a DiffshipError naming the extra that installs it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its import warns about untested transformers releases
        return import_extra("modelopt.torch.quantization")


@contextmanager
def plain_attention() -> Iterator[None]:
    """Within this block Model Optimizer quantizes diffusers' Attention as its plain Linear projections.

    Model Optimizer wraps diffusers' Attention to quantize the attention matmuls, routing every attention call
    through an export-only FP8 function that has no backward (QAT cannot train through it) and that the INT8
    recipes leave in float anyway. Quantize and restore must run inside the same block, so that they convert the
    same modules; the wrapper is registered again on exit, for anyone else in the process.
    """
    from diffusers.models.attention_processor import Attention  # start-up time: diffusers

    registry = import_extra("modelopt.torch.quantization.nn").QuantModuleRegistry
    if Attention not in registry:
        yield
        return
    # The registry has no public "get" for a class and its key; these two dicts are what register() fills.
    wrapper, key = registry._registry[Attention], registry._key_registry[Attention]
    registry.unregister(Attention)
    try:
        yield
    finally:
        registry.register({Attention: key})(wrapper)


def kept_float(parts: tuple[str, ...]) -> list[dict[str, Any]]:
    """Model Optimizer quantizer entries that leave every module whose name holds one of `parts` in float."""
    return [{"quantizer_name": f"*{p}*", "enable": False} for p in parts]


def int8_config(keep_float: tuple[str, ...]) -> dict[str, Any]:
    """Model Optimizer's INT8 configuration with the denoiser's declared sensitive layers (`keep_float`, name parts)
    left in float."""
    config = copy.deepcopy(modelopt_quantization().INT8_DEFAULT_CFG)
    config["quant_cfg"] = [*config["quant_cfg"], *kept_float(keep_float)]
    return config


def quantize_int8(denoiser: nn.Module, calls: list[dict[str, np.ndarray]], keep_float: tuple[str, ...]) -> dict[str, Any]:
    """Insert INT8 quantizers into the denoiser `denoiser` in place, the layers named by `keep_float` left in float, and
    calibrate them (max) on the captured calls."""
    config = int8_config(keep_float)
    with plain_attention():
        modelopt_quantization().quantize(denoiser, config, lambda model: run_calls(model, calls))
    quantizers = [m for name, m in denoiser.named_modules() if name.endswith(("weight_quantizer", "input_quantizer"))]
    enabled = sum(1 for q in quantizers if getattr(q, "is_enabled", False))
    return {"library": "nvidia-modelopt", "quantizers": len(quantizers), "enabled": enabled,
            "calibration_calls": len(calls), "kept_float": [f"*{p}*" for p in keep_float]}


def save_state(denoiser: nn.Module, path: Any) -> None:
    """Model Optimizer's own checkpoint: its quantizer placement and ranges plus the weights."""
    import modelopt.torch.opt as mto  # optional: tensorrt

    mto.save(denoiser, path)


def restore_state(denoiser: nn.Module, path: Any) -> nn.Module:
    """Re-insert the saved quantizers into a float UNet of the same structure and load the weights."""
    modelopt_quantization()
    import modelopt.torch.opt as mto  # optional: tensorrt

    with plain_attention():
        return mto.restore(denoiser, path)
