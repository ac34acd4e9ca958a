"""One UNet call at the build's full size (batch 2, guided) for PyTorch FP32 eager, PyTorch BF16 and each built artifact
set, in one run; with each side's cosine against PyTorch FP32 on real denoising steps.

The real steps are the build's own calibration capture (UNet inputs recorded from the PyTorch pipeline at the recipe's
steps). Each side runs in its own child process, one after the other, because an SDXL UNet in PyTorch FP32 and an
artifact set do not fit in 24 GiB together: the child loads its side, runs `--steps` real steps (the first doubles as
warm-up), then times `--runs` calls of the first step's inputs. PyTorch FP32 runs first and again last, so drift of
the machine over the run shows; ratios are against the mean of the two.

    python benchmarks/unet_speed.py --build out/bench-sdxl/onnxruntime \
        --calibration <cache>/artifacts/calibration/<key>/inputs.npz [--sets onnxruntime-fp32 ...] [--steps 2] [--runs 2]

Artifacts outside a build folder (a cache's compile entries) are named one by one instead, with the model folder the
PyTorch sides load; they run with their target's default options:

    python benchmarks/unet_speed.py --model-folder <cache>/models/sdxl-arch-r1 --calibration ... \
        --artifact onnxruntime-int8=<entry>/model.onnx --artifact openvino-bf16=<entry>/openvino_model.xml
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

TORCH_SIDES = ("torch-fp32", "torch-bf16")


def real_steps(calibration: Path, count: int) -> list[dict[str, np.ndarray]]:
    """`count` recorded UNet calls spread over the captured trajectories (first, last and between)."""
    from diffship.targets.calibration import CalibrationData

    calls = CalibrationData.load(calibration, {}).inputs["unet"]
    keep = np.linspace(0, len(calls) - 1, min(count, len(calls))).round().astype(int)
    return [calls[i] for i in keep]


def load_side(side: str, build: Path | None, model_folder: Path | None, artifact: Path | None) -> tuple[Any, Any]:
    """A function from named inputs to the UNet's output array, for one side; and the spec of the UNet."""
    import torch

    from diffship.models.components import component_specs, wrap
    from diffship.models.loading import load_component
    from diffship.store.manifest import open_artifacts, read_manifest
    from diffship.targets import get_target

    folder = model_folder or Path(read_manifest(build).source.folder)
    spec = next(s for s in component_specs(folder) if s.is_denoiser)
    if side in TORCH_SIDES:
        dtype = torch.bfloat16 if side == "torch-bf16" else torch.float32
        module = wrap(spec, load_component(folder, spec.module).to(dtype))

        def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
            args = [torch.from_numpy(np.ascontiguousarray(inputs[t.name])) for t in spec.inputs]
            args = [a.to(dtype) if a.is_floating_point() else a for a in args]
            with torch.inference_mode():
                out = module(*args)
            return (out[0] if isinstance(out, (tuple, list)) else out).float().numpy()

        return run, spec
    target, precision = side.split("-", 1)
    backend = get_target(target)
    if artifact is not None:
        runner = backend.load(artifact, None, precision)
    else:
        artifacts = open_artifacts(build, target, precision, verify=False)
        options = backend.parse_options(artifacts.options) if artifacts.options else None
        runner = backend.load(artifacts.components[spec.name], options, precision)
    return lambda inputs: next(iter(runner.run(inputs).values())).astype(np.float32), spec


def run_side(side: str, build: Path | None, model_folder: Path | None, artifact: Path | None, calibration: Path,
             steps: int, runs: int, out: Path) -> dict[str, Any]:
    """Load one side, run the real steps (saved to `out`), time `runs` calls; seconds and peak RSS."""
    from peak_memory import PeakRss

    peak = PeakRss().start()
    began = time.perf_counter()
    run, spec = load_side(side, build, model_folder, artifact)
    names = {t.name for t in spec.inputs}
    calls = [{k: v for k, v in c.items() if k in names} for c in real_steps(calibration, steps)]
    load_seconds = time.perf_counter() - began
    outputs = {f"step{i}": run(c) for i, c in enumerate(calls)}
    np.savez(out, **outputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(calls[0])
        times.append(time.perf_counter() - start)
    peak.stop()
    return {"side": side, "seconds": statistics.median(times), "times": times, "load_seconds": load_seconds,
            "peak_bytes": peak.bytes, "shape": list(calls[0]["sample"].shape)}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, help="a `diffship build` output folder")
    parser.add_argument("--model-folder", type=Path, help="the diffusers folder, with --artifact instead of --build")
    parser.add_argument("--artifact", action="append", default=[], metavar="TARGET-PRECISION=PATH",
                        help="one UNet artifact to time (repeatable), instead of a build's sets")
    parser.add_argument("--calibration", type=Path, required=True, help="the build's calibration capture (inputs.npz)")
    parser.add_argument("--sets", nargs="+", help="TARGET-PRECISION sets to time (default: every set of the build)")
    parser.add_argument("--steps", type=int, default=2, help="real denoising steps compared (the first warms up)")
    parser.add_argument("--runs", type=int, default=2, help="timed calls per side")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--outputs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if bad := [a for a in args.artifact if "=" not in a]:
        parser.error(f"--artifact takes TARGET-PRECISION=PATH, not {bad[0]!r}")
    named = dict(a.split("=", 1) for a in args.artifact)
    if (args.build is None) == (not named) or (named and args.model_folder is None):
        parser.error("give --build, or --model-folder with one --artifact or more")
    if args.side:
        artifact = Path(named[args.side]) if args.side in named else None
        result = run_side(args.side, args.build, args.model_folder, artifact, args.calibration, args.steps, args.runs,
                          args.outputs)
        print("RESULT " + json.dumps(result), flush=True)
        return
    from diffship.host.cpu import describe
    from diffship.store.manifest import read_manifest

    sets = list(named) if named else args.sets or list(read_manifest(args.build).sets())
    where = (["--model-folder", str(args.model_folder), *(f"--artifact={a}" for a in args.artifact)] if named
             else ["--build", str(args.build)])
    order = ["torch-fp32", "torch-bf16", *sets, "torch-fp32"]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, side in enumerate(order):
            out = Path(tmp) / f"{i}-{side}.npz"
            run = subprocess.run([sys.executable, __file__, *where, "--calibration",
                                  str(args.calibration), "--steps", str(args.steps), "--runs", str(args.runs),
                                  "--side", side, "--outputs", str(out)], capture_output=True, text=True)
            result = next((json.loads(line[7:]) for line in run.stdout.splitlines() if line.startswith("RESULT ")), None)
            if run.returncode or result is None:
                print(f"{side:28s} failed (exit {run.returncode}): {run.stderr.strip().splitlines()[-3:]}", flush=True)
                continue
            with np.load(out) as arrays:
                result["outputs"] = {k: arrays[k] for k in arrays.files}
            results.append(result)
            print(f"{side:28s} {result['seconds']:8.3f} s/call  (load {result['load_seconds']:.0f} s, peak "
                  f"{result['peak_bytes'] / 2**30:.2f} GiB)", flush=True)
    fp32 = [r for r in results if r["side"] == "torch-fp32"]
    if not fp32:
        sys.exit("PyTorch FP32 did not run: nothing to compare with.")
    base = statistics.mean(r["seconds"] for r in fp32)
    shape = "x".join(str(n) for n in results[0]["shape"])
    print(f"\nOne UNet call, latents {shape}, {describe()}, {date.today()}; PyTorch FP32 {base:.3f} s "
          f"(first {fp32[0]['seconds']:.3f}, last {fp32[-1]['seconds']:.3f})")
    print(f"{'side':28s} {'s/call':>8s} {'vs FP32':>8s} {'min cosine on real steps':>26s} {'peak GiB':>9s}")
    figures = []
    for r in results[1:-1] if len(fp32) > 1 else results[1:]:
        cos = min(cosine(r["outputs"][k], fp32[0]["outputs"][k]) for k in fp32[0]["outputs"])
        figures.append({"side": r["side"], "seconds": r["seconds"], "speedup": base / r["seconds"], "cosine": cos,
                        "peak_gib": r["peak_bytes"] / 2**30})
        print(f"{r['side']:28s} {r['seconds']:8.3f} {base / r['seconds']:7.2f}x {cos:26.6f} "
              f"{r['peak_bytes'] / 2**30:9.2f}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": describe(), "date": str(date.today()), "fp32_seconds": base,
                                         "sides": figures}, indent=2))


if __name__ == "__main__":
    main()
