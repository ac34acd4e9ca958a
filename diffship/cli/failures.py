"""How a failure reaches the person who ran diffship: one line and an exit code, never a traceback.

Exit codes: 0 success, 1 validation failed (report still written), 2 bad input or an environment the user must fix
(a full disk, a folder that cannot be written), 3 internal error: a bug, whose traceback goes to a log file that
the message names, for the bug report.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
import traceback
from datetime import UTC, datetime
from pathlib import Path

from diffship import __version__
from diffship.errors import DiffshipError, disk_full
from diffship.store.cache import cache_root, unwritable_reason

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
UNWRITABLE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def user_error(exc: BaseException) -> DiffshipError | None:
    """The user-facing error `exc` stands for, or None when it is a bug. A full disk is found anywhere in the chain
    of causes (libraries wrap the OSError, or keep only its text)."""
    if (full := disk_full(exc)) is not None:
        return full
    if isinstance(exc, DiffshipError):
        return exc
    if isinstance(exc, OSError) and exc.errno in UNWRITABLE_ERRNOS and exc.filename:
        return DiffshipError(f"Cannot access {exc.filename}: {exc.strerror}. Check the path and its permissions, or "
                             "choose a location you can write to.")
    return None


def crash_log(exc: BaseException) -> Path:
    """Write the traceback, the command line and the versions to a log file, and return its path."""
    folder = cache_root() / "logs" if unwritable_reason() is None else Path(tempfile.gettempdir())
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    text = (f"diffship {__version__} internal error at {stamp}\ncommand: {' '.join(sys.argv)}\n"
            f"python: {sys.version}\n\n" + "".join(traceback.format_exception(exc)))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"diffship-error-{stamp}-{os.getpid()}.log"
        path.write_text(text, encoding="utf-8")
    except OSError:
        handle, name = tempfile.mkstemp(prefix="diffship-error-", suffix=".log")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        path = Path(name)
    return path
