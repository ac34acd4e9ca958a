"""The UNet as explicitly quantized (QDQ) ONNX for TensorRT, made with NVIDIA Model Optimizer.

INT8 follows NVIDIA's diffusion recipe: SmoothQuant on the linear layers (per-channel weights; activations
per tensor after the smoothing moved their outlier channels into the weights), percentile ranges for the
convolution inputs (a few outliers would otherwise set the range of the whole tensor), and the layers that
quantization hurts most kept in float. FP8 (E4M3) quantizes the same layers per tensor with max ranges.
Both are calibrated on the UNet's real captured inputs; attention matmuls stay in float in both. The result
is exported with torch's TorchScript exporter, the route Model Optimizer's quantizers export through.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from diffship.compress.distill import run_calls
from diffship.compress.qat import kept_float, modelopt_quantization, plain_attention
from diffship.errors import DiffshipError
from diffship.models.components import ComponentSpec, wrap

MODES = ("int8", "fp8")


def quant_config(mode: str, alpha: float, keep_float: tuple[str, ...] = ()) -> dict[str, Any]:
    """Model Optimizer's INT8 SmoothQuant (with `alpha`) or FP8 configuration, the layers named by `keep_float` in
    float (none for int8-auto, whose search starts from every layer quantized)."""
    mtq = modelopt_quantization()
    if mode not in MODES:
        raise DiffshipError(f"Unknown QDQ mode {mode!r}; choose {', '.join(MODES)}.")
    if not 0.0 <= alpha <= 1.0:
        raise DiffshipError(f"SmoothQuant alpha must be within [0, 1], got {alpha}.")
    config = copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG if mode == "int8" else mtq.FP8_DEFAULT_CFG)
    if mode == "int8":
        config["algorithm"] = {"method": "smoothquant", "alpha": alpha}
    config["quant_cfg"] = [*config["quant_cfg"], *kept_float(keep_float)]
    return config


def _percentile_conv_inputs(denoiser: nn.Module, calls: list[dict[str, np.ndarray]], percentile: float) -> int:
    """Re-calibrate every quantized convolution input to the `percentile` of its absolute values; the count."""
    from modelopt.torch.quantization.calib import HistogramCalibrator  # optional: tensorrt


    quantizers = [m.input_quantizer for m in denoiser.modules()
                  if isinstance(m, nn.Conv2d) and getattr(m, "input_quantizer", None) is not None
                  and m.input_quantizer.is_enabled]
    # mtq.quantize runs one algorithm for every layer (SmoothQuant's max ranges here), so the convolutions get
    # Model Optimizer's own histogram calibrator in a second pass over the same calls.
    for q in quantizers:
        q._calibrator = HistogramCalibrator(num_bits=8, axis=None, unsigned=False)
        q.disable_quant()
        q.enable_calib()
    run_calls(denoiser, calls)
    for q in quantizers:
        q.load_calib_amax("percentile", percentile=percentile)
        q.enable_quant()
        q.disable_calib()
    return len(quantizers)


def quantize_unet(denoiser: nn.Module, calls: list[dict[str, np.ndarray]], mode: str = "int8", alpha: float = 0.8,
                  percentile: float = 99.99, *, keep_float: tuple[str, ...]) -> dict[str, Any]:
    """Insert and calibrate `mode` quantizers in the denoiser `denoiser` (FP32, on the CPU or a GPU) in place, the layers
    named by `keep_float` left in float; what was done."""
    if not calls:
        raise DiffshipError("Quantizing the denoiser needs calibration calls; none were captured.")
    if not 0.0 < percentile <= 100.0:
        raise DiffshipError(f"Convolution calibration percentile must be within (0, 100], got {percentile}.")
    config = quant_config(mode, alpha, keep_float)
    with plain_attention(), warnings.catch_warnings():
        # SmoothQuant warns once per layer kept in float ("not calibrated, skip smoothing"): that is the intent.
        warnings.filterwarnings("ignore", message=".*is not calibrated, skip smoothing")
        modelopt_quantization().quantize(denoiser, config, lambda model: run_calls(model, calls))
    convs = _percentile_conv_inputs(denoiser, calls, percentile) if mode == "int8" and percentile < 100.0 else 0
    quantizers = [m for name, m in denoiser.named_modules() if name.endswith(("weight_quantizer", "input_quantizer"))]
    enabled = sum(1 for q in quantizers if getattr(q, "is_enabled", False))
    if not enabled:
        raise DiffshipError("Model Optimizer inserted no enabled quantizer into the denoiser; nothing would run in "
                            f"{mode.upper()}.")
    return {"library": "nvidia-modelopt", "mode": mode, "quantizers_enabled": enabled, "calibration_calls": len(calls),
            "linear": f"SmoothQuant alpha {alpha}" if mode == "int8" else "FP8 E4M3 max",
            "conv_inputs": f"percentile {percentile}" if convs else "max",
            "kept_float": [f"*{p}*" for p in keep_float],
            "attention_matmuls": "float"}


def export_qdq(denoiser: nn.Module, spec: ComponentSpec, dest: Path, opset: int = 17) -> Path:
    """Export the quantized `denoiser` as QDQ ONNX into `dest`; the model.onnx path."""
    from diffship.exporters.onnx import export_component  # start-up time: onnx

    return export_component(spec, wrap(spec, denoiser), dest, opset, {"diffship.quantized": "modelopt"})
