"""Core ML conversion proper: a traced torch wrapper to an ML program with the ONNX export's names and shapes, and
coremltools' weight compression (8-bit linear, 6 / 4-bit palettes) of a converted package."""

from __future__ import annotations

import contextlib
import io
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from diffship.errors import DiffshipError
from diffship.targets.coreml_package import COMPRESSION, GROUPED_PALETTE_SPEC, load_coremltools, non_weight_constants, op_counts

if TYPE_CHECKING:
    from diffship.targets.coreml import CoremlOptions

def convert(wrapper: Any, spec: Any, shape_sets: list[dict[str, tuple[int, ...]]], compute: str, target: str,
            support: dict[str, Any]) -> Any:
    """Trace `wrapper` on inputs of the first shape set and convert it to an ML program: inputs and outputs named as
    in the ONNX export, float32 I/O, enumerated shapes where the sets differ. Errors name the op that failed."""
    import torch  # start-up time: torch

    ct = load_coremltools()
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
    import coremltools.optimize.coreml as cto  # optional: coreml

    mode = COMPRESSION[precision]
    if mode is None:
        raise DiffshipError(f"Core ML precision {precision!r} does not compress weights.")
    # Constants that feed no layer weight stay exact. Keyed by name: MIL merges identical constants, so one
    # zero vector can be a layer norm's beta and a linear's bias at once, and a per-op-type rule would conflict.
    keep = dict.fromkeys(non_weight_constants(mlmodel.get_spec()))

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
            before = op_counts(compressed.get_spec())["constexpr_lut_to_dense"]
            compressed = optimize(compressed, only_weights(cto.OpPalettizerConfig(
                mode="kmeans", nbits=mode["nbits"], granularity="per_tensor", weight_threshold=options.weight_threshold)))
            record["per_tensor_fallback"] = op_counts(compressed.get_spec())["constexpr_lut_to_dense"] - before
    return compressed, {**record, "weight_threshold": options.weight_threshold,
                        "seconds": round(time.perf_counter() - began, 2)}
