"""TensorRT on an NVIDIA GPU: the UNet step as FP16 and INT8 (and FP8 where the GPU has it) engines against
PyTorch FP16 eager, in one process: engine build time, step latency (median of synchronised calls), parity.

    python benchmarks/gpu_tensorrt_unet.py [--model sd15-arch] [--size 512] [--batch 2] [--fp8]

Needs TensorRT (`pip install 'diffship[tensorrt]'`, or docker/Dockerfile.tensorrt) and a CUDA GPU. The UNet
runs with guidance, so the engines see twice `--batch`; INT8 and FP8 are calibrated on real captured inputs
from a short PyTorch generation of the calibration prompts. Engines are static (one shape), as deployed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffship.exporters.onnx import export_component
from diffship.models.components import component_specs, wrap
from diffship.models.loading import load_component
from diffship.models.source import resolve
from diffship.recipe import DEFAULT_CALIBRATION_PROMPTS
from diffship.stages.compile import static_shapes
from diffship.targets import CompileContext, tensorrt
from diffship.validation.baseline import load_baseline
from diffship.validation.capture import capture


def _p50(call, repeats: int) -> float:
    call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd15-arch")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2, help="images per call; the guided UNet sees twice this")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--fp8", action="store_true", help="also build FP8 (compute capability 8.9 or more)")
    args = parser.parse_args()
    env = tensorrt.environment()  # fails with what to install when TensorRT or a GPU is missing
    folder = resolve(args.model).folder
    spec = next(s for s in component_specs(folder) if s.name == "unet")
    fixed = {"batch": [args.batch, args.batch], "height": [args.size, args.size], "width": [args.size, args.size]}
    static = static_shapes(spec, fixed, guidance=True)
    call = spec.sample_inputs(2 * args.batch, args.size, args.size)
    pipe = load_baseline(folder, device="cuda", dtype=torch.float16)
    captured = capture(pipe, list(DEFAULT_CALIBRATION_PROMPTS[:4]), 16, 8, args.size, args.size, 7.5)
    eager = wrap(spec, pipe.unet)
    inputs = [torch.from_numpy(call[t.name]).cuda() for t in spec.inputs]
    inputs = [x.half() if x.is_floating_point() else x for x in inputs]
    with torch.inference_mode():
        reference = eager(*inputs)[0].float().cpu().numpy().ravel()
    rows = [("PyTorch FP16 eager", None, _p50(lambda: eager(*inputs), args.repeats), 1.0)]
    with tempfile.TemporaryDirectory() as tmp:
        onnx = export_component(spec, wrap(spec, load_component(folder, "unet")), Path(tmp) / "onnx")
        context = CompileContext(spec, static, lambda: captured, "sd",
                                 (args.size, args.size), fixed, (args.size, args.size), True, folder)
        for precision in ("fp16", "int8", *(("fp8",) if args.fp8 else ())):
            began = time.perf_counter()
            plan = tensorrt.compile(onnx, precision, tensorrt.TrtOptions(), Path(tmp) / precision, context)
            built = time.perf_counter() - began
            runner = tensorrt.load(plan, precision=precision)
            feed = {n: torch.from_numpy(v) for n, v in call.items()}
            out = runner.run(call)["out_sample"].ravel().astype(np.float64)
            cosine = float(out @ reference / np.linalg.norm(out) / np.linalg.norm(reference))
            rows.append((f"TensorRT {precision}", built, _p50(lambda r=runner, f=feed: r.run_torch(f), args.repeats),
                         cosine))
    print(f"\n{args.model} UNet step, {2 * args.batch} rows (batch {args.batch} guided), {args.size}x{args.size}, "
          f"{env['gpu']}, TensorRT {env['tensorrt']}, CUDA {env['cuda']}, torch {torch.__version__}")
    print("| variant | engine build s | p50 ms | vs PyTorch FP16 | cosine vs PyTorch FP16 |\n|---|---:|---:|---:|---:|")
    for name, built, seconds, cosine in rows:
        print(f"| {name} | {'' if built is None else f'{built:.0f}'} | {seconds * 1000:.1f} | "
              f"{rows[0][2] / seconds:.2f}x | {cosine:.5f} |")


if __name__ == "__main__":
    main()
