"""ONNX Runtime UNet step on a full-size model: each optimization with and without it, against PyTorch FP32 eager.

1. A child process captures calibration inputs and one real denoising trajectory (shared with the OpenVINO
   benchmark: `unet_capture.py`; reused when the work folder has one for the same settings).
2. One child per artifact prepares it with `diffship.targets.onnxruntime.compile`: time, peak memory, size, what
   the preparation did (fusions, node counts).
3. This process loads PyTorch's UNet and every variant, times one UNet call (batch 2: one image under guidance)
   with all of them taking turns, and reports the cosine against PyTorch FP32 on every real denoising step.

Variants (each differs from the one before it by one thing):
  export-basic   the exported graph, session graph optimization "basic"
  export         the exported graph, session graph optimization "all" (ONNX Runtime's own CPU fusions, NCHWc)
  prepared       + the saved prepared graph: transformer fusions (attention, LayerNorm...) and constant folding
  int8-export    static QDQ INT8 UNet quantized from the export, session "all"
  int8           static QDQ INT8 UNet quantized from the prepared graph (diffship's default for INT8)
  fp16           parity only: the CPU provider has no native FP16 kernels, so its time would mislead

    python benchmarks/onnxruntime_unet.py [--model sd15-arch] [--variants export prepared int8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

from unet_capture import add_arguments, child, prepare, trajectory_and_pytorch

COMPILE = r"""
import json, resource, sys, time
from pathlib import Path
from diffship.models.components import component_specs
from diffship.models.source import resolve
from diffship.targets import CompileContext, onnxruntime
from diffship.targets.calibration import CalibrationData
model, work, variant, precision = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
optimize, size = sys.argv[5] == "1", int(sys.argv[6])
spec = next(s for s in component_specs(resolve(model).folder) if s.name == "unet")
calibration = lambda: CalibrationData.load(work / "calibration.npz", {})
options = onnxruntime.OrtOptions(providers=("CPUExecutionProvider",), optimize=optimize)
began = time.perf_counter()
path = onnxruntime.compile(work / "onnx" / "unet" / "model.onnx", precision, options, work / variant,
                           CompileContext(spec, None, calibration, None, (size, size)))
graph = json.loads((path.parent / onnxruntime.GRAPH_FILE).read_text())
print(json.dumps({"seconds": time.perf_counter() - began, "graph": graph,
                  "bytes": sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith("model.onnx")),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

# variant: (precision, prepared graph, session graph optimization, timed)
VARIANTS = {
    "export-basic": ("fp32", False, "basic", True),
    "export": ("fp32", False, "all", True),
    "prepared": ("fp32", True, "all", True),
    "int8-export": ("int8", False, "all", True),
    "int8": ("int8", True, "all", True),
    "fp16": ("fp16", False, "all", False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--reuse", action="store_true", help="reuse artifacts already in the work folder")
    add_arguments(parser)
    args = parser.parse_args()

    from diffship.targets import onnxruntime
    from diffship.validation.latency import interleaved, rss_bytes, summarize
    from diffship.validation.parity import compare

    work = args.work
    folder, figures = prepare(args)
    figures["variants"] = {}
    paths = {}
    for variant in args.variants:
        precision, optimize, _, _ = VARIANTS[variant]
        if precision == "fp32" and not optimize:
            paths[variant] = work / "onnx" / "unet" / "model.onnx"
            figures["variants"][variant] = {"compile": {"bytes": sum(
                p.stat().st_size for p in paths[variant].parent.iterdir() if p.name.startswith("model.onnx"))}}
            continue
        if not (args.reuse and (work / variant / "model.onnx").is_file()):
            shutil.rmtree(work / variant, ignore_errors=True)
            print(f"preparing {variant} ...", flush=True)
            compiled = child(COMPILE, args.model, work, variant, precision, int(optimize), args.size)
            (work / f"{variant}.json").write_text(json.dumps(compiled))
        figures["variants"][variant] = {"compile": json.loads((work / f"{variant}.json").read_text())}
        paths[variant] = work / variant / "model.onnx"

    trajectory, calls, torch_call = trajectory_and_pytorch(work, folder)
    steps = len(calls)

    def load(variant: str) -> onnxruntime.OrtRunner:
        precision, _, level, _ = VARIANTS[variant]
        options = onnxruntime.OrtOptions(providers=("CPUExecutionProvider",), graph_optimization=level)
        before, began = rss_bytes(), time.perf_counter()
        runner = onnxruntime.load(paths[variant], options, precision)
        figures["variants"][variant] |= {"load_s": time.perf_counter() - began, "load_rss_bytes": rss_bytes() - before,
                                         "runtime": runner.describe().record()}
        return runner

    def cosines(runner: onnxruntime.OrtRunner) -> list[float]:
        return [compare(trajectory[f"out/{i}"], runner.run(calls[i])["out_sample"])["cosine"] for i in range(steps)]

    runners = {v: load(v) for v in args.variants if VARIANTS[v][3]}

    print(f"timing one UNet call, {args.runs} runs each, taking turns ...", flush=True)
    times = interleaved({"pytorch-fp32": torch_call, **{v: (lambda r=r: r.run(calls[0])) for v, r in runners.items()}},
                        warmup=1, runs=args.runs)
    base = summarize(times["pytorch-fp32"])
    figures["pytorch_fp32"] = base
    for variant, runner in runners.items():
        stats = summarize(times[variant])
        figures["variants"][variant] |= {"latency": stats, "speedup": base["p50_s"] / stats["p50_s"],
                                         "cosine_per_step": cosines(runner)}
    runners.clear()
    for variant in [v for v in args.variants if not VARIANTS[v][3]]:
        runner = load(variant)
        figures["variants"][variant]["cosine_per_step"] = cosines(runner)
        del runner

    print(f"\n{args.model} UNet, batch 2, {args.size}x{args.size}, {figures['machine']}, {figures['date']}")
    print(f"{'':14} {'p50':>8} {'vs PyTorch':>10} {'vs export':>9} {'min cosine':>11} {'cosine per step':>40} "
          f"{'size':>9} {'load':>7}")
    print(f"{'pytorch-fp32':14} {base['p50_s']:7.3f}s {1.0:9.2f}x")
    export = figures["variants"].get("export", {}).get("latency")
    for variant in args.variants:
        e = figures["variants"][variant]
        per_step = " ".join(f"{c:.5f}" for c in e["cosine_per_step"])
        if "latency" in e:
            vs_export = f"{export['p50_s'] / e['latency']['p50_s']:8.2f}x" if export else f"{'-':>9}"
            timing = f"{e['latency']['p50_s']:7.3f}s {e['speedup']:9.2f}x {vs_export}"
        else:
            timing = f"{'not timed':>29}"
        print(f"{variant:14} {timing} {min(e['cosine_per_step']):11.5f} {per_step:>40} "
              f"{e['compile']['bytes'] / 2**30:7.2f}GiB {e['load_s']:6.1f}s")
    print()
    c = figures["calibration"]
    print(f"calibration capture: {c['seconds']:.0f} s, peak {c['peak_rss_bytes'] / 2**30:.2f} GiB"
          + (" (reused from the work folder)" if c.get("reused") else ""))
    for variant in args.variants:
        compiled = figures["variants"][variant]["compile"]
        if "seconds" in compiled:
            g = compiled["graph"]
            done = g.get("quantization") or f"fused {g.get('fused')}, {g.get('nodes_before')} -> {g.get('nodes_after')} nodes"
            print(f"{variant}: prepared in {compiled['seconds']:.0f} s, peak {compiled['peak_rss_bytes'] / 2**30:.2f} GiB;"
                  f" {done}" + (f"; kept {g['kept']}: {g['reason']}" if g.get("kept") else ""))
    from diffship.host.cpu import cpu_facts, describe

    print(describe())
    if args.json:
        args.json.write_text(json.dumps({**figures, "cpu": cpu_facts()}, indent=2))


if __name__ == "__main__":
    main()
