"""The UNet's latency ratio (PyTorch FP32 against a built artifact) timed the two ways validation can: interleaved,
both sides loaded, and in blocks (baseline / target / baseline, each side loaded alone: staged validation). The two
methods take turns, `--repeats` times each, in one run; each repeat's ratio is printed, then each method's mean and
spread, so the difference between methods can be read against the run-to-run noise.

    python benchmarks/latency_methods.py --build out/bench-sd15-24gib/onnxruntime [--set onnxruntime-fp32]
                                         [--size 512] [--repeats 3] [--warmup 1] [--runs 4]
"""

from __future__ import annotations

import argparse
import gc
import statistics
from datetime import date
from pathlib import Path

import psutil
import torch

from diffship.host.cpu import describe
from diffship.models.components import component_specs
from diffship.models.loading import load_component
from diffship.store.manifest import open_artifacts, read_manifest
from diffship.targets import get_target
from diffship.validation import latency
from diffship.validation.baseline import module_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, required=True, help="A `diffship build` output folder.")
    parser.add_argument("--set", default="onnxruntime-fp32", help="TARGET-PRECISION of the set to time.")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()
    target, precision = args.set.split("-", 1)
    artifacts = open_artifacts(args.build, target, precision, verify=False)
    folder = Path(read_manifest(args.build).source.folder)
    spec = next(s for s in component_specs(folder) if s.name == "unet")
    backend = get_target(target)
    options = backend.parse_options(artifacts.options) if artifacts.options else None
    inputs = spec.sample_inputs(spec.batch_for(1, True), args.size, args.size)
    path = artifacts.components["unet"]

    def baseline() -> object:
        return module_call(load_component(folder, "unet"), spec, inputs, "cpu", torch.float32)

    def artifact() -> object:
        runner = backend.load(path, options, precision)
        return lambda: runner.run(inputs)

    ratios: dict[str, list[float]] = {"interleaved": [], "blocks": []}
    for repeat in range(args.repeats):
        sides = {"baseline": baseline(), "target": artifact()}
        times = latency.interleaved(sides, args.warmup, args.runs)
        del sides
        gc.collect()
        ratios["interleaved"].append(statistics.median(times["baseline"]) / statistics.median(times["target"]))
        times = latency.blocks({"baseline": baseline, "target": artifact}, args.warmup, args.runs)
        ratios["blocks"].append(statistics.median(times["baseline"]) / statistics.median(times["target"]))
        print(f"repeat {repeat + 1}: interleaved {ratios['interleaved'][-1]:.3f}x, blocks {ratios['blocks'][-1]:.3f}x",
              flush=True)
    print(f"\nUNet at {args.size}x{args.size}, batch {inputs['sample'].shape[0]}, PyTorch FP32 / {args.set}; "
          f"{describe()}, {psutil.cpu_count()} CPUs, {date.today()}")
    for method, values in ratios.items():
        spread = max(values) - min(values)
        print(f"  {method:12} mean {statistics.mean(values):.3f}x, range {min(values):.3f}-{max(values):.3f} "
              f"(spread {spread:.3f})")
    gap = statistics.mean(ratios["blocks"]) - statistics.mean(ratios["interleaved"])
    print(f"  blocks - interleaved: {gap:+.3f}x")


if __name__ == "__main__":
    main()
