"""The matrix on a Ray cluster: each task a Ray task with its resources declared and its inputs' results as its
arguments (Ray starts it when they are ready), checked against the cluster before anything is submitted.

- Feasibility: Ray waits forever for a task no node can run, so every task's demand (CPU, memory, a GPU kind,
  `macos`) is compared with each alive node's resources first; a matrix no node can serve fails at once, naming what
  is missing.
- Node loss: a task whose node dies is retried elsewhere (`max_retries`); the cache's staging + rename means the dead
  attempt left nothing that looks finished. A build's own failures are outcomes, never retried.
- `max_calls=1`: a worker process runs one stage and exits, so what a stage left on the heap goes back to the node
  (the same reason `isolation` compiles in a child).
- Ctrl-C cancels every task not finished (`ray.cancel(force=True)`).
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import Any

import ray
import torch  # loaded by every stage anyway; its thread count is the task's CPU share, as Ray's OMP_NUM_THREADS
from ray.exceptions import RayError

from diffship.errors import DiffshipError
from diffship.farm.plan import Task
from diffship.farm.task import Cancelled, Outcome, execute
from diffship.recipe import Recipe

RETRIES = 3
RUNNING_POLL_S = 2.0
CONNECT_TIMEOUT_S = 10.0


def run_on_ray(tasks: list[Task], recipes: dict[str, Recipe], cache: Path, out: Path, progress: Any,
               address: str) -> list[Outcome]:
    """Submit every task to the cluster at `address` ("auto": the one this machine belongs to) and gather outcomes."""
    try:
        ray.init(address=address, log_to_driver=False, namespace="diffship-farm", logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise DiffshipError(f"Cannot connect to a Ray cluster at {address!r} ({exc}). Start one with `ray start "
                            "--head`, or pass its address (--ray HOST:6379).") from None
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        progress.say(f"{len(tasks)} tasks on a Ray cluster of {len(nodes)} node(s)")
        check_feasible(tasks, [n["Resources"] for n in nodes])
        return _submit_and_gather(tasks, recipes, cache, out, progress)
    finally:
        ray.shutdown()


def check_reachable(address: str) -> None:
    """Refuse a HOST:PORT where nothing answers, at once: ray.init retries the GCS about 20 times, half a minute each
    (measured over 10 minutes on 127.0.0.1:1 with Ray 2.60), before it gives up."""
    if address == "auto":
        return  # ray.init reads this machine's cluster file and fails at once without one
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise DiffshipError(f"--ray {address!r} is not an address: pass 'auto' or HOST:PORT (the head's GCS port, "
                            "6379 by default).")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):  # [::1]:6379
            pass
    except OSError as exc:
        raise DiffshipError(f"Cannot connect to a Ray cluster at {address!r}: nothing answers there "
                            f"({exc.strerror or exc}). Start one with `ray start --head`, or pass its address "
                            "(--ray HOST:6379).") from None


def check_feasible(tasks: list[Task], nodes: list[dict[str, float]]) -> None:
    """Raise, naming the task and the resource, when no alive node could ever run some task."""
    for task in tasks:
        demand = task.demand()
        if any(all(node.get(k, 0.0) >= v for k, v in demand.items()) for node in nodes):
            continue
        lacking = [k for k, v in demand.items() if not any(node.get(k, 0.0) >= v for node in nodes)]
        what = lacking[0] if lacking else ", ".join(demand)
        need = f"{demand[what] / 2**30:.1f} GiB of memory" if what == "memory" else f"resource {what!r}"
        best = max((node.get(what, 0.0) for node in nodes), default=0.0)
        has = (f"the largest node offers {best / 2**30:.1f} GiB" if what == "memory" else
               "no node has it" if not best else f"no node has {demand[what]:g} of it")
        alone = "" if lacking else " (no single node has all of it)"
        raise DiffshipError(f"No node of the Ray cluster can run {task.key}: it needs {need}, and {has}{alone}. "
                            "Nothing was submitted. Add a node with it (ray start --resources / --memory), or drop "
                            "what needs it from the matrix.")


@ray.remote(max_calls=1)
def _run(task: Task, recipe: Recipe, cache: Path, out: Path, *inputs: Outcome) -> Outcome:
    torch.set_num_threads(task.cpus)
    return execute(task, recipe, cache, out, ray.get_runtime_context().get_node_id(), *inputs)


def _submit_and_gather(tasks: list[Task], recipes: dict[str, Recipe], cache: Path, out: Path,
                       progress: Any) -> list[Outcome]:
    refs: dict[str, ray.ObjectRef] = {}
    for task in tasks:  # plan order: a task's inputs are submitted before it
        resources = {k: v for k, v in task.resources.items() if k != "GPU"}
        refs[task.key] = _run.options(
            num_cpus=task.cpus, num_gpus=task.resources.get("GPU", 0), memory=task.memory, resources=resources,
            max_retries=RETRIES, retry_exceptions=False, name=task.key,
        ).remote(task, recipes[task.row], cache, out, *(refs[k] for k in task.after))
    by_ref = {ref: task for task, ref in zip(tasks, refs.values(), strict=True)}
    pending, outcomes, polled = list(refs.values()), [], 0.0
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            if time.monotonic() - polled > RUNNING_POLL_S:
                progress.running, polled = _running(), time.monotonic()
            for ref in ready:
                task = by_ref[ref]
                try:
                    outcome = ray.get(ref)
                except RayError as exc:  # the node was lost more often than retried, or an input of it was
                    reason = str(exc).strip().splitlines()[0][:300]
                    outcome = Outcome(task.key, task.row, "error", 0.0, "?", f"lost on the cluster: {reason}")
                progress.running = max(0, progress.running - 1)
                outcomes.append(outcome)
                progress.finished(outcome)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise Cancelled(outcomes) from None
    return outcomes


def _running() -> int:
    """How many of this job's tasks run now (Ray's state API; 0 when it cannot say)."""
    try:
        from ray.util.state import list_tasks  # optional: farm

        job = ray.get_runtime_context().get_job_id()
        return len(list_tasks(filters=[("job_id", "=", job), ("state", "=", "RUNNING")], limit=1000,
                              raise_on_missing_output=False, timeout=5))
    except Exception:  # the count is a courtesy: a dashboard that does not answer must not stop the matrix
        return 0
