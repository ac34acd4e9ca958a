"""ONNX Runtime's dynamic INT8 of a text encoder too large to quantize whole (T5-XXL: `quantize_dynamic` loads its
19 GB of FP32 weights and writes a second model beside them): each MatMul with a constant weight is quantized by
`quantize_dynamic` itself on a model of that one MatMul, and its nodes and INT8 weight spliced in, the weight read
alone from the export's data file (FP32, or 16-bit behind a Cast as a streamed export stores it).

The result computes what `quantize_dynamic` on the whole FP32 export does (tests/test_onnxruntime_streamed.py): the
weights' quantization is per MatMul; an activation several MatMuls read is quantized once per MatMul instead of once
(the same numbers, a few more small nodes). On a streamed export with 16-bit weights behind Casts, `quantize_dynamic`
itself would leave those MatMuls in float (it quantizes constant weights only): here they are quantized as the FP32
export's are.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from diffship.targets.onnx_weights import stored_tensor

ALIGNMENT = 1 << 16


def quantize_dynamic_streamed(source: Path, out: Path) -> dict[str, Any]:
    """`quantize_dynamic(source, out, op_types_to_quantize=["MatMul"], weight_type=QInt8)`, one MatMul at a time;
    `out`'s weights in `out`_data. Returns the count of MatMuls quantized."""
    model = onnx.load(str(source), load_external_data=False)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    casts = {n.output[0]: n for n in graph.node if n.op_type == "Cast" and n.input[0] in initializers}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1

    def weight_of(name: str) -> tuple[np.ndarray, list[str]] | None:
        """A MatMul's constant weight in FP32, and the tensors it alone reads (dropped once it is quantized)."""
        if name in initializers:
            return _value(initializers[name], source), [name] if readers[name] == 1 else []
        if name in casts and readers[name] == 1:  # a 16-bit weight kept as stored, read through its Cast
            stored = casts[name].input[0]
            return _value(initializers[stored], source).astype(np.float32), [name, *([stored] if readers[stored] == 1
                                                                                      else [])]
        return None

    outputs = {o.name for o in graph.output}
    nodes: list[onnx.NodeProto] = []
    added: list[TensorProto] = []
    dropped: set[str] = set()
    domains: dict[str, int] = {}
    quantized = 0
    data_path = out.with_name(f"{out.name}_data")
    with data_path.open("wb") as data:
        for node in graph.node:
            found = weight_of(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
            if found is None or found[0].ndim != 2:
                nodes.append(node)
                continue
            weight, unused = found
            one_nodes, one_weights, one_domains = _quantized_one(node, weight)
            nodes.extend(one_nodes)
            for tensor in one_weights:
                added.append(_written(tensor, data, data_path.name))
            dropped.update(unused)
            domains.update(one_domains)
            quantized += 1
        dropped_casts = {casts[name].output[0] for name in dropped if name in casts}
        kept_nodes = [n for n in nodes if not (n.op_type == "Cast" and n.output[0] in dropped_casts)]
        # a weight several quantized MatMuls read has no reader left either: not copied
        read = {name for n in kept_nodes for name in n.input}
        kept_nodes = [n for n in kept_nodes if not (n.op_type == "Cast" and n.input[0] in initializers
                                                     and n.output[0] not in read and n.output[0] not in outputs)]
        read = {name for n in kept_nodes for name in n.input} | outputs
        kept = []
        for tensor in graph.initializer:  # the rest, copied tensor by tensor
            if tensor.name in dropped or tensor.name not in read:
                continue
            kept.append(_written(numpy_helper.from_array(_value(tensor, source), tensor.name), data, data_path.name)
                        if uses_external_data(tensor) else tensor)
    del graph.node[:]
    graph.node.extend(kept_nodes)
    del graph.initializer[:]
    graph.initializer.extend([*kept, *added])
    for domain, version in domains.items():
        if not any(o.domain == domain for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(domain, version))
    out.write_bytes(model.SerializeToString())
    return {"matmuls_quantized": quantized}


def _value(tensor: TensorProto, source: Path) -> np.ndarray:
    if uses_external_data(tensor):
        return stored_tensor(tensor, source.parent).read()
    return numpy_helper.to_array(tensor)


def _written(tensor: TensorProto, data: Any, location: str) -> TensorProto:
    """`tensor` with its bytes appended to the open data file, pointing there."""
    raw = tensor.raw_data or numpy_helper.to_array(tensor).tobytes()
    data.write(b"\0" * (-data.tell() % ALIGNMENT))
    offset = data.tell()
    data.write(raw)
    out = TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
        entry = out.external_data.add()
        entry.key, entry.value = key, value
    out.data_location = TensorProto.EXTERNAL
    return out


def _quantized_one(node: onnx.NodeProto, weight: np.ndarray
                   ) -> tuple[list[onnx.NodeProto], list[TensorProto], dict[str, int]]:
    """`quantize_dynamic` on a model of `node` alone: its nodes and initializers, every inner name made unique."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # optional: onnxruntime's quantization

    activation, output = node.input[0], node.output[0]
    one = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", [activation, "weight"], [output], name=node.name or output)], "one",
        [helper.make_tensor_value_info(activation, TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ascontiguousarray(weight, dtype=np.float32), "weight")]),
        opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory(prefix=".one-matmul-") as scratch:
        path, quantized_path = Path(scratch) / "one.onnx", Path(scratch) / "one-int8.onnx"
        onnx.save(one, str(path))
        quantize_dynamic(path, quantized_path, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
        done = onnx.load(str(quantized_path))
    prefix = f"{node.name or output}/int8/"
    keep = {activation, output, ""}

    def renamed(name: str) -> str:
        return name if name in keep else prefix + name

    for inner in done.graph.node:
        inner.name = prefix + (inner.name or inner.op_type)
        inner.input[:] = [renamed(n) for n in inner.input]
        inner.output[:] = [renamed(n) for n in inner.output]
    weights = []
    for tensor in done.graph.initializer:
        tensor.name = renamed(tensor.name)
        weights.append(tensor)
    return list(done.graph.node), weights, {o.domain: o.version for o in done.opset_import if o.domain}

