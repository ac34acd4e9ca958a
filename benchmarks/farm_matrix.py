"""Wall time of a small matrix through `diffship farm`, here (one stage at a time) against a local Ray cluster of a
head and two 1-CPU workers, each from a fresh cache, in the same run. On a 2-core machine this measures the farm's
overhead (worker start-up per stage, scheduling, the cluster's own processes), not a speed-up.

    python benchmarks/farm_matrix.py [--out out/bench-farm] [--models tiny-sd tiny-sdxl] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from ray_cluster import start_head, stop

BUILD = """
[[builds]]
model = "{model}"
targets = ["onnxruntime:fp32", "openvino:int8-hybrid"]
calibration = {{ samples = 4 }}
shapes = {{ batch = [1, 2], height = [64, 128], width = [64, 128] }}
validation = {{ prompts = ["a red bicycle"], seeds = [0], steps = 2, latency = {{ enabled = false }} }}
"""


def farm(matrix: Path, out: Path, env: dict[str, str], address: str | None) -> dict[str, object]:
    """One `diffship farm` run: its wall time, exit code and the tasks' own seconds."""
    command = [sys.executable, "-m", "diffship.cli", "farm", str(matrix), "--out", str(out)]
    began = time.perf_counter()
    done = subprocess.run(command + (["--ray", address] if address else []), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    summary = json.loads((out / "farm.json").read_text()) if (out / "farm.json").exists() else {"tasks": []}
    return {"wall_seconds": round(wall, 1), "exit_code": done.returncode, "tasks": len(summary["tasks"]),
            "task_seconds": round(sum(t.get("seconds", 0) for t in summary["tasks"]), 1),
            "nodes": len({t.get("node") for t in summary["tasks"]})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench-farm"))
    parser.add_argument("--models", nargs="+", default=["tiny-sd", "tiny-sdxl"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from diffship.host.cpu import describe

    root = args.out.resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    env = dict(os.environ)
    results = {}
    for side in ("local", "ray"):
        (root / side).mkdir()
        matrix = root / side / "matrix.toml"
        matrix.write_text('[cache]\npath = "cache"\n' + "".join(BUILD.format(model=m) for m in args.models))
        if side == "ray":
            stop(env)
            head = start_head(env)
            head.start_worker("a", "--num-cpus=1", f"--memory={6 * 2**30}")
            head.start_worker("b", "--num-cpus=1", f"--memory={6 * 2**30}")
            try:
                results[side] = farm(matrix, root / side / "out", head.env, head.address)
            finally:
                stop(env)
        else:
            results[side] = farm(matrix, root / side / "out", env, None)
        print(f"{side:>5}: {results[side]}", flush=True)
    ratio = results["ray"]["wall_seconds"] / results["local"]["wall_seconds"]
    print(f"cluster / here wall time: {ratio:.2f}x ({describe()}, {os.cpu_count()} CPUs, {date.today()})")
    if args.json:
        args.json.write_text(json.dumps({"cpu": describe(), "cpus": os.cpu_count(), "date": str(date.today()),
                                         "models": args.models, **results, "ratio": round(ratio, 2)}, indent=2))


if __name__ == "__main__":
    main()
