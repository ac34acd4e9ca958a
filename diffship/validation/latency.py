"""Latency and memory: warm-up, then timed runs with baseline and target interleaved, summarized as p50 / p90 / mean.

Interleaving (baseline, target, baseline, target, ...) means a slow spell of the machine hits both
sides alike, so the speedup ratio is fairer than two back-to-back loops would give. Where the two sides do not fit
in memory together (staged validation), `blocks` times them in turns instead, baseline / target / baseline, each
loaded for its block and dropped after it: a drift of the machine's speed over the blocks cancels out, since the
baseline's runs are centred on the target's.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import psutil

T = TypeVar("T")


def summarize(times: list[float]) -> dict[str, float]:
    """p50, p90, mean and min of a list of durations (seconds)."""
    values = np.asarray(times, dtype=np.float64)
    return {"runs": len(times), "p50_s": float(np.percentile(values, 50)), "p90_s": float(np.percentile(values, 90)),
            "mean_s": float(values.mean()), "min_s": float(values.min())}


def interleaved(calls: dict[str, Callable[[], Any]], warmup: int, runs: int,
                on_round: Callable[[int, int], None] | None = None) -> dict[str, list[float]]:
    """Time each call `runs` times after `warmup` untimed runs, taking turns between the calls; `on_round(done,
    total)` after each round (warm-up rounds included), for progress."""
    for done in range(warmup):
        for call in calls.values():
            call()
        if on_round:
            on_round(done + 1, warmup + runs)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for done in range(runs):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
        if on_round:
            on_round(warmup + done + 1, warmup + runs)
    return times


def after_warmup(call: Callable[[], T], warmup: int, runs: int) -> list[T]:
    """`call` run `warmup` times untimed, then `runs` times; the timed runs' results (calls that time themselves,
    such as whole generations with their own timings)."""
    for _ in range(warmup):
        call()
    return [call() for _ in range(runs)]


def speedup(baseline: dict[str, float], target: dict[str, float]) -> float:
    """How many times faster the target's median is than the baseline's (>1: faster)."""
    return baseline["p50_s"] / target["p50_s"] if target["p50_s"] > 0 else float("nan")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def rss_bytes() -> int:
    """Current resident memory of this process."""
    return int(psutil.Process().memory_info().rss)


def peak_rss_during(call: Callable[[], Any]) -> int | None:
    """Resident memory `call` adds at its peak above what the process held before it; None where the kernel's
    high-water mark cannot be reset (Linux only: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = rss_bytes()
    call()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return max(0, int(line.split()[1]) * 1024 - before)
    return None


def peak_gpu_during(call: Callable[[], Any]) -> int | None:
    """CUDA memory `call` allocates at its peak above what was allocated before it; None without a GPU."""
    import torch  # start-up time: torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - before)


def peak_gpu_bytes() -> int | None:
    """Peak CUDA memory allocated by torch in this process, None without a GPU."""
    import torch  # start-up time: torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
