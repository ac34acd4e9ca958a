"""One full-size compile in a child process of its own, so what it leaves on the heap goes back to the system when it
ends instead of sitting under the next stage.

Measured on the SDXL build (docs/performance.md, issue 23): after ONNX Runtime's INT8 quantization of the UNet, the
OpenVINO BF16 conversion that followed in the same process peaked at 20.88 GiB for the process tree, against 14.97
when it runs alone; glibc keeps freed arenas it cannot trim when live blocks sit between them. A child started with
`spawn` holds only what its own stage needs (plus about 0.6 GiB of imports).

The child gets plain data: the backend's module name, paths, the options dataclass, and a CompileContext whose
callables are replaced by picklable ones (the calibration capture's file in the cache; progress lines printed).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import multiprocessing
import os
import pickle
from pathlib import Path
from typing import Any

from diffship.errors import DiffshipError
from diffship.host.memory import ISOLATE_ABOVE, release_freed
from diffship.stages.calibrate import Calibration
from diffship.targets import CompileContext
from diffship.targets.onnx_graph import weight_bytes


def should_isolate(setting: bool | str, source: Path) -> bool:
    """The recipe's `[compile] isolate` for one component: true, false, or "auto" (by its weights' size)."""
    return setting is True or (setting == "auto" and weight_bytes(source) >= ISOLATE_ABOVE)


@dataclasses.dataclass(frozen=True)
class PrintLines:
    """A picklable `say` for the child: its lines go to the inherited stdout, as the parent's would."""

    def __call__(self, line: str) -> None:
        print(line, flush=True)


def compile_isolated(backend: str, source: Path, precision: str, options: Any, dest: Path,
                     context: CompileContext) -> tuple[Path, int]:
    """`backend.compile(...)` run in a spawned child process; the artifact path and the child's pid.

    A DiffshipError in the child is raised here with its message (exit 2 stays exit 2); any other failure says the
    child failed and why."""
    calibration = context.calibration
    if isinstance(calibration, Calibration):  # the build's capture: by its cache file, never the pipeline it came from
        calibration = calibration.as_file()
    elif calibration is not None and not _picklable(calibration):
        raise DiffshipError("This compile needs calibration data that cannot be handed to a child process.")
    child_context = dataclasses.replace(context, calibration=calibration, say=PrintLines())
    # What the parent freed since its last trim (a small component's compile just before) would sit beside the child
    # for its whole run: 0.44 GiB on the sd15-arch build, at the int8-hybrid UNet's 7.2 GiB peak (issue 23).
    release_freed()
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            outcome = pool.submit(_run, backend, source, precision, options, dest, child_context).result()
        except concurrent.futures.process.BrokenProcessPool as exc:
            raise DiffshipError(f"The child process compiling {source} died ({exc}); the machine may have run out "
                                "of memory (see dmesg for the OOM killer).") from exc
    kind, value, pid = outcome
    if kind == "error":
        raise DiffshipError(value)
    return Path(value), pid


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


def _run(backend: str, source: Path, precision: str, options: Any, dest: Path,
         context: CompileContext) -> tuple[str, str, int]:
    try:
        module = importlib.import_module(backend)
        return "ok", str(module.compile(source, precision, options, dest, context)), os.getpid()
    except DiffshipError as exc:  # its subclasses take other constructor arguments: hand over the message
        return "error", str(exc), os.getpid()
