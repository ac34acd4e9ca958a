"""Export the full-size UNets (sd15-arch, sdxl-arch) and the whole sd15-arch pipeline; record time, peak RSS, sizes.

Each export runs in a fresh Python process so its peak resident memory (ru_maxrss) is its own.
Building the random-weight models (once, cached) is timed separately and not counted.

    python benchmarks/export_unet.py [--models sd15-arch sdxl-arch] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

CHILD = r"""
import json, resource, shutil, sys, time
from pathlib import Path
from diffship.exporters.pipeline import export_pipeline
from diffship.models.source import resolve
model, out, components = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(",") if sys.argv[3] else None
start = time.perf_counter()
manifest = export_pipeline(resolve(model), out, components)
seconds = time.perf_counter() - start
files = {f["path"]: f["bytes"] for c in manifest["components"].values() for f in c["files"]}
print(json.dumps({"seconds": seconds, "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "files": files}))
"""

RUNS = {"sd15-arch": [("unet", "unet"), ("all components", "")], "sdxl-arch": [("unet", "unet")]}


def build(model: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"from diffship.models.builtin import builtin_folder; builtin_folder({model!r})"],
                   check=True)
    return time.perf_counter() - start


def export(model: str, components: str, workdir: Path) -> dict:
    out = workdir / f"{model}-{components or 'all'}"
    proc = subprocess.run([sys.executable, "-c", CHILD, model, str(out), components], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"export of {model} ({components or 'all'}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--workdir", type=Path, help="where exports go (default: a temporary folder, deleted)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for model in args.models:
            built = build(model)
            print(f"{model}: built/cached in {built:.0f} s", flush=True)
            for label, components in RUNS[model]:
                result = export(model, components, Path(tmp))
                size = sum(result["files"].values())
                row = {"model": model, "what": label, "seconds": round(result["seconds"], 1),
                       "peak_rss_gib": round(result["peak_rss_kib"] / 2**20, 2), "bytes": size,
                       "files": result["files"]}
                rows.append(row)
                print(f"{model:10} {label:15} {row['seconds']:7.1f} s  peak RSS {row['peak_rss_gib']:5.2f} GiB  "
                      f"{size / 2**30:6.2f} GiB on disk", flush=True)
                for path, n in sorted(result["files"].items()):
                    if n > 2**20:
                        print(f"    {path}: {n / 2**30:.3f} GiB")
    meta = {"date": date.today().isoformat(), "python": platform.python_version(), "machine": platform.machine(),
            "cpus": __import__("os").cpu_count()}
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
