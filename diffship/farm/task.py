"""Run one farm task in this process (a Ray worker's, or the local runner's) and describe what happened as plain data.

A task never raises for a build's own problems: bad input and failed validation become its outcome, so one build's
failure fails its row and not the matrix. Only the loss of the process or node escapes, which Ray retries."""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffship.errors import DiffshipError
from diffship.farm.plan import Task
from diffship.recipe import Recipe
from diffship.stages.build import build, run_unit
from diffship.validation.report import summary_table

# Task outcomes: "done" (made), "cached" (found in the cache: no work), "passed" / "failed" (a build folder assembled,
# its validation's verdict), "error" (the stage could not run: the message says why), "skipped" (an input failed).
FINISHED_OK = ("done", "cached", "passed", "failed")


class Cancelled(Exception):
    """Ctrl-C during the matrix, carrying the outcomes of what finished before it."""

    def __init__(self, outcomes: list[Outcome]):
        super().__init__("cancelled")
        self.outcomes = outcomes


@dataclass
class Outcome:
    """What one task did, where, and in how long; for an assembly, the build's verdict and summary table."""

    key: str
    row: str
    status: str
    seconds: float
    node: str
    message: str = ""
    lines: list[str] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    started: float = 0.0  # wall clock (epoch seconds), for the summary's timeline


def execute(task: Task, recipe: Recipe, cache: Path, out: Path, node: str, *inputs: Outcome) -> Outcome:
    """Run `task` of the build `recipe` against the shared `cache`; an assembly writes `out/<row>/`."""
    began, started = time.perf_counter(), time.time()
    lines: list[str] = []
    if failed := [i for i in inputs if i.status not in FINISHED_OK]:
        return Outcome(task.key, task.row, "skipped", 0.0, node, f"not run: {failed[0].key} {failed[0].status}",
                       started=started)
    os.environ["DIFFSHIP_CACHE"] = str(cache)
    try:
        if task.unit is not None:
            hit = run_unit(recipe, task.unit, say=lines.append)
            status, summary = ("cached" if hit else "done"), None
        else:
            result = build(recipe, out / task.row, say=lines.append)
            title, columns, rows = summary_table(result.report)
            status = "passed" if result.passed else "failed"
            summary = {"title": title, "columns": columns, "rows": rows,
                       "report": (Path(task.row) / result.manifest["report"]["html"]).as_posix(),
                       "sets": {k: bool(v["passed"]) for k, v in result.report["sets"].items()}}
        return Outcome(task.key, task.row, status, time.perf_counter() - began, node, "", lines, summary, started)
    except DiffshipError as exc:
        return Outcome(task.key, task.row, "error", time.perf_counter() - began, node, str(exc), lines, None, started)
    except Exception as exc:  # a crash inside a stage fails its row with the reason; the matrix goes on
        lines += traceback.format_exc().splitlines()
        return Outcome(task.key, task.row, "error", time.perf_counter() - began, node,
                       f"the stage crashed: {type(exc).__name__}: {exc}", lines, None, started)
