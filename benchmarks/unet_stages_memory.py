"""Peak memory and wall time of each stage a full-size build runs on a UNet export, one stage per child process,
through the build's own target functions: ONNX Runtime INT8 (weights-less preparation, calibration, quantize_static),
OpenVINO BF16 conversion, OpenVINO int8-hybrid (`matmuls = "w8a8"` and `"w8"`), an ONNX Runtime FP32 session
(load, two runs, CPU arena off as in the 24 GiB recipes), an OpenVINO BF16 compiled model (load, two runs), and the
PyTorch FP32 pipeline as validation's baseline holds it (one guided 2-step generation, VAE decode included).

For a model too large to build end to end in one session here (`sdxl-arch` at 1024x1024), this says which stage
sets the build's peak. Calibration uses the recipe's count of calls (8) with random inputs of the right shapes and
timesteps spread over the schedule: the memory of a stage depends on shapes, not on values.

    python benchmarks/unet_stages_memory.py --export out/onnx-xl --model-folder <diffusers folder> --size 1024
        [--stages ort-int8 ov-bf16 ov-int8-hybrid-w8 ...] [--samples 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from peak_memory import PeakRss

STAGES = ("ort-int8", "ov-bf16", "ov-int8-hybrid-w8", "ov-int8-hybrid-w8a8", "ort-fp32-session", "ov-bf16-session",
          "torch-pipeline")


def unet_spec(model_folder: Path) -> Any:
    from diffship.models.components import component_specs

    return next(s for s in component_specs(model_folder) if s.is_denoiser)


def calls(spec: Any, size: int, samples: int) -> list[dict]:
    """`samples` UNet calls at batch 2 (guided), timesteps from 999 down."""
    out = []
    for i in range(samples):
        call = spec.sample_inputs(2, size, size, seed=i)
        call["timestep"] = call["timestep"] * 0 + 999.0 * (1 - i / max(samples - 1, 1))
        out.append(call)
    return out


def run_stage(stage: str, export: Path, model_folder: Path, size: int, samples: int, ov_options: dict) -> dict:
    """One stage as the build runs it; its peak RSS (this process), seconds and artifact bytes."""
    from diffship.host.memory import release_freed
    from diffship.targets import CompileContext
    from diffship.targets.calibration import CalibrationData

    spec = unet_spec(model_folder)
    source = export / "unet" / "model.onnx"
    data = calls(spec, size, samples)
    context = CompileContext(spec=spec, calibration=lambda: CalibrationData(inputs={"unet": data}),
                             probe_size=(size, size), guided=True, say=print)
    with tempfile.TemporaryDirectory(dir=export) as tmp:
        dest = Path(tmp) / "unet"
        if stage == "ov-bf16-session":  # its IR is made before the stage's peak is sampled (that is ov-bf16's)
            from diffship.targets import openvino as ov_target

            ov_target.compile(source, "bf16", ov_target.OvOptions(), dest, context)
            release_freed()
        peak = PeakRss().start()
        began = time.perf_counter()
        if stage == "ort-int8":
            from diffship.targets import onnxruntime as ort_target

            artifact = ort_target.compile(source, "int8", ort_target.OrtOptions(), dest, context)
        elif stage.startswith("ov-") and not stage.endswith("session"):
            from diffship.targets import openvino as ov_target

            precision, _, matmuls = stage.removeprefix("ov-").partition("-w")
            options = ov_target.OvOptions(matmuls=f"w{matmuls}" if matmuls else "w8a8", **ov_options)
            artifact = ov_target.compile(source, precision, options, dest, context)
        elif stage == "torch-pipeline":  # the baseline as validation holds it: one guided 2-step generation
            from diffship.validation.baseline import load_baseline, run_baseline

            artifact = source
            pipe = load_baseline(model_folder)
            run_baseline(pipe, "a photograph of an astronaut riding a horse", None, size, size, 2, 5.0, 0, None)
            del pipe
            release_freed()
        else:
            artifact = source
            runner = _session(stage, export, dest)
            for _ in range(2):
                runner.run(data[0])
            del runner
            release_freed()
        size_bytes = sum(f.stat().st_size for f in Path(artifact).parent.iterdir() if f.is_file())
    peak.stop()
    return {"stage": stage, "peak_bytes": peak.bytes, "seconds": time.perf_counter() - began, "bytes": size_bytes}


def _session(stage: str, export: Path, dest: Path) -> Any:
    if stage == "ort-fp32-session":
        from diffship.targets import onnxruntime as ort_target

        return ort_target.load(export / "unet" / "model.onnx", ort_target.OrtOptions(cpu_mem_arena=False), "fp32")
    from diffship.targets import openvino as ov_target

    return ov_target.load(dest / ov_target.XML, ov_target.OvOptions(cache_dir=""), "bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, required=True, help="a `diffship export` folder with unet/model.onnx")
    parser.add_argument("--model-folder", type=Path, required=True, help="the diffusers folder it was exported from")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--ov-options", default="{}", help='OpenVINO options as JSON, e.g. {"activations": "convolutions"}')
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print("RESULT " + json.dumps(run_stage(args.stage, args.export.resolve(), args.model_folder, args.size,
                                                 args.samples, json.loads(args.ov_options))), flush=True)
        return
    from diffship.host.cpu import describe

    print(f"{describe()}; UNet of {args.model_folder.name} at {args.size}x{args.size}, batch 2, {args.samples} calls")
    for stage in args.stages:
        run = subprocess.run([sys.executable, __file__, "--export", str(args.export), "--model-folder",
                              str(args.model_folder), "--size", str(args.size), "--samples", str(args.samples),
                              "--ov-options", args.ov_options, "--stage", stage], capture_output=True, text=True)
        result = next((json.loads(line[7:]) for line in run.stdout.splitlines() if line.startswith("RESULT ")), None)
        if run.returncode or result is None:
            print(f"{stage:22s} failed (exit {run.returncode}): {run.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        print(f"{stage:22s} peak {result['peak_bytes'] / 2**30:6.2f} GiB  {result['seconds']:7.1f} s  "
              f"artifact {result['bytes'] / 2**30:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
