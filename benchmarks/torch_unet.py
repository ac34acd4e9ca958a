"""Tuned PyTorch against eager PyTorch: one UNet step of a full-size model in every variant the torch target ships.

Eager FP32 (the baseline), eager BF16, torch.compile FP32 and BF16, and AOTInductor packages (FP32, BF16), each as
a ratio to eager FP32, with cosine to eager FP32's output, compile time and memory. Variants of other targets
(`onnxruntime:fp32`, `openvino:bf16`) can join the same run, so a conversion is compared with tuned PyTorch in
one table.

1. One child process per variant writes what diffship's torch target ships for it (the weights in the variant's
   type, or the `.pt2` package: torch.export, then AOTInductor), with an empty inductor cache, timing the build and
   reporting its own peak resident memory.
2. One process loads every variant through the target's Runner, calls each once on the same inputs (torch.compile
   compiles on that call: compile time = first call - steady-state p50), then times them taking turns (warm-up,
   then `--runs` each, interleaved).
Memory is measured apart, one fresh process per variant: the peak resident memory that loading it and its first
call (compiling, for torch.compile) add to the process, what it still holds after that, and what one more call
adds at its peak (the kernel's high-water mark, reset before each).

    python benchmarks/torch_unet.py [--model sd15-arch] [--size 512] [--runs 3]
                                    [--variants fp32 bf16 ... openvino:bf16] [--json f]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

from unet_capture import child

from diffship.host.cpu import describe

BUILD = r"""
import json, resource, sys, time
from pathlib import Path
from diffship.stages.compile import static_shapes
from diffship.models.components import component_specs
from diffship.models.source import resolve
from diffship.targets import CompileContext, get_target
model, work, variant, size, onnx = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), Path(sys.argv[5])
name, _, precision = variant.rpartition(":")
backend = get_target(name or "torch")
folder = resolve(model).folder
spec = next(s for s in component_specs(folder) if s.name == "unet")
shapes = {"batch": [1, 1], "height": [size, size], "width": [size, size]}
context = CompileContext(spec, static_shapes(spec, shapes, True), family="sd1", probe_size=(size, size),
                         shape_ranges=shapes, guided=True, model_folder=folder)
options = backend.parse_options({})
began = time.perf_counter()
if backend.writes_artifacts(precision, options):
    artifact = backend.compile(onnx, precision, options, work / variant.replace(":", "-"), context)
else:  # ONNX Runtime FP32 on the CPU runs the export itself
    artifact = backend.compile(onnx, precision, options)
info = backend.module.read_info(artifact) if name in ("", "torch") else {}
files = [artifact] if artifact.is_file() else list(artifact.rglob("*"))
if name not in ("", "torch"):
    files = [p for p in artifact.parent.iterdir() if p.name.startswith(artifact.stem)]
print(json.dumps({"artifact": str(artifact), "build_seconds": time.perf_counter() - began,
                  "export_seconds": info.get("export_seconds"), "aoti_seconds": info.get("aoti_seconds"),
                  "bytes": sum(p.stat().st_size for p in files if p.is_file()),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


RUN = r"""
import json, resource, sys
from pathlib import Path
from diffship.models.components import component_specs
from diffship.models.source import resolve
from diffship.targets import get_target
from diffship.validation import latency
model, variant, artifact, size = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
name, _, precision = variant.rpartition(":")
backend = get_target(name or "torch")
spec = next(s for s in component_specs(resolve(model).folder) if s.name == "unet")
inputs = spec.sample_inputs(2, size, size)
loaded = {}
before = latency.rss_bytes()  # the libraries imported, nothing of the variant loaded yet


def load_and_call():
    loaded["runner"] = backend.load(artifact, backend.parse_options({}), precision)
    loaded["runner"].run(inputs)  # torch.compile compiles here


peak = latency.peak_rss_during(load_and_call)
held = latency.rss_bytes() - before
steady = latency.peak_rss_during(lambda: loaded["runner"].run(inputs))
print(json.dumps({"run_peak_rss_bytes": peak, "held_rss_bytes": held, "steady_call_added_bytes": steady,
                  "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-arch")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--variants", nargs="+",
                        default=["fp32", "bf16", "fp32-compile", "bf16-compile", "fp32-aoti", "bf16-aoti"])
    parser.add_argument("--work", type=Path, default=Path("out/bench-torch"))
    parser.add_argument("--onnx", type=Path, default=Path("out/bench-unet/onnx"),
                        help="the UNet's ONNX export, for variants of other targets (target:precision)")
    parser.add_argument("--keep", action="store_true", help="keep the weights and packages (GBs) after measuring")
    parser.add_argument("--memory-only", action="store_true", help="build and measure memory, skip the timed runs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.variants[0] != "fp32":
        parser.error("the first variant is the baseline the others are compared with: fp32 (eager)")

    args.work.mkdir(parents=True, exist_ok=True)
    caches = Path(tempfile.mkdtemp(prefix="inductor-", dir=args.work))
    onnx = args.onnx / "unet" / "model.onnx"
    if any(":" in v for v in args.variants) and not onnx.is_file():
        from diffship.exporters.pipeline import export_pipeline
        from diffship.models.source import resolve

        print("exporting the UNet to ONNX for the other targets ...", flush=True)
        export_pipeline(resolve(args.model), args.onnx, ["unet"], overwrite=True)
    built = {}
    for precision in args.variants:
        print(f"{precision}: building ...", flush=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(caches / precision)  # every compile starts cold
        built[precision] = child(BUILD, args.model, args.work, precision, args.size, onnx)
        print(f"  {built[precision]['build_seconds']:.0f} s, {built[precision]['bytes'] / 1e9:.2f} GB, "
              f"peak {built[precision]['peak_rss_bytes'] / 2**30:.1f} GiB", flush=True)
    for precision in args.variants:  # memory of each variant alone, in a fresh process with a cold inductor cache
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(caches / f"alone-{precision}")
        built[precision] |= child(RUN, args.model, precision, built[precision]["artifact"], args.size)
        print(f"{precision}: alone, peak {built[precision]['run_peak_rss_bytes'] / 2**30:.1f} GiB", flush=True)
    if args.memory_only:
        rows = {p: {**r, "latency": None, "cosine": None, "compile_seconds": None} for p, r in built.items()}
        rows["_versions"] = {}
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(caches / "run")
        rows = measure(args, built)
    shutil.rmtree(caches, ignore_errors=True)
    if not args.keep:
        for precision in args.variants:
            shutil.rmtree(args.work / precision.replace(":", "-"), ignore_errors=True)
    report(args, rows)


def measure(args: argparse.Namespace, built: dict) -> dict:
    """Load every variant, call each once (compiling), then time them in turns; memory per load and per call."""
    import numpy as np
    import torch

    from diffship.models.components import component_specs
    from diffship.models.source import resolve
    from diffship.targets import get_target, pytorch
    from diffship.validation import latency
    from diffship.validation.parity import compare

    spec = next(s for s in component_specs(resolve(args.model).folder) if s.name == "unet")
    inputs = spec.sample_inputs(2, args.size, args.size)
    runners, rows = {}, {}
    for precision in args.variants:
        before = latency.rss_bytes()
        outputs: dict = {}
        timing: dict = {}

        def load_and_call(p: str = precision, o: dict = outputs, t: dict = timing) -> None:
            began = time.perf_counter()
            name, _, precision = p.rpartition(":")
            backend = get_target(name or "torch")
            runners[p] = backend.load(Path(built[p]["artifact"]), backend.parse_options({}), precision)
            t["load"] = time.perf_counter() - began
            o.update(runners[p].run(inputs))  # torch.compile compiles here
            t["first"] = time.perf_counter() - began - t["load"]

        # Peak above what the process held before: loading (weights are read lazily, so mostly on the first call),
        # the first call, and for torch.compile the compilation.
        peak = latency.peak_rss_during(load_and_call)
        rows[precision] = {**built[precision], "load_seconds": timing["load"], "first_call_seconds": timing["first"],
                           "first_peak_bytes": peak, "held_bytes": latency.rss_bytes() - before,
                           "output": outputs["out_sample"]}
        print(f"{precision}: loaded in {timing['load']:.1f} s, first call {timing['first']:.1f} s", flush=True)
    times = latency.interleaved({p: lambda r=r: r.run(inputs) for p, r in runners.items()}, 1, args.runs)
    reference = rows[args.variants[0]]["output"]
    for precision, row in rows.items():
        row["call_peak_bytes"] = latency.peak_rss_during(lambda r=runners[precision]: r.run(inputs))
        row["latency"] = latency.summarize(times[precision])
        row["compile_seconds"] = max(0.0, row["first_call_seconds"] - row["latency"]["p50_s"]) \
            if ":" not in precision and pytorch.variant(precision).mode == "compile" else None
        row["cosine"] = compare(reference, row.pop("output"))["cosine"]
    rows["_versions"] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                         "cpu_capability": torch.backends.cpu.get_cpu_capability(), "numpy": np.__version__}
    return rows


def report(args: argparse.Namespace, rows: dict) -> None:
    versions = rows.pop("_versions")
    if args.memory_only:
        print("| variant | build | build peak RSS | on disk | load + first call: peak added | held after | "
              "next call adds |")
        print("|---|---|---|---|---|---|---|")
        for precision, r in rows.items():
            print(f"| {precision} | {r['build_seconds']:.0f} s | {r['peak_rss_bytes'] / 2**30:.1f} GiB | "
                  f"{r['bytes'] / 1e9:.2f} GB | {r['run_peak_rss_bytes'] / 2**30:.2f} GiB | "
                  f"{r['held_rss_bytes'] / 2**30:.2f} GiB | {(r['steady_call_added_bytes'] or 0) / 2**30:.2f} GiB |")
        if args.json:
            args.json.write_text(json.dumps({"model": args.model, "size": args.size, "rows": rows}, indent=2))
        return
    base = rows[args.variants[0]]["latency"]["p50_s"]
    print(f"\n{args.model} UNet, {args.size}x{args.size}, batch 2 (one guided step), torch {versions['torch']} "
          f"({versions['cpu_capability']}, {versions['threads']} threads), {date.today()}, "
          f"{describe()}; {args.runs} interleaved runs after 1 warm-up")
    print("| variant | p50 | p90 | vs eager FP32 | cosine to eager FP32 | build | compile | on disk | "
          "build peak RSS | load + first call: peak added | held after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for precision, r in rows.items():
        lat = r["latency"]
        compile_s = (f"{r['compile_seconds']:.0f} s (first call)" if r["compile_seconds"] is not None else
                     f"{r['export_seconds']:.0f} s export + {r['aoti_seconds']:.0f} s AOTI" if r["aoti_seconds"] else "-")
        print(f"| {precision} | {lat['p50_s']:.3f} s | {lat['p90_s']:.3f} s | {base / lat['p50_s']:.2f}x | "
              f"{r['cosine']:.6f} | {r['build_seconds']:.0f} s | {compile_s} | {r['bytes'] / 1e9:.2f} GB | "
              f"{r['peak_rss_bytes'] / 2**30:.1f} GiB | {r['run_peak_rss_bytes'] / 2**30:.2f} GiB | "
              f"{r['held_rss_bytes'] / 2**30:.2f} GiB |")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "size": args.size, "versions": versions, "rows": rows},
                                        indent=2))

if __name__ == "__main__":
    main()
