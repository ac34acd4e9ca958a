"""What a ControlNet costs per denoising call on a full-size model: the ControlNet plus the UNet variant that takes
its residuals, against the plain UNet, for each CPU target, all in this run, on this machine.

`sd15-arch` with a ControlNet made by diffusers' `ControlNetModel.from_unet` from its UNet (output convolutions
given random weights: the real architecture and cost, SD 1.5's 1.4 GB ControlNet). The three components are
exported once, compiled per target / precision, and timed at batch 2 (one image under guidance), 512x512, with
the plain and the controlled call taking turns (one warm-up, then `--runs` each); PyTorch FP32 eager is measured
the same way. Prints p50 seconds and the controlled / plain ratio per row.

    python benchmarks/controlnet_unet.py --work /work/bench/cn [--sets onnxruntime:fp32 openvino:fp32 openvino:bf16]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from controlnet_files import tiny_controlnet

from diffship.exporters.pipeline import export_pipeline
from diffship.host.cpu import cpu_facts, describe
from diffship.models.components import component_specs, run_torch, wrap
from diffship.models.loading import load_component
from diffship.models.source import resolve
from diffship.stages.compile import static_shapes
from diffship.targets import CompileContext, get_target

COMPONENTS = ["unet", "controlnet", "controlled_unet"]


def timed_pair(plain, controlled, runs: int) -> tuple[float, float]:
    """p50 seconds of `plain()` and `controlled()`, taking turns after one warm-up each."""
    plain(), controlled()
    a, b = [], []
    for _ in range(runs):
        for fn, into in ((plain, a), (controlled, b)):
            began = time.perf_counter()
            fn()
            into.append(time.perf_counter() - began)
    return statistics.median(a), statistics.median(b)


def torch_row(folder: Path, specs: dict, inputs: dict, plain_inputs: dict, runs: int) -> tuple[float, float]:
    """PyTorch FP32 eager, the reference every row is read against."""
    unet, net_spec, controlled_spec = specs["unet"], specs["controlnet"], specs["controlled_unet"]
    unet_module = load_component(folder, "unet")
    plain, net = wrap(unet, unet_module), wrap(net_spec, load_component(folder, "controlnet"))
    controlled_unet = wrap(controlled_spec, unet_module)

    def controlled() -> None:
        residuals = run_torch(net, net_spec, inputs)
        run_torch(controlled_unet, controlled_spec, plain_inputs | residuals)

    return timed_pair(lambda: run_torch(plain, unet, plain_inputs), controlled, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("out/bench-controlnet"))
    parser.add_argument("--model", default="sd15-arch")
    parser.add_argument("--sets", nargs="+", default=["onnxruntime:fp32", "openvino:fp32", "openvino:bf16"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    net = work / "controlnet"
    if not (net / "config.json").is_file():
        tiny_controlnet(resolve(args.model).folder, net, strength=1.0)
    source = resolve(args.model, controlnets=[str(net)])
    specs = {s.name: s for s in component_specs(source.folder) if s.name in COMPONENTS}
    if not (work / "onnx" / "manifest.json").is_file():
        export_pipeline(source, work / "onnx", COMPONENTS, overwrite=True, on_step=lambda *a: print("   ", *a, flush=True))
    unet, net_spec = specs["unet"], specs["controlnet"]
    inputs = net_spec.sample_inputs(2, args.size, args.size)
    plain_inputs = {t.name: inputs[t.name] for t in unet.inputs}
    rows = {}

    rows["torch fp32 (eager)"] = torch_row(source.folder, specs, inputs, plain_inputs, args.runs)
    print(rows, flush=True)
    gc.collect()

    for entry in args.sets:
        name, precision = entry.split(":")
        backend = get_target(name)
        runners = {}
        for component in COMPONENTS:
            spec = specs[component]
            onnx = work / "onnx" / component / "model.onnx"
            dest = work / f"{name}-{precision}" / component
            static = static_shapes(spec, {"batch": [1, 1], "height": [args.size] * 2, "width": [args.size] * 2}, True)
            began = time.perf_counter()
            artifact = backend.compile(onnx, precision, None, dest, CompileContext(spec, static, probe_size=(64, 64)))
            print(f"    compiled {component} for {entry} in {time.perf_counter() - began:.0f} s", flush=True)
            runners[component] = backend.load(artifact, None, precision)

        def controlled(r=runners) -> None:
            residuals = r["controlnet"].run(inputs)
            r["controlled_unet"].run(plain_inputs | residuals)

        rows[entry] = timed_pair(lambda r=runners: r["unet"].run(plain_inputs), controlled, args.runs)
        print(entry, rows[entry], flush=True)
        del runners, controlled  # the function's default argument holds the sessions too
        gc.collect()

    sizes = {c: sum(p.stat().st_size for p in (work / "onnx" / c).iterdir()) for c in COMPONENTS}
    summary = {"date": date.today().isoformat(), "cpu": describe(cpu_facts()), "model": args.model, "size": args.size,
               "batch": 2, "runs": args.runs, "onnx_bytes": sizes,
               "rows": {k: {"plain_s": round(a, 3), "controlled_s": round(b, 3), "ratio": round(b / a, 2)}
                        for k, (a, b) in rows.items()}}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
