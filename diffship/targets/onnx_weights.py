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
