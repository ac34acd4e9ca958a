"""Core ML conversion of a full-size UNet: time, peak memory and package size per precision and attention.

Prediction needs macOS, so this measures what a Linux build machine does: one child process per step, each
reporting its own wall time and peak resident memory.

1. For each attention implementation, a child converts the UNet from PyTorch to an FP16 ML program (the
   conversion diffship keeps in its cache and every precision starts from) and writes the package.
2. For each compressed precision, a child compresses that cached conversion (8-bit linear quantization, 6 / 4-bit
   k-means palettization per grouped channel) and writes the package.
Every package's spec is then checked against the ONNX export (names, dtypes, shapes, weight storage).

    python benchmarks/coreml_unet.py [--model sd15-arch] [--size 512] [--attention split_einsum sdpa]
                                     [--modes fp16 int8-weights palette6 palette4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
from datetime import date
from pathlib import Path

from unet_capture import child

from diffship.host.cpu import describe

COMPILE = r"""
import json, resource, shutil, sys, time
from pathlib import Path
from diffship.store import cache
from diffship.stages.compile import static_shapes
from diffship.models.components import component_specs
from diffship.models.source import resolve
from diffship.targets import CompileContext, coreml
model, work, mode, attention = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
size, fresh = int(sys.argv[5]), sys.argv[6] == "1"
folder = resolve(model).folder
spec = next(s for s in component_specs(folder) if s.name == "unet")
options = coreml.parse_options({"attention": attention})
context = CompileContext(spec, static_shapes(spec, {"batch": [1, 1], "height": [size, size], "width": [size, size]}, True),
                         family="sd1", guided=True, model_folder=folder)
if fresh:  # measure the conversion itself, not a cached one
    shutil.rmtree(cache.store_root() / "coreml-convert", ignore_errors=True)
began = time.perf_counter()
package = coreml.compile(work / "onnx" / "unet" / "model.onnx", mode, options, work / "coreml" / f"{attention}-{mode}", context)
seconds = time.perf_counter() - began
info = coreml.read_info(package)
checked = coreml.check_package(package)
print(json.dumps({"seconds": seconds, "convert_seconds": info["convert_seconds"], "reused": info["conversion_reused"],
                  "compression": info["compression"], "bytes": checked["bytes"], "ops": checked["op_count"],
                  "checks_passed": checked["passed"], "failed": [c for c in checked["checks"] if not c["passed"]],
                  "weights": checked["weights"], "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-arch")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--attention", nargs="+", default=["split_einsum", "sdpa"])
    parser.add_argument("--modes", nargs="+", default=["fp16", "int8-weights", "palette6", "palette4"])
    parser.add_argument("--work", type=Path, default=Path("out/bench-unet"))
    parser.add_argument("--keep", action="store_true", help="keep the packages (GBs) after measuring")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from diffship.exporters.pipeline import export_pipeline
    from diffship.models.source import resolve
    from diffship.targets import coreml

    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.work / "onnx" / "unet" / "model.onnx").is_file():
        print("exporting the UNet to ONNX (the reference the packages are checked against) ...", flush=True)
        export_pipeline(resolve(args.model), args.work / "onnx", ["unet"], overwrite=True)
    support = coreml.torch_support()
    rows = []
    for attention in args.attention:
        for i, mode in enumerate(args.modes):
            fresh = i == 0  # the first mode converts (cache cleared); the others compress that conversion
            print(f"{attention} {mode}: {'converting' if fresh else 'compressing'} ...", flush=True)
            r = child(COMPILE, args.model, args.work, mode, attention, args.size, int(fresh))
            rows.append({"attention": attention, "mode": mode, **r})
            done = f"convert {r['convert_seconds']:.0f} s" if not r["reused"] else \
                f"compress {r['compression']['seconds']:.0f} s" if r["compression"] else "reused conversion"
            print(f"  {done}, total {r['seconds']:.0f} s, {r['bytes'] / 1e6:.0f} MB, peak {r['peak_rss_bytes'] / 2**30:.1f} GiB, "
                  f"{r['ops']} ops, spec checks {'pass' if r['checks_passed'] else 'FAIL ' + str(r['failed'])}", flush=True)
        if not args.keep:
            shutil.rmtree(args.work / "coreml", ignore_errors=True)

    base = {a: next(r for r in rows if r["attention"] == a and r["mode"] == args.modes[0]) for a in args.attention}
    print(f"\n{args.model} UNet, {args.size}x{args.size}, batch 2 (guided), coremltools {support['coremltools']}, "
          f"torch {support['torch']}, {date.today()}, {describe()}")
    print("| attention | precision | step | seconds | package | vs first | peak RSS | ops | spec checks |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        step = "convert" if not r["reused"] else f"compress ({r['compression']['granularity']})" if r["compression"] else "-"
        step_s = r["convert_seconds"] if not r["reused"] else (r["compression"] or {}).get("seconds", 0.0)
        print(f"| {r['attention']} | {r['mode']} | {step} | {step_s:.0f} (total {r['seconds']:.0f}) | "
              f"{r['bytes'] / 1e6:.0f} MB | {r['bytes'] / base[r['attention']]['bytes']:.2f}x | "
              f"{r['peak_rss_bytes'] / 2**30:.1f} GiB | {r['ops']} | {'pass' if r['checks_passed'] else 'FAIL'} |")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "size": args.size, "versions": support, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
