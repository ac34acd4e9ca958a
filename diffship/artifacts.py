"""Output layout, manifest, content hashes and atomic writes.

Nothing is ever written where a finished artifact would be until it is complete: files and
folders are built under a hidden temporary name in the same directory and renamed into place.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffship.errors import DiffshipError

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = 1


def _umask_mode(mode: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, _umask_mode(0o666))  # mkstemp makes 0600; finished files get the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield a hidden temporary folder beside `final`; move it to `final` only if the block succeeds.

    Whatever is at `final` when the block succeeds (an empty folder, or an earlier output that
    `prepare_output_dir` allowed to be replaced) is swapped out only after the new one is complete.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    # A killed run (SIGKILL, power loss) leaves its staging folder behind; it never counts as output, and the
    # next run for the same path clears it. Two runs writing the same path at once are not supported.
    for stale in final.parent.glob(f".{glob.escape(final.name)}.*.partial"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        os.chmod(tmp, _umask_mode(0o777))  # mkdtemp makes 0700
        yield tmp
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_path(final: Path) -> Iterator[Path]:
    """Yield a hidden path beside `final`, not yet created and with the same suffix, for writers that create the file
    or folder themselves and insist on its extension (coremltools' .mlpackage); move it to `final` if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.stem}.{os.getpid()}.partial{final.suffix}")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir():
            _replace_dir(tmp, final)
        else:
            os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Check that `out` can receive a new export: absent, empty, or (with overwrite) an earlier diffship output."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise DiffshipError(f"Output path {out} exists and is a file; choose a folder path.")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DiffshipError(
                f"Output folder {out} already exists and is not empty. "
                "Choose a new folder, or pass --overwrite to replace an earlier diffship output."
            )
        if not (out / MANIFEST_NAME).is_file():
            raise DiffshipError(
                f"Output folder {out} is not empty and holds no diffship {MANIFEST_NAME}; "
                "refusing to overwrite a folder diffship did not write."
            )
    parent = _nearest_existing_parent(out)
    # Try it rather than trust os.access, which says yes to root even on read-only filesystems.
    try:
        tempfile.TemporaryDirectory(prefix=".diffship-probe-", dir=parent).cleanup()
    except OSError as exc:
        raise DiffshipError(f"Output location {out} is not writable ({parent}: {exc.strerror or exc}).") from exc


def _nearest_existing_parent(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise DiffshipError(f"Output path {path} is under {parent}, which is not a folder.")
            return parent
    return Path("/")


def _replace_dir(staged: Path, final: Path) -> None:
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()
    if final.exists():
        backup = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, backup)
        os.replace(staged, final)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staged, final)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Content hash of a file, streamed so multi-GB weights do not need to fit in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entries(root: Path, folder: Path) -> list[dict[str, Any]]:
    """Path (relative to root), size and hash of each file under `folder`, sorted by path."""
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        entries.append(
            {"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        )
    return entries


def read_manifest(folder: Path) -> dict[str, Any]:
    """Load a diffship output folder's manifest, with a clear error when the folder is not one."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise DiffshipError(f"{folder} is not a diffship output folder (no {MANIFEST_NAME}); run `diffship export` first.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DiffshipError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("schema") != MANIFEST_SCHEMA:
        raise DiffshipError(f"{path} has manifest schema {manifest.get('schema')!r}; this diffship reads {MANIFEST_SCHEMA}.")
    return manifest


def verify_files(root: Path, entries: list[dict[str, Any]]) -> None:
    """Refuse a folder whose files differ from what its manifest recorded (size, then sha256)."""
    for entry in entries:
        path = root / entry["path"]
        if not path.is_file():
            raise DiffshipError(f"{path} is listed in {root / MANIFEST_NAME} but missing; the artifact folder is incomplete.")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise DiffshipError(
                f"{path} does not match the sha256 recorded in {root / MANIFEST_NAME}: it was modified or "
                "corrupted after the build. Refusing to run it; rebuild the artifacts."
            )


@dataclass(frozen=True)
class ArtifactSet:
    """One deployable set: the pipeline folder (tokenizers, scheduler, configs) and one artifact per component."""

    root: Path
    pipeline: Path
    target: str
    precision: str
    components: dict[str, Path]
    shapes: dict[str, list[int]] | None  # {"batch": [min, max], "height": [...], "width": [...]}; None: any
    status: str  # "passed", "failed", "spec-checked" (converted and checked, could not run here), or "unvalidated"
    options: dict[str, Any] | None = None  # the target options the build used (device, hints...), to run it the same way


def artifact_sets(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The artifact sets a build manifest lists, by key (`onnxruntime-fp32`); an export manifest has one."""
    if manifest.get("kind") == "build":
        return manifest["artifacts"]
    return {"onnxruntime-fp32": {"target": "onnxruntime", "precision": "fp32", "pipeline": ".", "status": "unvalidated",
                                 "components": {c: {"path": f"{c}/model.onnx", "files": e["files"]}
                                                for c, e in manifest["components"].items()},
                                 "pipeline_files": manifest.get("pipeline_files", [])}}


def open_artifacts(folder: Path, target: str | None = None, precision: str | None = None,
                   verify: bool = True) -> ArtifactSet:
    """Pick one artifact set from a build or export folder, checking its files against the manifest's hashes."""
    folder = folder.resolve()
    manifest = read_manifest(folder)
    sets = artifact_sets(manifest)
    matching = {k: s for k, s in sets.items()
                if (target is None or s["target"] == target) and (precision is None or s["precision"] == precision)}
    if not matching:
        have = ", ".join(f"{s['target']} {s['precision']}" for s in sets.values())
        raise DiffshipError(f"{folder} has no {target or ''} {precision or ''} artifacts; it has: {have}.")
    key = next(iter(matching))
    chosen = matching[key]
    if verify:
        verify_files(folder, [f for c in chosen["components"].values() for f in c["files"]]
                     + chosen.get("pipeline_files", []))
    pipeline = folder / chosen["pipeline"]
    recorded = [t.get("options", {}) for t in (manifest.get("recipe") or {}).get("targets", [])
                if t["name"] == chosen["target"]]
    return ArtifactSet(folder, pipeline, chosen["target"], chosen["precision"],
                       {c: folder / e["path"] for c, e in chosen["components"].items()},
                       manifest.get("shapes"), chosen.get("status", "unvalidated"), recorded[0] if recorded else None)
