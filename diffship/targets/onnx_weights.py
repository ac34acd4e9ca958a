"""Where an ONNX model's external weights lie, read one tensor at a time (the streamed compiles' source)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import ExternalDataInfo


@dataclass(frozen=True)
class StoredTensor:
    """Where one external weight lies: file, offset, length, element type and shape."""

    path: Path
    offset: int
    length: int
    dtype: np.dtype
    shape: tuple[int, ...]

    def read(self) -> np.ndarray:
        count = int(np.prod(self.shape)) if self.shape else 1
        return np.fromfile(self.path, self.dtype, count, offset=self.offset).reshape(self.shape)


def stored_tensor(tensor: onnx.TensorProto, folder: Path) -> StoredTensor:
    """Where the external `tensor` of a model in `folder` keeps its bytes."""
    info = ExternalDataInfo(tensor)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    return StoredTensor(folder / info.location, info.offset or 0, info.length or 0, dtype, tuple(tensor.dims))


SIXTEEN_BITS = (onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16)


def fp32_bytes(onnx_path: Path) -> int:
    """The model's floating-point weights counted in FP32 (what a whole-model tool holds once it has upcast them),
    read from the graph alone."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_type in (onnx.TensorProto.FLOAT, *SIXTEEN_BITS):
            total += 4 * int(np.prod(tensor.dims)) if tensor.dims else 4
    return total


def upcast_bytes(onnx_path: Path) -> int:
    """The FP32 bytes of the 16-bit initializers read through a Cast: what constant folding upcasts at load."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    cast = {n.input[0] for n in model.graph.node if n.op_type == "Cast"}
    return sum(4 * int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in SIXTEEN_BITS and t.name in cast)


def weights_behind_casts(onnx_path: Path) -> bool:
    """Whether some weights are 16-bit initializers read through a Cast (a streamed export's `stored_weights`): tools
    that quantize only constant weights (onnxruntime's `quantize_dynamic`) pass them by."""
    return upcast_bytes(onnx_path) > 0


def as_float32(values: np.ndarray, data_type: int) -> np.ndarray:
    """16-bit values as FP32; BF16 by its bits, which every onnx reads the same way (older ones as uint16)."""
    if data_type == onnx.TensorProto.BFLOAT16:
        return (values.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


def upcast_stored(source: Path, dest: Path) -> Path:
    """`source` with each 16-bit weight read through a Cast to FP32 written as an FP32 initializer instead (the Cast
    gone: what constant folding makes of it), every external weight copied into dest's data file one tensor at a
    time, so no tool that folds the graph whole (polygraphy, ONNX Runtime's quantizer) holds both forms at once."""
    model = onnx.load(str(source), load_external_data=False)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    upcast = {}  # Cast output -> the 16-bit initializer it reads
    for node in graph.node:
        stored = initializers.get(node.input[0]) if node.op_type == "Cast" else None
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if stored is not None and stored.data_type in SIXTEEN_BITS and to == onnx.TensorProto.FLOAT:
            upcast[node.output[0]] = stored
    data = dest.parent / f"{dest.name}_data"
    kept = [t for t in graph.initializer if not (t.data_type in SIXTEEN_BITS and readers.get(t.name, 0) == sum(
        1 for s in upcast.values() if s.name == t.name))]
    written = []
    with data.open("wb") as out:
        for name, tensor in [(t.name, t) for t in kept] + list(upcast.items()):
            inline = tensor.data_location != onnx.TensorProto.EXTERNAL
            if inline and name not in upcast:  # small constants stay in the graph, where the passes read them
                written.append(tensor)
                continue
            values = onnx.numpy_helper.to_array(tensor) if inline else stored_tensor(tensor, source.parent).read()
            if name in upcast:
                values = as_float32(values, tensor.data_type)
            offset = out.tell()
            out.write(np.ascontiguousarray(values).tobytes())
            fresh = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT if name in upcast else tensor.data_type,
                                     dims=tensor.dims, data_location=onnx.TensorProto.EXTERNAL)
            for key, value in (("location", data.name), ("offset", offset), ("length", out.tell() - offset)):
                fresh.external_data.add(key=key, value=str(value))
            written.append(fresh)
    del graph.initializer[:]
    graph.initializer.extend(written)
    nodes = [n for n in graph.node if not (n.op_type == "Cast" and n.output[0] in upcast)]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(dest))
    return dest
