"""Graphs built for one shape (the browser's and the phones'): the shapes they are pinned to, the pinning, and the
one parity case each can take. Shared by the web and mobile targets, below both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from diffship.targets import Case, CompileContext, onnx_graph


def pinned_shapes(context: CompileContext) -> dict[str, tuple[int, ...]]:
    """The input shapes the browser graph is built for: the recipe's when it pins them, else one image (both halves
    of guidance for the denoiser) at the validation's resolution."""
    if context.static_shapes:
        return context.static_shapes
    height, width = context.opt_size or context.probe_size
    batch = (context.shape_ranges or {"batch": [1]})["batch"][0]
    spec = context.spec
    sizes = spec.axis_sizes(spec.batch_for(batch, context.guided), height, width)
    return {t.name: t.concrete(sizes) for t in spec.inputs}


def pin(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> None:
    """Fix every input's dimensions (onnxruntime's own tool, as its mobile docs do) and the outputs' where shape
    inference can tell them."""
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed  # start-up time: onnxruntime

    for name, shape in shapes.items():
        make_input_shape_fixed(model.graph, name, list(shape))
    if onnx_graph.small_enough_to_measure(model) and model.ByteSize() < onnx_graph.TWO_GB:
        fix_output_shapes(model)


def pinned_case(spec: Any, artifact: Path, cases: tuple[Any, ...]) -> tuple[Any, ...]:
    """The one case a graph was built for: its batch and the image size its first input stands for."""
    shape = onnx_graph.input_shapes(artifact)[spec.inputs[0].name]
    return (Case(shape[0], *(spec.image_size(shape) or (cases[0].height, cases[0].width))),)
