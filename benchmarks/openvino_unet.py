"""OpenVINO UNet step on a full-size model: every IR mode (FP32 in f32, BF16, INT8-hybrid...) against PyTorch FP32 eager.

1. A child process captures calibration inputs (the recipe's prompts, samples and steps, not 50-step
   generations) and one validation trajectory: the UNet's real inputs at every denoising step of a
   different prompt and seed, with PyTorch FP32's output on each. Its time and peak memory are its own.
2. One child per mode converts the ONNX UNet to IR (and quantizes it): time, peak memory, size on disk.
3. This process loads PyTorch's UNet and every IR (cold, then warm from the model cache) and times one
   UNet call (batch 2: one image under guidance) with all of them taking turns, then reports cosine
   against PyTorch FP32 on every real denoising step.

    python benchmarks/openvino_unet.py [--model sd15-arch] [--modes fp32 bf16 int8-hybrid] [--json out.json]
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
from diffship.stages.compile import static_shapes
from diffship.models.components import component_specs
from diffship.models.source import resolve
from diffship.targets import CompileContext, openvino
from diffship.targets.calibration import CalibrationData
model, work, mode, size = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
spec = next(s for s in component_specs(resolve(model).folder) if s.name == "unet")
# One image under guidance at a fixed resolution, as a recipe with fixed [shapes] builds it: a static IR.
static = static_shapes(spec, {"batch": [1, 1], "height": [size, size], "width": [size, size]}, True)
calibration = lambda: CalibrationData.load(work / "calibration.npz", {})
began = time.perf_counter()
xml = openvino.compile(work / "onnx" / "unet" / "model.onnx", mode, openvino.OvOptions(), work / mode,
                       CompileContext(spec, static, calibration))
print(json.dumps({"seconds": time.perf_counter() - began, "bytes": sum(p.stat().st_size for p in xml.parent.iterdir()),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["fp32", "fp16", "bf16", "int8-weights", "int4-weights", "int8-hybrid"])
    add_arguments(parser)
    args = parser.parse_args()

    from diffship.targets import openvino
    from diffship.validation.latency import interleaved, summarize
    from diffship.validation.parity import compare

    work = args.work
    folder, figures = prepare(args)
    figures["modes"] = {}
    for mode in args.modes:
        shutil.rmtree(work / mode, ignore_errors=True)
        print(f"compiling {mode} ...", flush=True)
        figures["modes"][mode] = {"compile": child(COMPILE, args.model, work, mode, args.size)}

    trajectory, calls, torch_call = trajectory_and_pytorch(work, folder)
    steps = len(calls)
    runners = {}
    blobs = work / "model-cache"
    shutil.rmtree(blobs, ignore_errors=True)
    for mode in args.modes:
        options = openvino.OvOptions(cache_dir=str(blobs))
        began = time.perf_counter()
        openvino.load(work / mode / openvino.XML, options, mode)
        cold = time.perf_counter() - began
        began = time.perf_counter()
        runners[mode] = openvino.load(work / mode / openvino.XML, options, mode)
        figures["modes"][mode] |= {"load_cold_s": cold, "load_warm_s": time.perf_counter() - began,
                                   "runtime": runners[mode].describe().record()}

    calls_by_name = {"pytorch-fp32": torch_call, **{m: (lambda r=r: r.run(calls[0])) for m, r in runners.items()}}
    print(f"timing one UNet call, {args.runs} runs each, taking turns ...", flush=True)
    times = interleaved(calls_by_name, warmup=1, runs=args.runs)
    base = summarize(times["pytorch-fp32"])
    figures["pytorch_fp32"] = base
    print(f"\n{args.model} UNet, batch 2, {args.size}x{args.size}, {figures['machine']}, {figures['date']}")
    print(f"{'':16} {'computes in':>11} {'p50':>8} {'speedup':>8} {'min cosine':>11} {'cosine per step':>40} {'size':>9}")
    print(f"{'pytorch-fp32':16} {'f32':>11} {base['p50_s']:7.3f}s {1.0:7.2f}x")
    for mode, runner in runners.items():
        stats = summarize(times[mode])
        cosines = [compare(trajectory[f"out/{i}"], runner.run(calls[i])["out_sample"])["cosine"] for i in range(steps)]
        entry = figures["modes"][mode]
        entry |= {"latency": stats, "speedup": base["p50_s"] / stats["p50_s"], "cosine_per_step": cosines}
        per_step = " ".join(f"{c:.5f}" for c in cosines)
        print(f"{mode:16} {entry['runtime']['inference_precision']:>11} {stats['p50_s']:7.3f}s {entry['speedup']:7.2f}x "
              f"{min(cosines):11.5f} {per_step:>40} {entry['compile']['bytes'] / 2**30:7.2f}GiB")
    print()
    c = figures["calibration"]
    print(f"calibration capture: {c['seconds']:.0f} s for {c['generations']} generations, "
          f"peak {c['peak_rss_bytes'] / 2**30:.2f} GiB")
    for mode in args.modes:
        e = figures["modes"][mode]
        print(f"{mode}: IR in {e['compile']['seconds']:.0f} s, peak {e['compile']['peak_rss_bytes'] / 2**30:.2f} GiB; "
              f"load cold {e['load_cold_s']:.1f} s, warm {e['load_warm_s']:.1f} s")
    from diffship.host.cpu import cpu_facts, describe

    print(describe())
    if args.json:
        args.json.write_text(json.dumps({**figures, "cpu": cpu_facts()}, indent=2))


if __name__ == "__main__":
    main()
