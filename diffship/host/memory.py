"""Giving freed memory back to the system, so that the next stage's peak is its own and not the last one's too; and
the memory a build may use, which every "auto" choice between holding weights whole and streaming them asks."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import sys
from collections.abc import Iterator

import psutil

# The environment carries the recipe's limit into the compile children a build spawns.
LIMIT_VARIABLE = "DIFFSHIP_MEMORY_GIB"
GIB = 2**30
PROCESS = 1 * GIB  # an interpreter and its libraries (and a build's own state), besides the weights a stage holds
# A component whose weights reach this is compiled, and timed in staged validation, in a child process of its own
# (`stages/isolation.py`, `validation/latency_blocks.py`): the full-size UNets and transformers, SDXL's second text
# encoder (2.8 GB), T5-XXL; not the tiny models of the tests.
ISOLATE_ABOVE = 2 * GIB


def budget() -> int:
    """The memory a stage may plan on, in bytes: the recipe's `memory_gib` while its build runs, else 80 % of this
    machine's memory."""
    if limit := os.environ.get(LIMIT_VARIABLE):
        return int(float(limit) * GIB)
    return int(0.8 * psutil.virtual_memory().total)


@contextlib.contextmanager
def memory_limit(gib: float | None) -> Iterator[None]:
    """`budget()` is `gib` inside (unchanged when None), for this process and the children it starts."""
    if gib is None:
        yield
        return
    before = os.environ.get(LIMIT_VARIABLE)
    os.environ[LIMIT_VARIABLE] = str(gib)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(LIMIT_VARIABLE, None)
        else:
            os.environ[LIMIT_VARIABLE] = before


def anonymous_bytes() -> int:
    """This process's resident memory less its file-backed pages (an OpenVINO IR's mapped weights, which the kernel
    can drop and read again): what it holds that only freeing gives back."""
    info = psutil.Process().memory_info()
    return info.rss - getattr(info, "shared", 0)


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
