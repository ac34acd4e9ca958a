"""Content-addressed store of finished stage outputs, so an unchanged build does no work.

A key is the hash of everything a stage's output depends on (the weights' content hash, the
component, the stage's options, the library versions). An entry is a folder built under a hidden
temporary name and renamed into place with an `entry.json` last, so a killed build never leaves an
entry that looks finished. Outputs are hard-linked into a build folder (copied across filesystems).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffship.artifacts import atomic_write_json, sha256_file, staged_dir
from diffship.models.builtin import cache_root

ENTRY_FILE = "entry.json"


def store_root() -> Path:
    """Where stage outputs are kept: `artifacts/` under the diffship cache folder."""
    return cache_root() / "artifacts"


def key(**parts: Any) -> str:
    """A stable hash of the given parts (anything JSON can write)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def folder_hash(folder: Path) -> str:
    """Content hash of every file under `folder` (relative paths and bytes), e.g. one module of a model.

    Full-size weights are GBs, so each file's hash is remembered against its path, size and mtime and
    only recomputed when one of them changes.
    """
    memo_path = cache_root() / "file-hashes.json"
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    digest, changed = hashlib.sha256(), False
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        stamp = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        known = memo.get(str(path.resolve()))
        if not known or {k: known.get(k) for k in stamp} != stamp:
            known = memo[str(path.resolve())] = {**stamp, "sha256": sha256_file(path)}
            changed = True
        digest.update(f"{path.relative_to(folder).as_posix()}\0{known['sha256']}\n".encode())
    if changed:
        atomic_write_json(memo_path, memo)
    return digest.hexdigest()


def lookup(stage: str, entry_key: str) -> Path | None:
    """The finished entry for `entry_key`, or None."""
    entry = store_root() / stage / entry_key
    return entry if (entry / ENTRY_FILE).is_file() else None


def read_entry(entry: Path) -> dict[str, Any]:
    """The metadata stored with an entry."""
    return json.loads((entry / ENTRY_FILE).read_text(encoding="utf-8"))


@contextlib.contextmanager
def store(stage: str, entry_key: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield a staging folder and a dict for the entry's metadata; it becomes an entry only if the block finishes."""
    final = store_root() / stage / entry_key
    with staged_dir(final) as tmp:
        info: dict[str, Any] = {}
        yield tmp, info
        atomic_write_json(tmp / ENTRY_FILE, info)


def evict(stage: str, entry_key: str) -> None:
    """Drop an entry (used when its files no longer match what was recorded)."""
    shutil.rmtree(store_root() / stage / entry_key, ignore_errors=True)


def link_tree(src: Path, dst: Path, skip: tuple[str, ...] = (ENTRY_FILE,)) -> None:
    """Hard-link every file of `src` into `dst` (copy where linking is not possible)."""
    for path in sorted(p for p in src.rglob("*") if p.is_file() and p.name not in skip):
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
