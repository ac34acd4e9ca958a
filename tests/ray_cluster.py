"""A real Ray cluster on this machine for the farm's tests: a head that runs no tasks and worker nodes, each a raylet
of its own with its own resources, started with Ray's own CLI and stopped with it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = Path(sys.executable).parent / "ray"
# Ray 2.60 turns on token authentication unless told otherwise; a dead node is declared in about a second instead of
# thirty, so a killed raylet's task is retried while the test waits.
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
HEALTH = {"health_check_period_ms": 500, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3,
          "health_check_initial_delay_ms": 1000}
OBJECT_STORE = str(100_000_000)


@dataclass
class Cluster:
    """The head's address, and each worker's node id by name."""

    address: str
    env: dict[str, str]
    workers: dict[str, str] = field(default_factory=dict)

    def start_worker(self, name: str, *args: str) -> str:
        """Start a worker node; its node id."""
        before = set(self.node_ids())
        _ray(self.env, "start", f"--address={self.address}", f"--object-store-memory={OBJECT_STORE}", *args)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if new := set(self.node_ids()) - before:
                self.workers[name] = new.pop()
                return self.workers[name]
            time.sleep(0.5)
        raise RuntimeError(f"worker {name} did not join the cluster")

    def node_ids(self, alive: bool = True) -> list[str]:
        """Node ids the head knows (alive ones by default), from `ray list nodes`."""
        listed = subprocess.run([str(RAY), "list", "nodes", "--format=json", f"--address={self.address}", "--limit=100"],
                                env=self.env, capture_output=True, text=True, timeout=60)
        if listed.returncode:
            return []
        return [n["node_id"] for n in json.loads(listed.stdout) if not alive or n["state"] == "ALIVE"]

    def running(self) -> list[dict]:
        """The cluster's running tasks, from `ray list tasks` (Ray's state API)."""
        listed = subprocess.run([str(RAY), "list", "tasks", "--format=json", f"--address={self.address}", "--filter",
                                 "state=RUNNING", "--limit=100"], env=self.env, capture_output=True, text=True, timeout=60)
        # with nothing to list it prints "No resource in the cluster", not an empty JSON list
        return json.loads(listed.stdout) if listed.returncode == 0 and listed.stdout.lstrip().startswith("[") else []

    def kill_raylet(self, node_id: str) -> None:
        """SIGKILL the raylet of `node_id` (the way a machine that loses power leaves the cluster)."""
        for proc in Path("/proc").iterdir():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and cmdline[0].endswith(b"raylet") and f"--node_id={node_id}".encode() in cmdline:
                os.kill(int(proc.name), signal.SIGKILL)
                return
        raise RuntimeError(f"no raylet process for node {node_id}")


def start_head(env: dict[str, str]) -> Cluster:
    """A head node with no CPUs for tasks (it only coordinates), on a free port."""
    env = {**env, **ENV}
    port = _free_port()
    _ray(env, "start", "--head", f"--port={port}", "--num-cpus=0", f"--memory={2**30}",
         f"--object-store-memory={OBJECT_STORE}", "--dashboard-host=127.0.0.1", f"--dashboard-port={_free_port()}",
         "--disable-usage-stats", f"--system-config={json.dumps(HEALTH)}")
    return Cluster(f"127.0.0.1:{port}", env)


def stop(env: dict[str, str]) -> None:
    """Stop every Ray process on this machine."""
    subprocess.run([str(RAY), "stop", "--force"], env={**env, **ENV}, capture_output=True, timeout=120)


def _ray(env: dict[str, str], *args: str) -> None:
    done = subprocess.run([str(RAY), *args], env=env, capture_output=True, text=True, timeout=180)
    if done.returncode:
        raise RuntimeError(f"ray {' '.join(args)} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
