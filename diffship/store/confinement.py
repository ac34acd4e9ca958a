"""Every file an artifact folder makes a backend read lies inside that folder.

An artifact folder may come from someone else (a shared drive, a release bucket), and its manifest's hashes do
not help: whoever wrote the folder wrote the manifest too. So before any backend opens an artifact, each path it
would follow is resolved here: the manifest's own paths, ONNX external-data locations, the OpenVINO `.bin` beside
its `.xml`, the files a Core ML package names, and every symbolic link. A path that is absolute, climbs out with
`..` or leaves through a link is refused, naming the file and the path (onnx's 2024 path-traversal CVEs are this
class of bug). ONNX Runtime 1.32 refuses some of these itself; OpenVINO, onnx's loader and coremltools do not.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from diffship.errors import DiffshipError

# An ONNX file names external data in StringStringEntryProto{key: "location"}: field 1, length 8, "location".
ONNX_LOCATION_KEY = b"\n\x08location"
COREML_MODEL_PATH = "@model_path/"


def inside(root: Path, relative: str, what: str) -> Path:
    """`root / relative`, resolved; refused when `relative` is absolute or resolves outside `root`."""
    if not isinstance(relative, str) or not relative:
        raise DiffshipError(f"{what}: the path {relative!r} is empty or not a string.")
    if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).drive or relative.startswith("\\"):
        raise DiffshipError(f"{what}: the path {relative!r} is absolute; an artifact may only read files inside "
                            f"its own folder {root}. Refusing to load it.")
    if "\0" in relative:
        raise DiffshipError(f"{what}: the path {relative!r} holds a NUL byte. Refusing to load it.")
    base = root.resolve()
    resolved = (base / relative).resolve()
    if not resolved.is_relative_to(base):
        raise DiffshipError(f"{what}: {relative!r} resolves to {resolved}, outside {root}. An artifact may only read "
                            "files inside its own folder. Refusing to load it.")
    return resolved


def check_links(root: Path) -> None:
    """Refuse a symbolic link anywhere under `root` that leads outside it."""
    for path in _walk(root):
        if path.is_symlink():
            inside(root, os.path.relpath(path, root), f"symbolic link {path} (to {os.readlink(path)!r})")


def _walk(root: Path) -> Iterator[Path]:
    for folder, dirs, files in os.walk(root):  # does not follow links into other folders
        for name in (*dirs, *files):
            yield Path(folder) / name


def check_onnx(path: Path) -> None:
    """Every external-data location of an ONNX file resolves inside the file's folder."""
    if not _mentions(path, ONNX_LOCATION_KEY):
        return  # no tensor names a location: nothing to follow (and no need to parse GBs of embedded weights)
    import onnx  # start-up time: onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data  # start-up time: onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError or its own checker errors
        raise DiffshipError(f"{path} is not a readable ONNX file: {exc}") from exc
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            entries = {e.key: e.value for e in tensor.external_data}
            inside(path.parent, entries.get("location", ""), f"{path}: external data of tensor {tensor.name!r}")


def check_openvino_ir(path: Path) -> None:
    """An OpenVINO IR reads its weights from the `.bin` of the same name beside the `.xml`."""
    inside(path.parent, path.name, f"OpenVINO IR {path}")
    inside(path.parent, path.with_suffix(".bin").name, f"OpenVINO weights of {path}")


def check_coreml_package(path: Path) -> None:
    """The files a Core ML package's Manifest.json names, and the weight files its spec names, lie inside it."""
    manifest = path / "Manifest.json"
    if not manifest.is_file():
        raise DiffshipError(f"{path} is not a Core ML package: it has no Manifest.json.")
    try:
        items = json.loads(manifest.read_text(encoding="utf-8")).get("itemInfoEntries", {})
        paths = [item["path"] for item in items.values()]
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        raise DiffshipError(f"{manifest} is not a valid Core ML package manifest: {exc}") from exc
    data = path / "Data"
    for relative in paths:
        item = inside(data, relative, f"{manifest}: item")
        if item.suffix == ".mlmodel" and item.is_file():
            for name in _coreml_weight_files(item):
                if not name.startswith(COREML_MODEL_PATH):
                    raise DiffshipError(f"{item}: weight file {name!r} is not under {COREML_MODEL_PATH}; an artifact may "
                                        "only read files inside its own package. Refusing to load it.")
                inside(item.parent, name.removeprefix(COREML_MODEL_PATH), f"{item}: weight file")


def _coreml_weight_files(spec_path: Path) -> set[str]:
    """Every `fileName` a Core ML spec's blob-file values name (ML programs keep their weights in such files)."""
    try:
        from coremltools.proto import Model_pb2  # optional: coreml
    except ImportError:  # without coremltools nothing here can read the package's weights either
        return set()
    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(spec_path.read_bytes())
    except Exception as exc:  # protobuf's DecodeError
        raise DiffshipError(f"{spec_path} is not a readable Core ML spec: {exc}") from exc
    names: set[str] = set()
    _collect_field(spec, "fileName", names)
    return names


def _collect_field(message: Any, field: str, found: set[str]) -> None:
    for descriptor, value in message.ListFields():
        if descriptor.name == field and isinstance(value, str):
            found.add(value)
        elif descriptor.message_type is not None:
            if descriptor.message_type.GetOptions().map_entry:
                values = list(value.values())
            elif hasattr(value, "ListFields"):
                values = [value]
            else:  # a repeated field
                values = list(value)
            for item in values:
                if hasattr(item, "ListFields"):
                    _collect_field(item, field, found)


def _mentions(path: Path, needle: bytes) -> bool:
    """Whether the file's bytes contain `needle` (memory-mapped: weights of GBs are not read into memory)."""
    try:
        with path.open("rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                return False
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return data.find(needle) >= 0
    except OSError as exc:
        raise DiffshipError(f"Cannot read {path}: {exc.strerror or exc}.") from exc


# What each kind of artifact reads besides itself, by the artifact's suffix.
FORMAT_CHECKS: dict[str, Callable[[Path], None]] = {
    ".onnx": check_onnx,
    ".xml": check_openvino_ir,
    ".mlpackage": check_coreml_package,
}


def check_artifact(artifact: Path) -> None:
    """Refuse an artifact (a component's file or package) that would make its backend read outside its folder."""
    check_links(artifact.parent)
    check = FORMAT_CHECKS.get(artifact.suffix)
    if check is not None and artifact.exists():
        check(artifact)
