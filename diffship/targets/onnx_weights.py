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
