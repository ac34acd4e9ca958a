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

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

# One tensor of a component, read alone in FP32.
ReadTensor = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class StreamedWeights:
    """Where a weightless trace's inputs get their values: input name -> key in the folder, and the reader."""

    keys: dict[str, str]
    read: ReadTensor


def attach_weights(model: onnx.ModelProto, keys: dict[str, str], read: ReadTensor, data_path: Path,
                   alignment: int, point_to: Callable[[TensorProto, int, int], None]) -> int:
    """Turn each graph input named in `keys` (input name -> the tensor's key in the folder) into an initializer
    whose bytes go to `data_path`; returns the bytes written. An input left without a key stays an input, so the
    caller can refuse a graph that still needs a weight it cannot find."""
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    kept = [value for value in graph.input if value.name not in keys]
    dropped: set[int] = set()
    renamed: dict[str, str] = {}
    with data_path.open("wb") as out:
        for value in graph.input:
            if value.name not in keys:
                continue
            array = read(keys[value.name]).numpy()
            users = consumers.get(value.name, [])
            perm = _only_transpose(users)
            if perm is not None:  # fold it: the weight is stored transposed and the Transposes go
                array = np.ascontiguousarray(array.transpose(perm))
                for user in users:
                    renamed[user.output[0]] = value.name
                    dropped.add(id(user))
            out.write(b"\0" * (-out.tell() % alignment))
            offset = out.tell()
            data = array.tobytes()
            out.write(data)
            tensor = TensorProto(name=value.name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                 dims=array.shape)
            point_to(tensor, offset, len(data))
            graph.initializer.append(tensor)
            del array, data
        written = out.tell()
    nodes = [node for node in graph.node if id(node) not in dropped]
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
