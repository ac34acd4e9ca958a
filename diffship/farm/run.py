"""`diffship farm`: plan a matrix, run its tasks (here one at a time, or on Ray), and write the matrix summary."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from diffship.errors import DiffshipError
from diffship.farm.matrix import Matrix
from diffship.farm.plan import Task, plan_matrix
from diffship.farm.summary import FARM_JSON, write_summary
from diffship.farm.task import Cancelled, Outcome, execute
from diffship.recipe import Recipe
from diffship.store.artifacts import prepare_output_dir

Say = Callable[[str], None]
LOGS = "farm-logs"


@dataclass(frozen=True)
class FarmResult:
    """The matrix's outcomes, its summary files, and whether every build passed."""

    outcomes: list[Outcome]
    summary: Path
    passed: bool


class Progress:
    """One line per finished task, with the live count of done / running / queued (queued: waiting for its inputs
    or for a node with room)."""

    def __init__(self, tasks: list[Task], say: Say, logs: Path):
        self.total, self.done, self.running, self.say, self.logs = len(tasks), 0, 0, say, logs
        self.began = time.perf_counter()

    def count(self) -> str:
        queued = self.total - self.done - self.running
        return f"{self.done}/{self.total} done, {self.running} running, {queued} queued"

    def finished(self, outcome: Outcome) -> None:
        self.done += 1
        where = f" on {outcome.node[:12]}" if outcome.node != "local" else ""
        note = f": {outcome.message.splitlines()[0]}" if outcome.message else ""
        self.say(f"[{self.count()}] {outcome.key}: {outcome.status} in {outcome.seconds:.1f} s{where}{note}")
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / (outcome.key.replace(": ", "--").replace(" ", "-") + ".log")
        log.write_text("\n".join([*outcome.lines, *([outcome.message] if outcome.message else [])]) + "\n",
                       encoding="utf-8")


def run_farm(matrix: Matrix, out: Path, say: Say, address: str | None = None) -> FarmResult:
    """Build every row of `matrix` into `out/<name>/` through the shared cache; on Ray when `address` is given."""
    on_ray = None
    if address is not None:
        try:
            from diffship.farm.cluster import check_reachable  # optional: farm
            from diffship.farm.cluster import run_on_ray as on_ray  # optional: farm
        except ImportError:
            raise DiffshipError("diffship farm --ray needs Ray: pip install 'diffship[farm]'.") from None
        check_reachable(address)
    out = out.resolve()
    _prepare(out, [r.name for r in matrix.rows])
    matrix.cache.mkdir(parents=True, exist_ok=True)
    os.environ["DIFFSHIP_CACHE"] = str(matrix.cache)  # the models the plan resolves land in the shared cache too
    say(f"Planning {len(matrix.rows)} build(s) against the cache {matrix.cache} ...")
    tasks = plan_matrix(matrix)
    recipes = {r.name: r.recipe for r in matrix.rows}
    progress = Progress(tasks, say, out / LOGS)
    try:
        if on_ray is None:
            say(f"{len(tasks)} tasks, run here one at a time")
            outcomes = run_here(tasks, recipes, matrix.cache, out, progress)
        else:
            outcomes = on_ray(tasks, recipes, matrix.cache, out, progress, address)
    except Cancelled as stop:  # what finished is summarised; the rest is marked cancelled
        write_summary(out, matrix, tasks, stop.outcomes, time.perf_counter() - progress.began)
        raise
    summary = write_summary(out, matrix, tasks, outcomes, time.perf_counter() - progress.began)
    passed = all(o.status in ("done", "cached", "passed") for o in outcomes)
    return FarmResult(outcomes, summary, passed)


def run_here(tasks: list[Task], recipes: dict[str, Recipe], cache: Path, out: Path,
             progress: Progress) -> list[Outcome]:
    """Every task in plan order, in this process."""
    outcomes: dict[str, Outcome] = {}
    try:
        for task in tasks:
            progress.running = 1
            outcome = execute(task, recipes[task.row], cache, out, "local", *(outcomes[k] for k in task.after))
            progress.running = 0
            outcomes[task.key] = outcome
            progress.finished(outcome)
    except KeyboardInterrupt:
        raise Cancelled(list(outcomes.values())) from None
    return list(outcomes.values())


def _prepare(out: Path, names: list[str]) -> None:
    """`out` absent, empty, or an earlier farm's; each build's folder one `diffship build` may replace."""
    if out.exists() and not out.is_dir():
        raise DiffshipError(f"Output path {out} exists and is a file; choose a folder path.")
    if out.is_dir() and any(out.iterdir()) and not (out / FARM_JSON).is_file():
        raise DiffshipError(f"Output folder {out} is not empty and holds no {FARM_JSON}; refusing to write a matrix "
                            "into a folder diffship farm did not write.")
    for name in names:
        prepare_output_dir(out / name, overwrite=True)
