"""The exception types for problems a user can act on: bad input, and a disk that is full."""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Libraries with native cores (safetensors, protobuf, ONNX Runtime, torch's zip writer) report a full disk only as text.
FULL_TEXTS = ("No space left on device", "Disk quota exceeded")
# A staging folder's hidden name (`.<name>.<pid>@<host>.<random>.partial`, artifacts.staged_dir) and the name it becomes.
STAGING = re.compile(r"/\.([^/]+?)\.\d+@[A-Za-z0-9-]+\.[^./]+\.partial(?=/|$)")


class DiffshipError(Exception):
    """A user-facing error: the message says what was wrong and what to do. The CLI maps it to exit 2."""


class DiffshipDeprecation(FutureWarning):
    """Input diffship still reads under an old name but will drop (a recipe option); the CLI prints it as one line."""


class DiskFull(DiffshipError):
    """No space left where diffship was writing: says where, what is free there, and what was needed when known."""

    def __init__(self, where: Path | str | None, needed: int | None = None):
        self.where, self.needed = where, needed
        place = f" while writing {public_path(where)}" if where else ""
        free = _free_bytes(Path(where)) if where else None
        facts = [f"{size_text(free)} free there" if free is not None else "",
                 f"it needed {size_text(needed)}" if needed is not None else ""]
        said = "; ".join(f for f in facts if f)
        super().__init__(f"The disk is full: no space left on device{place}{f' ({said})' if said else ''}. Nothing was "
                         "left half-written. Free some space, or write somewhere with more room (--out, DIFFSHIP_CACHE).")


def public_path(path: Path | str) -> str:
    """`path` as the user will know it: a hidden staging folder named by the folder it becomes."""
    return STAGING.sub(r"/\1", str(path))


def causes(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from or during, outermost first."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def disk_full(exc: BaseException) -> DiskFull | None:
    """The full disk behind `exc`, if any: a DiskFull, an OSError with ENOSPC / EDQUOT, or a library's text of one."""
    chain = causes(exc)
    for e in chain:
        if isinstance(e, DiskFull):
            return e
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
            return DiskFull(e.filename)
    if any(text in str(e) for e in chain for text in FULL_TEXTS):
        return DiskFull(None)
    return None


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def size_text(n: int) -> str:
    """A byte count as people read it: GiB from one GiB up, MiB below."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
