"""Shared by the UNet benchmarks: calibration inputs and one real denoising trajectory, captured in a child process.

The capture writes `calibration.npz` (the recipe-style calibration set) and `trajectory.npz` (the UNet's real inputs
at every step of a different prompt and seed, with PyTorch FP32's outputs) into the work folder; a later benchmark
on the same model and size reuses them.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

CAPTURE = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
from diffship.models.components import component_specs, run_torch, wrap
from diffship.models.source import resolve
from diffship.validation.capture import capture
from diffship.validation.baseline import load_baseline
model, work, samples, steps, size = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
folder = resolve(model).folder
pipe = load_baseline(folder)
began = time.perf_counter()
data = capture(pipe, ["a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse at dusk"],
               samples, steps, size, size)
seconds = time.perf_counter() - began
data.save(work / "calibration.npz")
trajectory = capture(pipe, ["a red bicycle leaning on a brick wall"], None, 4, size, size, seed=123, with_vae=False)
spec = next(s for s in component_specs(folder) if s.name == "unet")
unet = wrap(spec, pipe.unet)
outputs = [run_torch(unet, spec, call)["out_sample"] for call in trajectory.inputs["unet"]]
np.savez(work / "trajectory.npz", **{f"{i}/{k}": v for i, c in enumerate(trajectory.inputs["unet"]) for k, v in c.items()},
         **{f"out/{i}": o for i, o in enumerate(outputs)})
print(json.dumps({"seconds": seconds, "generations": data.info["generations"], "timesteps": trajectory.info["timesteps"],
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def child(code: str, *args: object) -> dict:
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def capture(model: str, work: Path, samples: int, steps: int, size: int, again: bool = False) -> dict:
    """Capture into `work` unless a capture with the same settings is there; the capture's time and memory."""
    stamp = work / "capture.json"
    settings = {"model": model, "samples": samples, "steps": steps, "size": size}
    if not again and stamp.is_file() and json.loads(stamp.read_text()).get("settings") == settings:
        return json.loads(stamp.read_text())["figures"] | {"reused": True}
    figures = child(CAPTURE, model, work, samples, steps, size)
    stamp.write_text(json.dumps({"settings": settings, "figures": figures}))
    return figures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every UNet benchmark shares: model, capture settings, timed runs, work folder, JSON output."""
    parser.add_argument("--model", default="sd15-arch")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("out/bench-unet"))
    parser.add_argument("--recapture", action="store_true", help="capture again even when the work folder has one")
    parser.add_argument("--json", type=Path)


def prepare(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """Export the UNet into the work folder if it is not there, capture (or reuse) the inputs; the model folder and
    the figures every benchmark starts its report with."""
    from diffship.exporters.pipeline import export_pipeline
    from diffship.models.source import resolve

    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.work / "onnx" / "unet" / "model.onnx").is_file():
        print("exporting the UNet to ONNX ...", flush=True)
        export_pipeline(resolve(args.model), args.work / "onnx", ["unet"], overwrite=True)
    print(f"capturing calibration ({args.samples} UNet calls, {args.steps}-step generations) and a trajectory ...",
          flush=True)
    return resolve(args.model).folder, {
        "model": args.model, "date": str(date.today()), "machine": platform.processor() or platform.machine(),
        "calibration": capture(args.model, args.work, args.samples, args.steps, args.size, args.recapture)}


def trajectory_and_pytorch(work: Path, folder: Path) -> tuple[Any, list[dict[str, Any]], Any]:
    """The captured trajectory, its per-step UNet inputs, and a zero-argument PyTorch FP32 UNet call on step 0."""
    import numpy as np
    import torch

    from diffship.models.components import component_specs, wrap
    from diffship.models.loading import load_component

    trajectory = np.load(work / "trajectory.npz")
    steps = len([k for k in trajectory.files if k.startswith("out/")])
    calls = [{k.split("/")[1]: trajectory[k] for k in trajectory.files if k.startswith(f"{i}/")} for i in range(steps)]
    spec = next(s for s in component_specs(folder) if s.name == "unet")
    unet = wrap(spec, load_component(folder, "unet"))
    inputs = [torch.from_numpy(calls[0][t.name]) for t in spec.inputs]

    def call() -> None:
        with torch.inference_mode():
            unet(*inputs)

    return trajectory, calls, call
