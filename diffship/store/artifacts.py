"""Output folders, content hashes, copies and atomic writes.

Nothing is ever written where a finished artifact would be until it is complete: files and
folders are built under a hidden temporary name in the same directory and renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffship.errors import DiffshipError, DiskFull, disk_full

MANIFEST_NAME = "manifest.json"
FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


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


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object (a config, a manifest), turning a missing, broken or non-object file into a DiffshipError
    that names it."""
    if not path.is_file():
        raise DiffshipError(f"Missing {path.name} in {path.parent}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DiffshipError(f"{path} is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise DiffshipError(f"Cannot read {path}: {exc.strerror or exc}.") from exc
    if not isinstance(data, dict):
        raise DiffshipError(f"{path} holds a JSON {type(data).__name__} where a JSON object ({{...}}) belongs.")
    return data


def atomic_write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _owner_tag() -> str:
    """`<pid>@<host>`: who owns a staging folder, so a sweep removes only those whose owner is gone."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
    return f"{os.getpid()}@{host}"


def _owner_gone(staging: Path, final_name: str) -> bool:
    """Whether the process that made `staging` (a `.<name>.<pid>@<host>.<random>.partial` folder) has ended.

    Only an owner on this machine can be checked; another host's folders (a cache shared over the network) are left
    for `diffship cache prune`. Folders in an older naming are swept after a day."""
    found = re.fullmatch(rf"\.{re.escape(final_name)}\.(\d+)@([A-Za-z0-9-]+)\.[^.]+\.partial", staging.name)
    if found is None:
        try:
            return time.time() - staging.stat().st_mtime > 86400
        except OSError:
            return False
    pid, host = int(found[1]), found[2]
    if host != _owner_tag().split("@", 1)[1]:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


def sweep_staging(final: Path, owned: bool = False) -> None:
    """Remove the staging folders that killed runs left beside `final`: those whose owner is gone, or every one when the
    caller holds the lock that every writer of `final` takes (`owned`)."""
    for stale in final.parent.glob(f".{glob.escape(final.name)}.*.partial"):
        if stale.is_dir() and (owned or _owner_gone(stale, final.name)):
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(final: Path, owned: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary folder beside `final`; move it to `final` only if the block succeeds.

    Whatever is at `final` when the block succeeds (an empty folder, or an earlier output that
    `prepare_output_dir` allowed to be replaced) is swapped out only after the new one is complete. Several
    processes may write the same `final` at once: each stages its own folder, the last to finish wins whole, and
    none removes a staging folder whose owner is still running (`owned`: see `sweep_staging`).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_staging(final, owned)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{_owner_tag()}.", suffix=".partial", dir=final.parent))
    try:
        os.chmod(tmp, _umask_mode(0o777))  # mkdtemp makes 0700
        yield tmp
        _replace_dir(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full(exc)
        if full is not None and full.where is None:  # a library that kept only the text: say which folder it was
            raise DiskFull(final) from exc
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
    """Rename `staged` to `final`, moving aside whatever another run put there first; each rename is atomic, so a
    reader sees one whole folder or (for an instant while two runs swap) none."""
    while True:
        try:
            os.rename(staged, final)  # replaces an empty folder; refuses a non-empty one
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        backup = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        try:
            os.rename(final, backup / final.name)
        except FileNotFoundError:  # another run moved it first: try again
            pass
        finally:
            shutil.rmtree(backup, ignore_errors=True)


def clone_file(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` as a new file, never a link to it.

    Cached artifacts reach build folders this way, not as hard links: a hard link is the same file, so editing the
    output in place would edit the cache, and onnx (1.23) refuses hard-linked external data as a possible attack.
    Where the filesystem can share blocks copy-on-write (btrfs, XFS: the FICLONE ioctl) the copy is instant and
    takes no space until one side is written; elsewhere it is a plain kernel-side copy.
    """
    with src.open("rb") as source, dst.open("wb") as target:
        if sys.platform == "linux":
            try:
                fcntl.ioctl(target.fileno(), FICLONE, source.fileno())
                return
            except OSError:
                pass  # ext4, tmpfs, across filesystems: copy instead
    shutil.copyfile(src, dst)


def clone_tree(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """`clone_file` every file of `src` into `dst` (same relative paths), except names in `skip`; a destination without
    room for them all is refused before the first byte is written, naming what they need."""
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name not in skip)
    needed = sum(p.stat().st_size for p in files)
    dst.mkdir(parents=True, exist_ok=True)
    if needed > shutil.disk_usage(dst).free:
        raise DiskFull(dst, needed)
    try:
        for path in files:
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            clone_file(path, target)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(dst, needed) from exc
        raise


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


