"""Graph rewrites that let phone execution providers (NNAPI, Core ML) take a component whole.

What blocks them on an exported SD UNet (onnxruntime's usability checker, `digits-sd` at fixed shapes: NNAPI 92 % of
the nodes in 54 partitions): the timestep embedding's `Sin` / `Cos` and the broadcast logic before it (`Equal`,
`Where`, `Expand`), GroupNorm as `InstanceNormalization`, `LayerNormalization`, and GELU's `Erf`. Each rewrite here
replaces one of them with operators both providers list, computing the same function:
- the sinusoidal timestep embedding moves to the host (`timestep_embedding`, as diffusers computes it): the graph
  takes the embedding as an input, and its `Sin` / `Cos` / broadcast nodes go;
- InstanceNormalization and LayerNormalization become ReduceMean / Sub / Mul / Add / Sqrt / Div (exact);
- Erf becomes Abramowitz & Stegun's rational approximation 7.1.26 in those ops (|error| < 1.5e-7);
- with the shapes pinned, shape arithmetic folds to constants (polygraphy, as the ONNX Runtime target folds).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

EMBEDDING_INPUT = "timestep_embedding"
ERF_CONSTANTS = {"p": 0.3275911, "a1": 0.254829592, "a2": -0.284496736, "a3": 1.421413741, "a4": -1.453152027,
                 "a5": 1.061405429, "one": 1.0, "minus_one": -1.0, "tiny": 1e-30}


def host_timestep_embedding(model: onnx.ModelProto) -> int | None:
    """Make the UNet take its sinusoidal timestep embedding as input `timestep_embedding` [batch, dim] instead of
    `timestep`, dropping the nodes that computed it; the embedding's width, or None when the graph has no such path."""
    graph = model.graph
    if not any(i.name == "timestep" for i in graph.input):
        return None
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    # Walk from `timestep` to the first Gemm / MatMul: its input is the embedding (time_proj's output).
    front, seen, cut = ["timestep"], set(), None
    while front and cut is None:
        for node in consumers.get(front.pop(0), []):
            if node.op_type in ("Gemm", "MatMul"):
                cut = node
                break
            if id(node) not in seen:
                seen.add(id(node))
                front.extend(node.output)
    if cut is None:
        return None
    embedding = cut.input[0]
    weights = {t.name: t for t in graph.initializer}
    weight = weights[cut.input[1]]
    transposed = cut.op_type == "Gemm" and any(a.name == "transB" and a.i for a in cut.attribute)
    width = weight.dims[1] if transposed else weight.dims[0]
    batch = next(i for i in graph.input if i.name == "timestep").type.tensor_type.shape.dim[0]
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == embedding:
                node.input[k] = EMBEDDING_INPUT
    timestep = next(i for i in graph.input if i.name == "timestep")
    graph.input.remove(timestep)
    shape = [batch.dim_value if batch.HasField("dim_value") else batch.dim_param or "batch", width]
    graph.input.append(helper.make_tensor_value_info(EMBEDDING_INPUT, onnx.TensorProto.FLOAT, shape))
    remove_dead_nodes(model)
    return width


def remove_dead_nodes(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs reach no graph output, and initializers nothing reads."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    used = {name for node in graph.node for name in node.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)


def decompose_norms_and_erf(model: onnx.ModelProto) -> dict[str, int]:
    """Replace InstanceNormalization, LayerNormalization and Erf with elementary ops; how many of each."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    counts = {"InstanceNormalization": 0, "LayerNormalization": 0, "Erf": 0}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type in counts:
            counts[node.op_type] += 1
            rank = _rank(model, node.input[0])
            nodes.extend(_REWRITES[node.op_type](node, initializers, graph, rank))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    remove_dead_nodes(model)
    return {k: v for k, v in counts.items() if v}


def _const(graph: onnx.GraphProto, name: str, value: Any) -> str:
    graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
    return name


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    found = next((a for a in node.attribute if a.name == name), None)
    return helper.get_attribute_value(found) if found is not None else default


def _normalize(node: onnx.NodeProto, x: str, axes: list[int], epsilon: float,
               graph: onnx.GraphProto) -> tuple[list[onnx.NodeProto], str]:
    p = node.name or node.output[0]
    eps = _const(graph, f"{p}/epsilon", epsilon)
    made = [
        helper.make_node("ReduceMean", [x], [f"{p}/mean"], axes=axes, keepdims=1),
        helper.make_node("Sub", [x, f"{p}/mean"], [f"{p}/centered"]),
        helper.make_node("Mul", [f"{p}/centered", f"{p}/centered"], [f"{p}/squared"]),
        helper.make_node("ReduceMean", [f"{p}/squared"], [f"{p}/variance"], axes=axes, keepdims=1),
        helper.make_node("Add", [f"{p}/variance", eps], [f"{p}/variance_eps"]),
        helper.make_node("Sqrt", [f"{p}/variance_eps"], [f"{p}/std"]),
        helper.make_node("Div", [f"{p}/centered", f"{p}/std"], [f"{p}/normalized"]),
    ]
    return made, f"{p}/normalized"


def _affine(node: onnx.NodeProto, normalized: str, scale: str | None, bias: str | None, shape: list[int] | None,
            initializers: dict[str, onnx.TensorProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """`normalized` * scale + bias into the node's output, skipping a scale of ones and a bias of zeros."""
    p, out, made, current = node.name or node.output[0], node.output[0], [], normalized
    for kind, name, neutral in (("Mul", scale, 1.0), ("Add", bias, 0.0)):
        if not name:
            continue
        value = numpy_helper.to_array(initializers[name]) if name in initializers else None
        if value is not None and np.all(value == neutral):
            continue
        operand = name
        if shape is not None:  # per channel: [C] -> [1, C, 1, ...]
            operand = _const(graph, f"{p}/{kind.lower()}_operand", np.asarray(value).reshape(shape))
        made.append(helper.make_node(kind, [current, operand], [f"{p}/{kind.lower()}"]))
        current = f"{p}/{kind.lower()}"
    made.append(helper.make_node("Identity", [current], [out]))
    return made


def _instance_norm(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto], graph: onnx.GraphProto,
                   rank: int) -> list[onnx.NodeProto]:
    made, normalized = _normalize(node, node.input[0], list(range(2, rank)), _attr(node, "epsilon", 1e-5), graph)
    channels = [1, -1] + [1] * (rank - 2)
    return made + _affine(node, normalized, node.input[1], node.input[2], channels, initializers, graph)


def _layer_norm(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto], graph: onnx.GraphProto,
                rank: int) -> list[onnx.NodeProto]:
    axis = _attr(node, "axis", -1)
    axes = list(range(axis % rank, rank))
    made, normalized = _normalize(node, node.input[0], axes, _attr(node, "epsilon", 1e-5), graph)
    scale = node.input[1] if len(node.input) > 1 else None
    bias = node.input[2] if len(node.input) > 2 else None
    return made + _affine(node, normalized, scale, bias, None, initializers, graph)


def _erf(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto], graph: onnx.GraphProto,
         rank: int) -> list[onnx.NodeProto]:
    """erf(z) = sign(z) (1 - t (a1 + t (a2 + ... + t a5)) exp(-z^2)), t = 1 / (1 + p |z|): Abramowitz & Stegun 7.1.26,
    |error| < 1.5e-7. |z| is sqrt(z^2) and sign(z) is z / (|z| + 1e-30): Abs and Sign are not in Core ML's list."""
    p, z = node.name or node.output[0], node.input[0]
    c = {k: _const(graph, f"{p}/{k}", v) for k, v in ERF_CONSTANTS.items()}
    made = [helper.make_node("Mul", [z, z], [f"{p}/z2"]),
            helper.make_node("Sqrt", [f"{p}/z2"], [f"{p}/abs"]),
            helper.make_node("Mul", [f"{p}/abs", c["p"]], [f"{p}/pz"]),
            helper.make_node("Add", [f"{p}/pz", c["one"]], [f"{p}/den"]),
            helper.make_node("Div", [c["one"], f"{p}/den"], [f"{p}/t"]),
            helper.make_node("Mul", [f"{p}/t", c["a5"]], [f"{p}/h5"])]
    previous = f"{p}/h5"
    for k in ("a4", "a3", "a2", "a1"):
        made += [helper.make_node("Add", [previous, c[k]], [f"{p}/s{k}"]),
                 helper.make_node("Mul", [f"{p}/s{k}", f"{p}/t"], [f"{p}/h{k}"])]
        previous = f"{p}/h{k}"
    made += [helper.make_node("Mul", [f"{p}/z2", c["minus_one"]], [f"{p}/negz2"]),
             helper.make_node("Exp", [f"{p}/negz2"], [f"{p}/gauss"]),
             helper.make_node("Mul", [previous, f"{p}/gauss"], [f"{p}/tail"]),
             helper.make_node("Sub", [c["one"], f"{p}/tail"], [f"{p}/magnitude"]),
             helper.make_node("Add", [f"{p}/abs", c["tiny"]], [f"{p}/abs_eps"]),
             helper.make_node("Div", [z, f"{p}/abs_eps"], [f"{p}/sign"]),
             helper.make_node("Mul", [f"{p}/magnitude", f"{p}/sign"], [node.output[0]])]
    return made


_REWRITES = {"InstanceNormalization": _instance_norm, "LayerNormalization": _layer_norm, "Erf": _erf}


def _rank(model: onnx.ModelProto, name: str) -> int:
    for value in (*model.graph.value_info, *model.graph.input, *model.graph.output):
        if value.name == name and value.type.tensor_type.HasField("shape"):
            return len(value.type.tensor_type.shape.dim)
    raise ValueError(f"no shape known for {name}: run shape inference first")


def name_empty_resize_roi(model: onnx.ModelProto) -> int:
    """Give each Resize's empty `roi` input a named empty constant: onnxruntime's usability checker counts an unnamed
    optional input as a dynamic shape and splits the graph there (the same Resize, the same result)."""
    count = 0
    for node in model.graph.node:
        if node.op_type == "Resize" and len(node.input) > 1 and node.input[1] == "":
            name = f"{node.name or node.output[0]}/roi"
            model.graph.initializer.append(numpy_helper.from_array(np.zeros(0, np.float32), name))
            node.input[1] = name
            count += 1
    return count
