"""How a deployed pipeline loads its components' runners, and runners loaded when first called and released to make
room: a deployed set whose components do not fit in memory together (SD3.5-medium's FP32 set: T5-XXL's 17.7 GiB
session beside an 8.4 GiB transformer) draws an image with one large component loaded at a time, the text encoders
for the prompt, then the transformer for the steps.

Each load is timed into the pipeline's `load_seconds`; a component loaded again after a release is timed again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffship.host.memory import PROCESS, release_freed
from diffship.store.manifest import ArtifactSet
from diffship.targets import get_target

# Components are held together while the process and their weights as the runtime holds them stay under this share of
# the memory budget (80 % of the machine's by default); the rest is for the largest component's activations and what
# the allocator keeps. Counting files alone loaded sd35m-arch's OpenVINO BF16 set whole (15.0 GiB of IRs, just under
# 15 of 20 GiB) and the 1024x1024 VAE decoder's parity was killed beside it (issue 45's tenth start).
HELD_SHARE = 0.75


def artifact_bytes(artifact: Path) -> int:
    """The bytes of a component's artifact folder (model file, external data, IR weights)."""
    return sum(p.stat().st_size for p in artifact.parent.iterdir() if p.is_file())


def held_bytes(artifact: Path) -> int:
    """A component's weights as its runtime holds them once loaded: the files as stored (an IR's weights; OpenVINO's
    CPU plugin keeps about their size, measured in docs/field-notes.md), and for ONNX Runtime the 16-bit weights an
    export keeps behind Casts folded back to FP32 (T5-XXL: 19 GB)."""
    if artifact.suffix != ".onnx":
        return artifact_bytes(artifact)
    from diffship.targets.onnx_graph import weight_bytes  # start-up time: onnx
    from diffship.targets.onnx_weights import upcast_bytes  # start-up time: onnx

    return weight_bytes(artifact) + upcast_bytes(artifact) // 2  # upcast_bytes counts them in FP32: 2 more each


def pool_for(components: list[Path], memory: int) -> RunnerPool | None:
    """None when a set's components fit in `memory` together (the process and their weights as held, within
    HELD_SHARE of it); else the pool that loads them one large one at a time within that share."""
    share = int(HELD_SHARE * memory) - PROCESS
    return None if sum(held_bytes(c) for c in components) <= share else RunnerPool(share)


class RunnerPool:
    """Which lazy runners are loaded; makes room for one by releasing the least recently used others."""

    def __init__(self, budget: int):
        self.budget = budget
        self.loaded: list[LazyRunner] = []

    def make_room(self, runner: LazyRunner) -> None:
        """Release the least recently used until `runner` fits beside the rest (or nothing else is held)."""
        while self.loaded and sum(r.size for r in self.loaded) + runner.size > self.budget:
            self.loaded.pop(0).release()

    def touch(self, runner: LazyRunner) -> None:
        self.loaded.remove(runner)
        self.loaded.append(runner)


class LazyRunner:
    """A Runner that loads on first use (run, or any attribute a Runner has) and can be released."""

    def __init__(self, name: str, load: Callable[[], Any], size: int, pool: RunnerPool,
                 load_seconds: dict[str, float]):
        self.name, self._load, self.size, self._pool, self._seconds = name, load, size, pool, load_seconds
        self._runner: Any = None
        self._description: Any = None

    @property
    def runner(self) -> Any:
        if self._runner is None:
            self._pool.make_room(self)
            started = time.perf_counter()
            self._runner = self._load()  # a load that fails leaves the pool as it was
            self._seconds[self.name] = self._seconds.get(self.name, 0.0) + time.perf_counter() - started
            self._description = self._runner.describe()
            self._pool.loaded.append(self)
        else:
            self._pool.touch(self)
        return self._runner

    def describe(self) -> Any:
        """What the runner said of itself when it last loaded; one never loaded is loaded to say it."""
        return self._description if self._description is not None else self.runner.describe()

    def release(self) -> None:
        self._runner = None
        release_freed()

    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return self.runner.run(inputs)

    def __getattr__(self, name: str) -> Any:  # input_names, describe, a backend's own attributes
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.runner, name)


class ComponentLoader:
    """Loads one component's runner of a set: with the set's options and its weight changes (a LoRA at run time), timed
    into `load_seconds`; as a LazyRunner over `pool` where the set's components do not fit in memory together. The
    pipeline's first components and the graphs an acceleration adds later load through the same one."""

    def __init__(self, artifacts: ArtifactSet, options: Any, changes: dict[str, list[Any]] | None,
                 load_seconds: dict[str, float], pool: RunnerPool | None):
        self.artifacts, self.changes, self.load_seconds, self.pool = artifacts, changes or {}, load_seconds, pool
        self.backend = get_target(artifacts.target)
        if options is None and artifacts.options:
            options = self.backend.parse_options(artifacts.options)
        self.options = options

    def _loads(self, name: str) -> Callable[[], Any]:
        artifact, precision = self.artifacts.components[name], self.artifacts.precision
        if name in self.changes:
            return lambda: self.backend.load_with_changes(artifact, self.options, precision, self.changes[name])
        return lambda: self.backend.load(artifact, self.options, precision)

    def __call__(self, name: str) -> Any:
        """Component `name`'s runner: loaded now, or a LazyRunner that loads when first called."""
        if self.pool is not None:
            return LazyRunner(name, self._loads(name), held_bytes(self.artifacts.components[name]), self.pool,
                              self.load_seconds)
        started = time.perf_counter()
        runner = self._loads(name)()
        self.load_seconds[name] = time.perf_counter() - started
        return runner
