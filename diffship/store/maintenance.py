"""Keeping the cache honest and bounded: `diffship cache verify` re-hashes every entry, `diffship cache prune` removes
entries by age and total size (least recently used first) and what killed runs left. Entries a running build holds
(their lock is taken) are never touched."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from diffship.store import cache
from diffship.store.artifacts import atomic_write_json

MODELS = "models"  # built-in models, rebuilt on demand like any entry
# OpenVINO's compiled-model cache (targets/openvino.py sets it as CACHE_DIR). OpenVINO keys a blob by the IR's path,
# so each output folder a build writes adds its own blobs (5.1 GB for an SDXL BF16 UNet) and nothing else removes
# them; each blob is an entry here. A missing blob only means OpenVINO compiles the IR again.
OPENVINO_BLOBS = "openvino-model-cache"


@dataclass(frozen=True)
class Entry:
    """One finished thing in the cache: a stage's entry or a built-in model's folder."""

    stage: str
    path: Path
    bytes: int
    last_used: float  # seconds since the epoch


def entries() -> list[Entry]:
    """Every finished entry: `artifacts/<stage>/<key>` (last use: its record's mtime), `models/<name>`, and each
    OpenVINO compiled blob (last use: its access or write time)."""
    found = []
    store = cache.store_root()
    for stage in sorted(p for p in store.iterdir() if p.is_dir()) if store.is_dir() else []:
        for entry in sorted(p for p in stage.iterdir() if p.is_dir() and not p.name.startswith(".")):
            record = entry / cache.ENTRY_FILE
            if record.is_file():
                found.append(Entry(stage.name, entry, _size(entry), record.stat().st_mtime))
    models = cache.cache_root() / MODELS
    for folder in sorted(p for p in models.iterdir() if p.is_dir()) if models.is_dir() else []:
        index = folder / "model_index.json"
        if not folder.name.startswith(".") and index.is_file():
            found.append(Entry(MODELS, folder, _size(folder), max(index.stat().st_mtime, index.stat().st_atime)))
    blobs = cache.cache_root() / OPENVINO_BLOBS
    for blob in sorted(blobs.glob("*.blob")) if blobs.is_dir() else []:
        stat = blob.stat()
        found.append(Entry(OPENVINO_BLOBS, blob, stat.st_size, max(stat.st_mtime, stat.st_atime)))
    return found


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


@contextlib.contextmanager
def _if_unused(final: Path) -> Iterator[bool]:
    """Take the lock every writer and reader of `final` takes, without waiting: False when a build holds it."""
    lock = FileLock(str(final.parent / f".{final.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


@dataclass(frozen=True)
class Checked:
    """An entry and what is wrong with it (None: every file matches its recorded sha256)."""

    entry: Entry
    problem: str | None
    evicted: bool = False
    in_use: bool = False  # a running build holds it: not checked


def verify(evict: bool = False) -> list[Checked]:
    """Re-hash every byte of every stage entry against its record (no memo); with `evict`, remove those that differ."""
    checked = []
    for entry in entries():
        if entry.stage in (MODELS, OPENVINO_BLOBS):
            continue  # no recorded hashes: a build hashes a model's weights as its input; OpenVINO checks its blobs
        with _if_unused(entry.path) as free:
            problem = cache.problem(entry.path, memo=False) if free else None
            removed = bool(problem and evict)
            if removed:
                shutil.rmtree(entry.path, ignore_errors=True)
        checked.append(Checked(entry, problem, removed, not free))
    return checked


@dataclass(frozen=True)
class Pruned:
    """What `prune` removed: the entries, the staging folders of dead runs, and memo lines of deleted files."""

    removed: list[Entry]
    kept: list[Entry]
    in_use: list[Entry]
    stale_staging: int
    stale_bytes: int


def prune(older_than_days: float | None = None, max_bytes: int | None = None, now: float | None = None) -> Pruned:
    """Remove entries unused for more than `older_than_days`, then the least recently used until the rest fit in
    `max_bytes`; always remove staging folders whose writer is gone."""
    now = now or time.time()
    stale, stale_bytes = _sweep_staging()
    ordered = sorted(entries(), key=lambda e: e.last_used)
    total = sum(e.bytes for e in ordered)
    removed, kept, in_use = [], [], []
    for entry in ordered:
        too_old = older_than_days is not None and (now - entry.last_used) / 86400 > older_than_days
        too_big = max_bytes is not None and total > max_bytes
        if not (too_old or too_big):
            kept.append(entry)
            continue
        # OpenVINO takes no lock of ours on its blobs: removing one under a reader is safe (see _remove).
        with _if_unused(entry.path) if entry.stage != OPENVINO_BLOBS else contextlib.nullcontext(True) as free:
            if free:
                _remove(entry.path)
                removed.append(entry)
                total -= entry.bytes
            else:
                in_use.append(entry)
    _forget_deleted_files()
    return Pruned(removed, kept, in_use, stale, stale_bytes)


def _remove(path: Path) -> None:
    """An entry's folder, or a blob file: a process that has the blob open keeps reading it (POSIX unlink)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _sweep_staging() -> tuple[int, int]:
    """Staging folders (`.<key>.<owner>.<random>.partial`) whose key is not locked: their writer is gone."""
    count = size = 0
    folders = [p for p in cache.store_root().iterdir() if p.is_dir()] if cache.store_root().is_dir() else []
    folders.append(cache.cache_root() / MODELS)
    for folder in folders:
        for staging in list(folder.glob(".*.partial")) if folder.is_dir() else []:
            final = folder / staging.name[1:].split(".", 1)[0]
            with _if_unused(final) as free:
                if free and staging.is_dir():
                    size += _size(staging)
                    shutil.rmtree(staging, ignore_errors=True)
                    count += 1
    return count, size


def _forget_deleted_files() -> None:
    memo_path = cache.cache_root() / cache.MEMO_FILE
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(memo, dict):
        kept = {path: stamp for path, stamp in memo.items() if Path(path).exists()}
        if len(kept) != len(memo):
            atomic_write_json(memo_path, kept)


def by_stage(items: list[Entry]) -> dict[str, tuple[int, int]]:
    """Count and bytes per stage, in stage order."""
    table: dict[str, tuple[int, int]] = {}
    for e in sorted(items, key=lambda e: e.stage):
        count, size = table.get(e.stage, (0, 0))
        table[e.stage] = (count + 1, size + e.bytes)
    return table
