"""Run `diffship build` itself, as a user runs it, for every CPU target and precision at full size; print each set's
verdict, wall time and peak memory.

Each group of targets is one `diffship build` command line in its own process (`--targets onnxruntime:fp32+fp16+int8`
and so on), sharing one cache, so the export is made by the first and reused by the others, as on a user's
machine. The build's own output lines say which stage and set is running; the benchmark times each stage and
samples the resident memory of the whole process tree (psutil, every 0.25 s), so every stage and set gets its wall
time and its peak. `ru_maxrss` of the build (the largest single process) is printed too.

    python benchmarks/build_matrix.py [--recipe benchmarks/recipes/sd15-build-matrix.toml] [--out out/bench-matrix]
                                      [--cache DIR] [--group onnxruntime:fp32+fp16+int8 ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import psutil

HERE = Path(__file__).parent
GROUPS = ["onnxruntime:fp32+fp16+int8", "openvino:fp32+bf16+int8-weights+int8-hybrid", "torch:fp32-aoti+bf16-aoti"]
# Which stage a line of the build's output starts (everything up to the next such line belongs to it).
STAGE_LINES = [
    (re.compile(r"^Hashing "), lambda m: "load + hash the model"),
    (re.compile(r"^\[export "), lambda m: "export"),
    (re.compile(r"^\[calibration\] capturing"), lambda m: "calibration capture"),
    (re.compile(r"^\[calibration\] captured"), lambda m: "INT8 quantization after the capture"),
    (re.compile(r"^\[compile (\S+) "), lambda m: f"compile {m[1]}"),
    (re.compile(r"^\[validate\] capturing"), lambda m: "baseline UNet trajectory"),
    (re.compile(r"^\[validate\] recording"), lambda m: "baseline recorded (staged validation)"),
    (re.compile(r"^\[validate (\S+)\] "), lambda m: f"validate {m[1]}"),
    (re.compile(r"^\[(\w+) ([\w-]+)\] "), lambda m: f"validate {m[1]}-{m[2]}"),
    (re.compile(r"^Writing the report"), lambda m: "report"),
]


def cpu_name() -> str:
    """The CPU model and the instruction sets that decide BF16 / INT8 speed (AVX-512 VNNI / BF16, AMX)."""
    from diffship.host.cpu import describe

    return describe()


def _tree(process: psutil.Process) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):  # the child may be gone (reaped) by the time it is sampled
        return [process, *process.children(recursive=True)]
    return []


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in _tree(process):
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def memory_cgroup(gib: float) -> Path:
    """A cgroup (v1 memory controller) limited to `gib`, swap included where the kernel accounts it: a stage that
    needs more than that is killed, one that fits runs with the kernel reclaiming its page cache and clean mapped files
    at the limit, as on a machine of that size."""
    root = Path("/sys/fs/cgroup/memory")
    if not (root / "memory.limit_in_bytes").is_file() or not os.access(root, os.W_OK):
        sys.exit("--cgroup-gib needs the cgroup v1 memory controller at /sys/fs/cgroup/memory, writable (root)")
    if psutil.swap_memory().total and not (root / "memory.memsw.limit_in_bytes").is_file():
        sys.exit("--cgroup-gib: this machine has swap the cgroup cannot limit; a stage over the limit would swap, "
                 "not fail")
    group = root / f"diffship-bench-{os.getpid()}"
    group.mkdir(exist_ok=True)
    limit = str(int(gib * 2**30))
    (group / "memory.limit_in_bytes").write_text(limit)
    if (group / "memory.memsw.limit_in_bytes").is_file():
        with contextlib.suppress(OSError):  # memory + swap: no swapping past the limit either
            (group / "memory.memsw.limit_in_bytes").write_text(limit)
    return group


def cgroup_figures(group: Path) -> dict:
    """The cgroup's limit, its peak charge (page cache included) and how many times the charge hit the limit (each
    a reclaim); then the group is removed (left in place if a process of it outlived the stage)."""
    figures = {"cgroup_limit": int((group / "memory.limit_in_bytes").read_text()),
               "cgroup_peak": int((group / "memory.max_usage_in_bytes").read_text()),
               "cgroup_limit_hits": int((group / "memory.failcnt").read_text())}
    with contextlib.suppress(OSError):
        group.rmdir()
    return figures


def tree_anon(process: psutil.Process) -> int:
    """Anonymous resident memory of the tree (RssAnon): what the processes hold besides mapped files and page cache,
    which the kernel can drop and read again."""
    total = 0
    for p in _tree(process):
        with contextlib.suppress(OSError, psutil.Error):
            status = Path(f"/proc/{p.pid}/status").read_text()
            total += 1024 * next((int(line.split()[1]) for line in status.splitlines() if line.startswith("RssAnon:")), 0)
    return total


def run_group(recipe: Path, group: str, out: Path, env: dict[str, str], cgroup_gib: float | None = None) -> dict:
    command = [sys.executable, "-m", "diffship.cli", "build", str(recipe), "--targets", group, "--out", str(out)]
    print(f"\n$ diffship build {recipe} --targets {group} --out {out}", flush=True)
    limit = memory_cgroup(cgroup_gib) if cgroup_gib else None
    started = time.perf_counter()
    # the build enters the cgroup before it runs anything: it and every child it starts are charged there
    enter = (lambda: (limit / "cgroup.procs").write_text(str(os.getpid()))) if limit else None
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                             preexec_fn=enter)
    proc = psutil.Process(child.pid)
    stages: dict[str, dict[str, float]] = {}
    current = {"name": "start (imports, resolving the model)", "since": started}
    peak = {"bytes": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            rss = tree_rss(proc)
            peak["bytes"] = max(peak["bytes"], rss)
            entry = stages.setdefault(current["name"], {"seconds": 0.0, "peak_bytes": 0})
            entry["peak_bytes"] = max(entry["peak_bytes"], rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert child.stdout is not None
    for line in child.stdout:
        print(line, end="", flush=True)
        # The first pattern that matches names the line's stage (a set's closing "[validate <set>] passed" line
        # also matches the generic "[<target> <precision>]" pattern further down).
        stage = next((name(m) for pattern, name in STAGE_LINES if (m := pattern.match(line))), None)
        if stage is not None and stage != current["name"]:
            now = time.perf_counter()
            stages.setdefault(current["name"], {"seconds": 0.0, "peak_bytes": 0})["seconds"] += now - current["since"]
            current.update(name=stage, since=now)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    wall = time.perf_counter() - started
    stages.setdefault(current["name"], {"seconds": 0.0, "peak_bytes": 0})["seconds"] += time.perf_counter() - current["since"]
    verdicts = {}
    if (out / "manifest.json").is_file():
        manifest = json.loads((out / "manifest.json").read_text())
        report = json.loads((out / manifest["report"]["json"]).read_text())
        for key, result in report["sets"].items():
            trajectory = ((result.get("parity") or {}).get("denoiser_steps") or {}).get("min_cosine")
            verdicts[key] = {"passed": result["passed"], "min_psnr_db": (result.get("e2e") or {}).get("min_psnr_db"),
                             "unet_real_steps_min_cosine": trajectory}
    return {"group": group, "exit_code": child.returncode, "wall_seconds": round(wall, 1),
            "peak_tree_rss_bytes": peak["bytes"], "ru_maxrss_bytes": usage.ru_maxrss * 1024,
            **(cgroup_figures(limit) if limit is not None else {}),
            "stages": {k: {"seconds": round(v["seconds"], 1), "peak_bytes": v["peak_bytes"]} for k, v in stages.items()},
            "sets": verdicts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=HERE / "recipes" / "sd15-build-matrix.toml")
    parser.add_argument("--out", type=Path, default=Path("out/bench-matrix"))
    parser.add_argument("--cache", type=Path, help="DIFFSHIP_CACHE for the builds (default: the usual one).")
    parser.add_argument("--group", action="append", help=f"--targets of one build (repeatable; default: {GROUPS}).")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    parser.add_argument("--cgroup-gib", type=float, help="Run each build in a memory cgroup of this size (root).")
    args = parser.parse_args()
    env = {**os.environ, **({"DIFFSHIP_CACHE": str(args.cache)} if args.cache else {})}
    results = []
    for group in args.group or GROUPS:
        out = args.out / group.split(":")[0]
        results.append(run_group(args.recipe, group, out, env, args.cgroup_gib))
    gib = 2**30
    print(f"\n{args.recipe.name}, {cpu_name()}, {psutil.cpu_count()} CPUs, "
          f"{psutil.virtual_memory().total / gib:.0f} GiB, {date.today()}")
    for r in results:
        print(f"\n$ diffship build --targets {r['group']}: exit {r['exit_code']}, {r['wall_seconds']:.0f} s, peak "
              f"{r['peak_tree_rss_bytes'] / gib:.2f} GiB (process tree; largest process {r['ru_maxrss_bytes'] / gib:.2f} GiB)")
        if "cgroup_peak" in r:
            print(f"  inside a {r['cgroup_limit'] / gib:.0f} GiB memory cgroup: its peak charge {r['cgroup_peak'] / gib:.2f} GiB "
                  f"(page cache included), the limit hit {r['cgroup_limit_hits']} times")
        for key, v in r["sets"].items():
            cos = v["unet_real_steps_min_cosine"]
            psnr = v["min_psnr_db"]
            print(f"  {key:28} {'passed' if v['passed'] else 'FAILED':7} PSNR {'-' if psnr is None else f'{psnr:.1f}'} dB, "
                  f"UNet on real steps min cosine {'-' if cos is None else f'{cos:.5f}'}")
        print(f"  {'stage':44} {'wall':>8} {'peak':>10}")
        for name, s in r["stages"].items():
            if s["seconds"] >= 0.5:
                print(f"  {name:44} {s['seconds']:7.0f}s {s['peak_bytes'] / gib:9.2f}G")
    if args.json:
        from diffship.host.cpu import cpu_facts

        args.json.write_text(json.dumps({"recipe": str(args.recipe), "cpu": cpu_facts(), "date": str(date.today()),
                                         "builds": results}, indent=2))
    sys.exit(max(r["exit_code"] for r in results))


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
