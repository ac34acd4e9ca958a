"""What a Core ML package is built for: the input shapes it accepts, and what it computes in."""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffship.targets import CompileContext
from diffship.targets.options import vae_fp32_reason

if TYPE_CHECKING:
    from diffship.models.components import ComponentSpec
    from diffship.targets.coreml import CoremlOptions

def package_shapes(context: CompileContext, options: CoremlOptions) -> list[dict[str, tuple[int, ...]]]:
    """The input shapes each package accepts: the validation resolution first (the default), then the extra
    resolutions from the options. Batch is the recipe's smallest; the UNet's is doubled under guidance."""
    spec = context.spec
    if context.static_shapes:
        first = dict(context.static_shapes)
        batch = next(iter(first.values()))[0]
    else:
        batch = spec.batch_for((context.shape_ranges or {"batch": [1, 1]})["batch"][0], context.guided)
        height, width = context.opt_size or context.probe_size
        sizes = spec.axis_sizes(batch, height, width)
        first = {t.name: t.concrete(sizes) for t in spec.inputs}
    sets = [first]
    for height, width in options.resolutions:
        sizes = spec.axis_sizes(batch, height, width)  # refuses a resolution this model cannot take
        shapes = {t.name: t.concrete(sizes) for t in spec.inputs}
        if shapes not in sets:
            sets.append(shapes)
    return sets


def compute_precision(precision: str, spec: ComponentSpec, options: CoremlOptions) -> tuple[str, str | None]:
    """What a component computes in ("fp16" / "fp32") and, when an FP16 set keeps it FP32, why."""
    if precision == "fp32":
        return "fp32", None
    reason = vae_fp32_reason(spec, options.vae_precision)
    return ("fp32", reason) if reason else ("fp16", None)
