"""A streamed export's second half: the weights of a graph traced without them, written into its data file one
tensor at a time from the component's safetensors.

torch's exporter holds every weight twice at its peak (the module and the ModelProto it serialises: 2 x 19 GB for
T5-XXL in FP32). Traced with `export_params=False` and no constant folding, the graph takes each parameter as an input
named by the wrapper's state dict; here each such input becomes an external initializer, and a Transpose that only
reorders a weight (Linear's MatMul) is applied to the tensor as the one-pass export's constant folding does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper

# One tensor of a component, read alone in FP32.
ReadTensor = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class StreamedWeights:
    """Where a weightless trace's inputs get their values: input name -> key in the folder, and the reader."""

    keys: dict[str, str]
    read: ReadTensor  # the tensor as stored (BF16 / FP16 / FP32 / integer)
    stored: bool = False  # keep 16-bit weights as stored, each followed by a Cast to FP32 (exact, half the bytes)


# ONNX's element types for the 16-bit floats a checkpoint stores (numpy has no bfloat16: written as its bits)
SIXTEEN_BITS = {torch.bfloat16: TensorProto.BFLOAT16, torch.float16: TensorProto.FLOAT16}


def attach_weights(model: onnx.ModelProto, weights: StreamedWeights, data_path: Path,
                   alignment: int, point_to: Callable[[TensorProto, int, int], None]) -> int:
    """Turn each graph input named in `weights.keys` (input name -> the tensor's key in the folder) into an
    initializer whose bytes go to `data_path`; returns the bytes written. An input left without a key stays an input,
    so the caller can refuse a graph that still needs a weight it cannot find."""
    keys = weights.keys
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    kept = [value for value in graph.input if value.name not in keys]
    dropped: set[int] = set()
    renamed: dict[str, str] = {}
    casts: list[onnx.NodeProto] = []
    with data_path.open("wb") as out:
        for value in graph.input:
            if value.name not in keys:
                continue
            tensor = weights.read(keys[value.name])
            if tensor.is_floating_point() and not (weights.stored and tensor.dtype in SIXTEEN_BITS):
                tensor = tensor.to(torch.float32)
            users = consumers.get(value.name, [])
            perm = _only_transpose(users)
            if perm is not None:  # fold it: the weight is stored transposed and the Transposes go
                tensor = tensor.permute(perm).contiguous()
                for user in users:
                    renamed[user.output[0]] = value.name
                    dropped.add(id(user))
            out.write(b"\0" * (-out.tell() % alignment))
            offset = out.tell()
            if tensor.dtype in SIXTEEN_BITS:  # stored as is; the graph reads its FP32 value through a Cast
                data = tensor.view(torch.int16).numpy().tobytes()
                proto = TensorProto(name=f"{value.name}.stored", data_type=SIXTEEN_BITS[tensor.dtype],
                                    dims=tensor.shape)
                casts.append(helper.make_node("Cast", [proto.name], [value.name], name=f"{value.name}.upcast",
                                              to=TensorProto.FLOAT))
            else:
                array = tensor.numpy()
                data = array.tobytes()
                proto = TensorProto(name=value.name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                    dims=array.shape)
            out.write(data)
            point_to(proto, offset, len(data))
            graph.initializer.append(proto)
            del tensor, data
        written = out.tell()
    nodes = casts + [node for node in graph.node if id(node) not in dropped]
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.extend(kept)
    return written


def _only_transpose(users: list[onnx.NodeProto]) -> list[int] | None:
    """The permutation when every consumer of a weight is a Transpose with the same one, else None."""
    if not users or any(u.op_type != "Transpose" for u in users):
        return None
    perms = {tuple(next((a.ints for a in u.attribute if a.name == "perm"), ())) for u in users}
    return list(perms.pop()) if len(perms) == 1 and () not in perms else None
