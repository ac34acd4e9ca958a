"""Staged validation's per-component latency: the baseline's module and the set's artifact each loaded alone and timed
in blocks (baseline, target, baseline), so that neither side shares memory with the other.

A block of a component with ISOLATE_ABOVE of weights or more runs in a spawned child process of its own, as a
full-size compile does (`stages/isolation.py`): glibc keeps freed arenas it cannot trim, so what one side left on the
heap would sit under the next block. In one process, issue 45's ninth start was killed by its 20 GiB cgroup in the
SD3.5-medium FP32 transformer's blocks (19.92 GiB tree, after T5-XXL's). A child holds only its own block.
"""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffship.errors import DiffshipError
from diffship.host.memory import ISOLATE_ABOVE, release_freed
from diffship.models.components import ComponentSpec
from diffship.models.streamed_module import reference_component
from diffship.runtime.lazy_runners import artifact_bytes
from diffship.targets import get_target
from diffship.validation.baseline import module_call


@dataclass(frozen=True)
class Block:
    """What either side's block of one component needs, as plain data a child process can take."""

    spec: ComponentSpec
    inputs: dict[str, np.ndarray]
    folder: Path  # the baseline's model folder
    allow_pickle: bool
    streamed: bool | str  # the recipe's [validation] streamed_reference
    device: str
    dtype: torch.dtype
    target: str
    artifact: Path
    options: Any
    precision: str


def run_block(block: Block, side: str, warmup: int, count: int) -> tuple[list[float], int]:
    """Load `side` ("baseline": the PyTorch module, streamed block by block where it is too large to hold; "target":
    the set's artifact), run it `warmup` times untimed, then `count` timed runs: their times, and the process's id."""
    if side == "baseline":
        module = reference_component(block.folder, block.spec.module, block.allow_pickle, block.streamed)
        call = module_call(module.to(block.device, block.dtype), block.spec, block.inputs, block.device, block.dtype)
    else:
        runner = get_target(block.target).load(block.artifact, block.options, block.precision)
        call = lambda: runner.run(block.inputs)  # noqa: E731
    for _ in range(warmup):
        call()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times, os.getpid()


def time_blocks(block: Block, warmup: int, runs: int) -> tuple[dict[str, list[float]], bool]:
    """The component's timings in blocks ordered baseline, target, baseline (the target's block has `runs` timed runs,
    each baseline block half of them, rounded up), and whether each block ran in a child of its own (a large
    artifact's)."""
    isolate = artifact_bytes(block.artifact) >= ISOLATE_ABOVE
    times: dict[str, list[float]] = {"baseline": [], "target": []}
    pids = set()
    for side, count in (("baseline", math.ceil(runs / 2)), ("target", runs), ("baseline", math.ceil(runs / 2))):
        block_times, pid = _in_child(block, side, warmup, count) if isolate else run_block(block, side, warmup, count)
        times[side] += block_times
        pids.add(pid)
        release_freed()
    return times, len(pids) == 3 and os.getpid() not in pids


def _in_child(block: Block, side: str, warmup: int, count: int) -> tuple[list[float], int]:
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(run_block, block, side, warmup, count).result()
        except concurrent.futures.process.BrokenProcessPool as exc:
            raise DiffshipError(f"The child process timing {block.spec.name}'s {side} died ({exc}); the machine may "
                                "have run out of memory (see dmesg for the OOM killer).") from exc
