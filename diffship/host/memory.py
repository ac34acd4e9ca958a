"""Giving freed memory back to the system, so that the next stage's peak is its own and not the last one's too."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys


def release_freed() -> None:
    """Collect garbage, then ask glibc to return its free pages (`malloc_trim`).

    glibc keeps memory that a freed ONNX Runtime session or PyTorch module released in its heaps: 1.2 GiB after an
    sd15-arch UNet session is deleted, given back only by `malloc_trim(0)` (measured, issue 23). Nothing to do off
    glibc."""
    gc.collect()
    if sys.platform != "linux":
        return
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # musl has no malloc_trim
        return
