"""Before a build exports, compiles or validates anything (the model is resolved first): whether each stage fits in
the memory the build may use, estimated from the component's FP32 weights with the factors measured at full size, so
a machine too small for a stage says so (exit 2, nothing written) instead of being killed half-way through it. Each
estimate follows the stage's own "auto" choice between holding the weights whole and streaming them.

The factors are peaks measured on 24 GiB (docs/performance.md): a one-pass export holds about 1.5x the weights
(sdxl-arch's UNet: 13.94 GiB for 9.58), OpenVINO's converter and ONNX Runtime's INT8 quantization about 1.9x (15.0 /
18.2 GiB); the streamed paths hold one tensor or block beside what they keep (weight-only IRs hold their compressed
weights). A stage whose peak is not known (other targets) is not estimated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from diffship.errors import DiffshipError
from diffship.exporters.pipeline import ONE_PASS_PEAK, choose_streamed
from diffship.host.memory import GIB, PROCESS
from diffship.models.streamed_module import streams_reference
from diffship.models.weightless import fp32_bytes_or_none
from diffship.stages.context import Context
from diffship.targets import get_target

# what an IR made weight by weight keeps of the FP32 weights (openvino_streamed.py)
KEPT = {"int8-weights": 0.25, "int4-weights": 0.15, "fp16": 0.5, "bf16": 0.5}


@dataclass(frozen=True)
class Need:
    """One stage's estimated peak, and how it was estimated."""

    stage: str
    bytes: int
    how: str


def weight_bytes(folder: Path) -> int:
    """A component's weights in FP32 (safetensors headers; other files by their size)."""
    if any(folder.glob("*.safetensors")) and (weights := fp32_bytes_or_none(folder)) is not None:
        return weights
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def needs(c: Context) -> list[Need]:
    """The estimated peak of each stage the recipe will run that has a measured factor."""
    recipe, folder = c.recipe, c.source.folder
    weights = {s.module: weight_bytes(folder / s.module) for s in c.specs}
    found: list[Need] = []
    for spec in c.specs:
        w = weights[spec.module]
        if choose_streamed(recipe.export.streamed, folder, spec.module):
            found.append(Need(f"export of {spec.name}", PROCESS + w // 8, "streamed: one tensor at a time"))
        else:
            found.append(Need(f"export of {spec.name}", PROCESS + int(ONE_PASS_PEAK * w),
                              f"one pass: {ONE_PASS_PEAK}x its {w / GIB:.1f} GiB of FP32 weights"))
    for target in recipe.targets:
        backend = get_target(target.name)
        options = backend.parse_options(target.options)
        # the compile's own "auto" choice, asked with the weights before the export exists
        streams = getattr(backend.module, "streams_bytes", lambda weights, options: False)
        peak = getattr(backend.module, "WHOLE_MODEL_PEAK", 0.0)  # its whole-model compile, as the target declares it
        for precision in target.precisions:
            for spec in c.specs:
                if (need := _compile_need(target.name, precision, spec, weights[spec.module], peak,
                                          streams(weights[spec.module], options), _stored(c, spec.module))):
                    found.append(Need(f"{target.name} {precision} compile of {spec.name}", *need))
    modules = {s.module for s in c.specs}
    held = sorted(m for m in modules if not streams_reference(recipe.validation.streamed_reference, folder, m))
    streamed = sorted(modules - set(held))
    found.append(Need("PyTorch baseline", PROCESS + sum(weights[m] for m in held),
                      f"{', '.join(held)} held whole" + (f", {', '.join(streamed)} block by block" if streamed else "")))
    return found


def _stored(c: Context, module: str) -> bool:
    """Whether the export keeps the module's 16-bit weights behind Casts (ONNX Runtime's INT8 then streams)."""
    return c.recipe.export.stored_weights and choose_streamed(c.recipe.export.streamed, c.source.folder, module)


def _compile_need(target: str, precision: str, spec: Any, w: int, peak: float, streams: bool, stored: bool
                  ) -> tuple[int, str] | None:
    """One compile's estimated peak and how it was estimated, where its target has a measured factor."""
    if target == "openvino":
        kept = KEPT.get("int8-weights" if precision == "int8-hybrid" and not spec.denoises else precision)
        if kept and streams:
            return PROCESS + int(kept * w), "weight by weight: what the IR keeps"
        return PROCESS + int(peak * w), f"the converter's {peak}x its FP32 weights"
    if target == "onnxruntime" and precision.startswith("int8"):
        if spec.role == "text_encoder" and (streams or stored):
            return PROCESS + w // 8, "one MatMul at a time"
        if spec.role == "text_encoder" or spec.denoises:
            return PROCESS + int(peak * w), f"quantization's {peak}x its FP32 weights"
        return None  # a VAE kept in FP32: a link to the export
    if target == "onnxruntime" and precision == "fp16":
        return PROCESS + int(1.5 * w), "the FP32 graph and its FP16 copy (1.5x, an estimate not measured)"
    return None


def check_memory(c: Context) -> None:
    """Refuse the build, before any stage runs, when one would need more memory than it may use: the recipe's
    `memory_gib`, else what this machine has available now."""
    limit = int(c.recipe.memory_gib * GIB) if c.recipe.memory_gib else psutil.virtual_memory().available
    where = (f"the recipe's memory_gib = {c.recipe.memory_gib:g}" if c.recipe.memory_gib
             else f"{limit / GIB:.1f} GiB available on this machine")
    over = [n for n in needs(c) if n.bytes > limit]
    if over:
        worst = max(over, key=lambda n: n.bytes)
        raise DiffshipError(
            f"Not enough memory: the {worst.stage} needs about {worst.bytes / GIB:.1f} GiB ({worst.how}), over "
            f"{where}" + (f"; {len(over) - 1} more stage(s) too" if len(over) > 1 else "") + ". Nothing was built. "
            "Full-size transformers stream their weights ([export] streamed, [validation] streamed_reference, "
            "OpenVINO int8-weights / int4-weights with streamed), or build on a larger machine.")
