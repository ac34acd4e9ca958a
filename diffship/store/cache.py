"""Content-addressed store of finished stage outputs, so an unchanged build does no work.

A key is the hash of everything a stage's output depends on (the weights' content hash, the component, the
stage's options, the library versions). An entry is a folder built under a hidden temporary name and renamed
into place with `entry.json` (its files' sizes and hashes) written last, so a killed build never leaves an entry
that looks finished. `cached_step` is the one way stages use it:

- a hit is verified against the recorded hashes (a size + mtime memo spares re-hashing GBs on every hit); an
  entry that fails is evicted, rebuilt and reported in one line;
- a miss is computed under a lock per key (a file lock, released by the kernel when its holder dies), so two
  builds racing on one key do the work once: the other waits and reuses the entry;
- files leave the cache as copies (`clone_file`), never links, so nothing done to an output changes the cache;
- when the cache cannot be written, stages are computed into a private scratch folder and the build goes on.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from diffship.store.artifacts import atomic_write_json, clone_tree, sha256_file, staged_dir

ENTRY_FILE = "entry.json"
MEMO_FILE = "file-hashes.json"
Say = Callable[[str], None]


def cache_root() -> Path:
    """The diffship cache folder: $DIFFSHIP_CACHE, else $XDG_CACHE_HOME/diffship, else ~/.cache/diffship."""
    if env := os.environ.get("DIFFSHIP_CACHE"):
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "diffship"


def store_root() -> Path:
    """Where stage outputs are kept: `artifacts/` under the diffship cache folder."""
    return cache_root() / "artifacts"


def key(**parts: Any) -> str:
    """A stable hash of the given parts (anything JSON can write)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# --- can the cache be written? --------------------------------------------------------------------------------------

def unwritable_reason() -> str | None:
    """Why the cache folder cannot be written (None when it can), tried once per process and cache location."""
    return _probe(str(cache_root()))


@functools.cache
def _probe(root: str) -> str | None:
    # Try it rather than trust os.access, which says yes to root even on read-only filesystems.
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        return f"{exc.strerror or exc}"
    return None


@functools.cache
def scratch_root() -> Path:
    """A private folder, removed at exit, that holds what would have gone into a cache that cannot be written."""
    folder = Path(tempfile.mkdtemp(prefix="diffship-scratch-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def work_root() -> Path:
    """Where stages keep work in progress (distillation checkpoints): the cache, or the scratch folder without one."""
    return cache_root() if unwritable_reason() is None else scratch_root()


# --- content hashes, remembered against size and mtime --------------------------------------------------------------

def file_hashes(paths: list[Path]) -> list[str]:
    """sha256 of each file. Full-size weights are GBs, so each hash is remembered against the file's path, size, mtime
    and inode in the cache's memo and only recomputed when one of them changes."""
    memo_path = cache_root() / MEMO_FILE
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    if not isinstance(memo, dict):
        memo = {}
    hashes, changed = [], False
    for path in paths:
        info = path.stat()
        stamp = {"bytes": info.st_size, "mtime_ns": info.st_mtime_ns, "inode": info.st_ino}
        name = str(path.resolve())
        known = memo.get(name)
        if not isinstance(known, dict) or {k: known.get(k) for k in stamp} != stamp or "sha256" not in known:
            known = memo[name] = {**stamp, "sha256": sha256_file(path)}
            changed = True
        hashes.append(known["sha256"])
    if changed and unwritable_reason() is None:
        with contextlib.suppress(OSError):  # only a memo: the next run hashes again
            atomic_write_json(memo_path, memo)
    return hashes


def folder_hash(folder: Path) -> str:
    """Content hash of every file under `folder` (relative paths and bytes), e.g. one module of a model."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path, sha in zip(paths, file_hashes(paths), strict=True):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{sha}\n".encode())
    return digest.hexdigest()


# --- entries ---------------------------------------------------------------------------------------------------------

def lookup(stage: str, entry_key: str) -> Path | None:
    """The finished entry for `entry_key`, or None (not verified: `cached_step` verifies)."""
    entry = store_root() / stage / entry_key
    return entry if (entry / ENTRY_FILE).is_file() else None


def read_entry(entry: Path) -> dict[str, Any]:
    """The metadata stored with an entry."""
    return json.loads((entry / ENTRY_FILE).read_text(encoding="utf-8"))


def entry_files(entry: Path) -> list[Path]:
    """The files an entry holds besides its record, sorted."""
    return sorted(p for p in entry.rglob("*") if (p.is_file() or p.is_symlink()) and p != entry / ENTRY_FILE)


def problem(entry: Path, memo: bool = True) -> str | None:
    """What is wrong with an entry's files against its record (None when every file is there, unchanged, and nothing
    else is). `memo=False` re-hashes every byte instead of trusting the size + mtime memo."""
    try:
        recorded = read_entry(entry)["files"]
        expected = {f["path"]: (int(f["bytes"]), f["sha256"]) for f in recorded}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its record {ENTRY_FILE} is unreadable ({exc})"
    present = {p.relative_to(entry).as_posix(): p for p in entry_files(entry)}
    if missing := sorted(set(expected) - set(present)):
        return f"{missing[0]} is missing"
    if extra := sorted(set(present) - set(expected)):
        return f"{extra[0]} was added"
    if links := [name for name, p in present.items() if p.is_symlink()]:
        return f"{links[0]} is a link"
    for name, path in present.items():
        if path.stat().st_size != expected[name][0]:
            return f"{name} changed size"
    names = sorted(present)
    hashes = file_hashes([present[n] for n in names]) if memo else [sha256_file(present[n]) for n in names]
    for name, sha in zip(names, hashes, strict=True):
        if sha != expected[name][1]:
            return f"{name}: sha256 differs"
    return None


@contextmanager
def locked(final: Path, say: Say, label: str) -> Iterator[None]:
    """Hold the lock of one cached folder (`.<name>.lock` beside it): its writers and copiers take turns, across
    processes and hosts sharing the cache; a holder that dies releases it with its file descriptors."""
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(final.parent / f".{final.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        say(f"waiting for another diffship process that is building the {label} ...")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextmanager
def store(stage: str, entry_key: str, label: str = "") -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield a staging folder and a dict for the entry's metadata; it becomes an entry only if the block finishes.
    The caller holds the key's lock (`locked`), so any staging folder left for this key is a dead writer's."""
    final = store_root() / stage / entry_key
    with staged_dir(final, owned=True) as tmp:
        info: dict[str, Any] = {}
        yield tmp, info
        files = entry_files(tmp)
        info |= {"stage": stage, "label": label, "created": datetime.now(UTC).isoformat(timespec="seconds"),
                 "files": [{"path": p.relative_to(tmp).as_posix(), "bytes": p.stat().st_size, "sha256": sha}
                           for p, sha in zip(files, [sha256_file(p) for p in files], strict=True)]}
        for path in files:  # a guard against writes in place; the hashes are what is relied on
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        atomic_write_json(tmp / ENTRY_FILE, info)


def evict(stage: str, entry_key: str) -> None:
    """Drop an entry (used when its files no longer match what was recorded)."""
    shutil.rmtree(store_root() / stage / entry_key, ignore_errors=True)


def touch(entry: Path) -> None:
    """Mark an entry used now (its record's mtime), which `diffship cache prune` reads as its last use."""
    with contextlib.suppress(OSError):  # a read-only cache: pruning it is its owner's business
        os.utime(entry / ENTRY_FILE)


@dataclass(frozen=True)
class Cached:
    """A stage's output: the folder that holds it, its metadata, and whether it came from the cache."""

    path: Path
    info: dict[str, Any]
    hit: bool


def cached_step(stage: str, entry_key: str, label: str, produce: Callable[[Path, dict[str, Any]], None], *,
                force: bool = False, say: Say | None = None, copy_to: Path | None = None) -> Cached:
    """The cached output of one stage: reused when a verified entry exists, else made by `produce(folder, info)`.

    `label` names the work in messages ("unet export"). With `copy_to`, the entry's files are copied there while the
    key's lock is held, so no other process can evict or replace them half-way.
    """
    say = say or (lambda _: None)
    if unwritable_reason() is not None:
        return _uncached(stage, entry_key, label, produce, force, say, copy_to)
    with locked(store_root() / stage / entry_key, say, label):
        entry = None if force else lookup(stage, entry_key)
        corrupted = problem(entry) if entry is not None else None
        if entry is not None and corrupted is None:
            touch(entry)
            return _deliver(entry, True, copy_to)
        if corrupted is not None:
            evict(stage, entry_key)
        with store(stage, entry_key, label) as (staging, info):
            produce(staging, info)
        if corrupted is not None:
            say(f"cache entry for {label} was corrupted ({corrupted}); rebuilt")
        made = lookup(stage, entry_key)
        assert made is not None
        return _deliver(made, False, copy_to)


def _uncached(stage: str, entry_key: str, label: str, produce: Callable[[Path, dict[str, Any]], None], force: bool,
              say: Say, copy_to: Path | None) -> Cached:
    """A cache that cannot be written: reuse what it verifiably holds, make the rest in the process's scratch folder."""
    entry = None if force else lookup(stage, entry_key)
    if entry is not None and problem(entry) is None:
        return _deliver(entry, True, copy_to)
    folder = scratch_root() / stage / entry_key
    if not (folder / ENTRY_FILE).is_file():
        with staged_dir(folder) as staging:
            info: dict[str, Any] = {"stage": stage, "label": label, "created": datetime.now(UTC).isoformat(timespec="seconds")}
            produce(staging, info)
            atomic_write_json(staging / ENTRY_FILE, info)
    return _deliver(folder, False, copy_to)


def _deliver(entry: Path, hit: bool, copy_to: Path | None) -> Cached:
    if copy_to is not None:
        clone_tree(entry, copy_to, skip=(ENTRY_FILE,))
    return Cached(entry, read_entry(entry), hit)


def entry_age_days(entry: Path, now: float | None = None) -> float:
    """Days since an entry was last used (or made)."""
    return ((now or time.time()) - (entry / ENTRY_FILE).stat().st_mtime) / 86400
