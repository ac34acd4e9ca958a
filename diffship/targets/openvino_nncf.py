"""NNCF's passes over an OpenVINO model: data-free INT8 MatMul weights and calibrated post-training quantization, as
optimum-intel's hybrid mode runs them, quietly."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import openvino as ov

if TYPE_CHECKING:
    from diffship.targets.openvino import OvOptions

def ignored_patterns(parts: tuple[str, ...]) -> tuple[str, ...]:
    """NNCF ignored-scope regexes for the layers whose names hold one of `parts` (a denoiser's declared names)."""
    return tuple(f".*{p}.*" for p in parts)


def compress_matmul_weights(model: ov.Model, sensitive: tuple[str, ...] = ()) -> tuple[ov.Model, list[str]]:
    """INT8 weights, data-free, for the MatMuls with weights but the `sensitive` ones; return the model and their
    names (optimum-intel's first hybrid step: convolutions are left to calibration)."""
    import nncf  # optional: openvino

    weighted = weighted_matmuls(model)
    model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=nncf.IgnoredScope(
        patterns=list(sensitive), types=["Convolution"], validate=False))
    return model, weighted


def quantize_calibrated(model: ov.Model, calls: list[dict[str, np.ndarray]], options: OvOptions,
                        sensitive: tuple[str, ...] = (), compressed: list[str] | tuple[str, ...] = ()) -> ov.Model:
    """NNCF post-training quantization of `model` on `calls`, the `sensitive` layers kept in float and the
    `compressed` MatMuls (weights already INT8) left out, with SmoothQuant off for them as optimum-intel does."""
    import nncf  # optional: openvino

    settings = quantize_kwargs(options)
    advanced = settings.pop("advanced_quantization_parameters")
    types = sorted({op.get_type_name() for op in model.get_ops()} - {"Convolution", "Parameter", "Result", "Constant"}) \
        if options.activations == "convolutions" else []
    ignored = nncf.IgnoredScope(names=list(compressed), patterns=list(sensitive), types=types, validate=False) \
        if sensitive or compressed or types else None
    if compressed:
        advanced.smooth_quant_alphas = nncf.AdvancedSmoothQuantParameters(matmul=-1)
    with _nncf_quiet():
        return nncf.quantize(model, nncf.Dataset(calls), subset_size=len(calls), ignored_scope=ignored,
                             advanced_parameters=advanced, **settings)


@contextlib.contextmanager
def _nncf_quiet() -> Iterator[None]:
    """NNCF logs one INFO line per operation it leaves unquantized (hundreds with an ignored scope): warnings only."""
    from nncf.common.logging import nncf_logger  # optional: openvino

    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        nncf_logger.setLevel(level)


def weighted_matmuls(model: ov.Model) -> list[str]:
    """Friendly names of the MatMuls fed a constant (through Convert / Transpose / Reshape), the ones weight
    compression takes."""
    def constant_behind(node: Any) -> bool:
        while node.get_type_name() in ("Convert", "Transpose", "Reshape"):
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant"

    return [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "MatMul"
            and any(constant_behind(op.input_value(i).get_node()) for i in (0, 1))]


def quantize_kwargs(options: OvOptions) -> dict[str, Any]:
    import nncf  # optional: openvino

    return {"model_type": nncf.ModelType.TRANSFORMER, "preset": nncf.QuantizationPreset(options.preset),
            "advanced_quantization_parameters": nncf.AdvancedQuantizationParameters(
                smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=options.smooth_quant_alpha),
                disable_bias_correction=not options.bias_correction)}
