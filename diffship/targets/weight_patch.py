"""Patch an artifact's weights in place of a rebuild: find each changed PyTorch weight among an ONNX graph's
initializers or an OpenVINO IR's constants by value, and write the new value where the old one was stored.

Weights are found by value, not by name, because the exporter names most MatMul weights anonymously
(`onnx::MatMul_123`), stores them transposed, and graph preparation renames and splits them again; a stored
tensor is the PyTorch weight (or its transpose) cast to the stored type. ONNX keeps weights in the model or in
an external data file, OpenVINO in its `.bin` at offsets its `.xml` lists: both are patched byte for byte, so
everything but the changed weights stays identical. Neither library offers an in-place constant patch, which is
why the file layout is read here (onnx's own reader for the model, the IR's documented `<data offset size>`).
"""

from __future__ import annotations

import mmap
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffship.errors import DiffshipError
from diffship.targets import get_target

IR_TYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


QUANTIZED = ("int8", "int4", "fp8")  # precisions whose weights were quantized against the old values


def patch_refusal(target: str, precision: str) -> str | None:
    """Why a set of `target` / `precision` cannot take new weights in place, or None when it can."""
    if any(q in precision for q in QUANTIZED):
        return "its weights are quantized: re-quantize: rebuild with --lora"
    backend = get_target(target)
    if not backend.can_patch:
        return backend.PATCH_REFUSAL
    if precision not in backend.PATCHABLE:
        return f"{target} patches {', '.join(backend.PATCHABLE)} sets only: rebuild with --lora"
    return None


@dataclass(frozen=True)
class Stored:
    """One stored float tensor: its name, type, shape and where its bytes are (file None: inside the ONNX model)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    file: Path | None
    offset: int
    length: int


@dataclass(frozen=True)
class Change:
    """A weight before and after (FP32, PyTorch's layout), named `component:module` for messages."""

    name: str
    before: np.ndarray
    after: np.ndarray


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # start-up time: ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _casts(values: np.ndarray, dtype: np.dtype) -> list[tuple[str, np.ndarray]]:
    """`values` as the ways a converter may have stored them in `dtype`: plain rounding and, for FP16, ONNX
    Runtime's converter, which keeps tiny values at the smallest subnormal instead of flushing them to zero."""
    forms = [("cast", values.astype(dtype))]
    if dtype == np.float16:
        from onnxruntime.transformers.float16 import convert_np_to_float16  # start-up time: onnxruntime

        forms.append(("ort-fp16", convert_np_to_float16(values)))
    return forms


def _layouts(values: np.ndarray) -> list[tuple[bool, np.ndarray]]:
    """The weight as it may be stored: as is, or transposed (a Linear exported as MatMul)."""
    return [(False, values)] + ([(True, np.ascontiguousarray(values.T))] if values.ndim == 2 else [])


def locate(stored: list[Stored], read: Callable[[Stored], bytes], changes: list[Change]) -> dict[str, tuple[Stored, bool, str]]:
    """For each change, the one stored tensor holding its `before` value: (where, transposed, cast). A weight
    that is not found, or found twice, is an error naming it: such an artifact needs a rebuild."""
    by_shape: dict[tuple[int, ...], list[Stored]] = {}
    for s in stored:
        by_shape.setdefault(s.shape, []).append(s)
    prints: dict[Stored, bytes] = {}

    def fingerprint(s: Stored) -> bytes:
        if s not in prints:
            data = read(s)
            prints[s] = data[:256] + data[len(data) // 2: len(data) // 2 + 256] + data[-256:]
        return prints[s]

    found, missing, ambiguous = {}, [], []
    for change in changes:
        hits = []
        for transposed, laid in _layouts(change.before):
            candidates = by_shape.get(laid.shape, [])
            for dtype in {s.dtype for s in candidates}:
                for cast, values in _casts(laid, dtype):
                    data = values.tobytes()
                    head = data[:256] + data[len(data) // 2: len(data) // 2 + 256] + data[-256:]
                    hits += [(s, transposed, cast) for s in candidates
                             if s.dtype == dtype and s.length == len(data) and fingerprint(s) == head and read(s) == data]
        unique = {h[0].name: h for h in hits}
        if not unique:
            missing.append(change.name)
        elif len(unique) > 1:
            ambiguous.append(change.name)
        else:
            found[change.name] = next(iter(unique.values()))
    if missing or ambiguous:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weight(s) are not stored as exported ({', '.join(missing[:6])}"
                         + (" ..." if len(missing) > 6 else "") + ")")
        if ambiguous:
            parts.append(f"{len(ambiguous)} are stored more than once ({', '.join(ambiguous[:6])})")
        raise DiffshipError("; ".join(parts) + ": these artifacts cannot be patched; rebuild with --lora.")
    return found


def new_bytes(change: Change, where: Stored, transposed: bool, cast: str) -> bytes:
    """`change.after` laid out and cast the way `change.before` was stored."""
    values = np.ascontiguousarray(change.after.T) if transposed else change.after
    return dict(_casts(values, where.dtype))[cast].tobytes()


def onnx_stored(path: Path) -> tuple[object, list[Stored]]:
    """An ONNX model (weights not loaded) and its float initializers."""
    import onnx  # start-up time: onnx
    from onnx.external_data_helper import uses_external_data  # start-up time: onnx
    from onnx.helper import tensor_dtype_to_np_dtype  # start-up time: onnx

    model = onnx.load(str(path), load_external_data=False)
    stored = []
    for tensor in model.graph.initializer:
        if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
            continue
        dtype = _dtype("bfloat16") if tensor.data_type == onnx.TensorProto.BFLOAT16 else \
            np.dtype(tensor_dtype_to_np_dtype(tensor.data_type))
        shape = tuple(int(d) for d in tensor.dims)
        if uses_external_data(tensor):
            info = {e.key: e.value for e in tensor.external_data}
            stored.append(Stored(tensor.name, dtype, shape, path.parent / info["location"], int(info.get("offset", 0)),
                                 int(info["length"])))
        else:
            stored.append(Stored(tensor.name, dtype, shape, None, 0, int(np.prod(shape)) * dtype.itemsize))
    return model, stored


def ir_stored(xml: Path) -> list[Stored]:
    """The float constants of an OpenVINO IR and where its `.bin` holds them."""
    stored = []
    for layer in ET.parse(xml).getroot().iter("layer"):
        data = layer.find("data")
        if layer.get("type") != "Const" or data is None or data.get("element_type") not in IR_TYPES:
            continue
        shape = tuple(int(d) for d in data.get("shape", "").split(",") if d.strip())
        stored.append(Stored(layer.get("name", layer.get("id")), _dtype(IR_TYPES[data.get("element_type")]), shape,
                             xml.with_suffix(".bin"), int(data.get("offset")), int(data.get("size"))))
    return stored


class _Files:
    """Memory-mapped reads of weight files, closed together."""

    def __init__(self):
        self.maps: dict[Path, mmap.mmap] = {}

    def read(self, s: Stored, inline: Callable[[Stored], bytes] | None = None) -> bytes:
        if s.file is None:
            return inline(s)
        if s.file not in self.maps:
            with s.file.open("rb") as f:
                self.maps[s.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self.maps[s.file][s.offset: s.offset + s.length]

    def close(self) -> None:
        for m in self.maps.values():
            m.close()


def _write_at(path: Path, patches: list[tuple[int, bytes]]) -> None:
    with path.open("r+b") as f:
        for offset, data in patches:
            f.seek(offset)
            f.write(data)


def patch_onnx(source: Path, dest: Path, changes: list[Change]) -> dict[str, str]:
    """Copy the ONNX model at `source` (and its external data) to `dest` with `changes` written over the old
    weights; the initializer each change landed in."""
    import onnx  # start-up time: onnx
    from onnx import numpy_helper  # start-up time: onnx

    model, stored = onnx_stored(source)
    inline = {t.name: t for t in model.graph.initializer}
    files = _Files()
    try:
        found = locate(stored, lambda s: files.read(s, lambda i: numpy_helper.to_array(inline[i.name]).tobytes()),
                       changes)
    finally:
        files.close()
    external: dict[Path, list[tuple[int, bytes]]] = {}
    for change in changes:
        where, transposed, cast = found[change.name]
        data = new_bytes(change, where, transposed, cast)
        if where.file is None:
            tensor = inline[where.name]
            array = np.frombuffer(data, dtype=where.dtype).reshape(where.shape)
            tensor.CopyFrom(numpy_helper.from_array(array, where.name))
        else:
            external.setdefault(where.file, []).append((where.offset, data))
    dest.parent.mkdir(parents=True, exist_ok=True)
    for data_file in {s.file for s in stored if s.file is not None}:
        shutil.copyfile(data_file, dest.parent / data_file.name)
    for data_file, patches in external.items():
        _write_at(dest.parent / data_file.name, patches)
    onnx.save(model, str(dest))
    return {name: where.name for name, (where, _, _) in found.items()}


def patch_ir(source: Path, dest: Path, changes: list[Change]) -> dict[str, str]:
    """Copy the OpenVINO IR at `source` (`.xml` + `.bin`) to `dest` with `changes` written over the old constants."""
    stored = ir_stored(source)
    files = _Files()
    try:
        found = locate(stored, files.read, changes)
    finally:
        files.close()
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    shutil.copyfile(source.with_suffix(".bin"), dest.with_suffix(".bin"))
    _write_at(dest.with_suffix(".bin"), [(where.offset, new_bytes(change, where, transposed, cast))
                                         for change in changes
                                         for where, transposed, cast in [found[change.name]]])
    return {name: where.name for name, (where, _, _) in found.items()}


def onnx_replacements(source: Path, changes: list[Change]) -> dict[str, np.ndarray]:
    """Initializer name -> its new value, for engines refitted by name (TensorRT) or sessions given overrides."""
    from onnx import numpy_helper  # start-up time: onnx

    model, stored = onnx_stored(source)
    inline = {t.name: t for t in model.graph.initializer}
    files = _Files()
    try:
        found = locate(stored, lambda s: files.read(s, lambda i: numpy_helper.to_array(inline[i.name]).tobytes()),
                       changes)
    finally:
        files.close()
    return {where.name: np.frombuffer(new_bytes(c, where, t, cast), dtype=where.dtype).reshape(where.shape)
            for c in changes for where, t, cast in [found[c.name]]}


def ir_replacements(xml: Path, changes: list[Change]) -> dict[str, np.ndarray]:
    """IR constant (layer) name -> its new value, for a model whose constants are replaced in memory (OpenVINO)."""
    stored = ir_stored(xml)
    files = _Files()
    try:
        found = locate(stored, files.read, changes)
    finally:
        files.close()
    return {where.name: np.frombuffer(new_bytes(c, where, t, cast), dtype=where.dtype).reshape(where.shape)
            for c in changes for where, t, cast in [found[c.name]]}

