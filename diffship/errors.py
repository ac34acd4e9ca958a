"""The exception types for problems a user can act on: bad input, and a disk that is full."""

from __future__ import annotations

import shutil
from pathlib import Path


class DiffshipError(Exception):
    """A user-facing error: the message says what was wrong and what to do. The CLI maps it to exit 2."""


class DiskFull(DiffshipError):
    """No space left where diffship was writing: says where, what is free there, and what was needed when known."""

    def __init__(self, where: Path | str | None, needed: int | None = None):
        self.where, self.needed = where, needed
        place = f" while writing {where}" if where else ""
        free = _free_bytes(Path(where)) if where else None
        facts = [f"{_gib(free)} free there" if free is not None else "",
                 f"it needed {_gib(needed)}" if needed is not None else ""]
        said = "; ".join(f for f in facts if f)
        super().__init__(f"The disk is full: no space left on device{place}{f' ({said})' if said else ''}. Nothing was "
                         "left half-written. Free some space, or write somewhere with more room (--out, DIFFSHIP_CACHE).")


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
