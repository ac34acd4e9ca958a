"""PyTorch on a CUDA GPU: the sd15-arch UNet step in FP32, FP16, BF16 and bitsandbytes INT8 / NF4.

Latency (median of CUDA-synchronised calls) and cosine against FP32 on the same input, in one process.

    python benchmarks/gpu_torch_precision.py [--model sd15-arch] [--size 512] [--batch 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffship.compress.quantize import bitsandbytes_denoiser
from diffship.models.components import component_specs
from diffship.models.loading import load_component
from diffship.models.source import resolve
from diffship.stages.compress_measure import denoiser_latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd15-arch")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("This benchmark needs a CUDA GPU.")
    folder = resolve(args.model).folder
    spec = next(s for s in component_specs(folder) if s.name == "unet")
    call = spec.sample_inputs(args.batch, args.size, args.size)
    inputs = {k: torch.from_numpy(v).cuda() for k, v in call.items()}
    rows = []
    reference = None
    base = load_component(folder, "unet").cuda()
    variants = [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)]
    for name, dtype in variants:
        unet = base.to(dtype)
        seconds = denoiser_latency(unet, call, args.repeats)
        with torch.inference_mode():
            out = unet(inputs["sample"].to(dtype), inputs["timestep"], inputs["encoder_hidden_states"].to(dtype)).sample
        out = out.float().flatten()
        reference = out if reference is None else reference
        rows.append((name, seconds, float(torch.nn.functional.cosine_similarity(out, reference, dim=0)),
                     unet.get_memory_footprint() / 2**30))
    del base, unet
    torch.cuda.empty_cache()
    for weights in ("int8", "nf4"):
        try:
            unet, _ = bitsandbytes_denoiser(folder, "unet", weights)
        except Exception as exc:  # report and go on: one missing kernel should not hide the other rows
            print(f"bitsandbytes {weights}: {type(exc).__name__}: {exc}")
            continue
        seconds = denoiser_latency(unet, call, args.repeats)
        with torch.inference_mode():
            out = unet(inputs["sample"].half(), inputs["timestep"], inputs["encoder_hidden_states"].half()).sample
        rows.append((f"bitsandbytes {weights} (fp16 compute)", seconds,
                     float(torch.nn.functional.cosine_similarity(out.float().flatten(), reference, dim=0)),
                     unet.get_memory_footprint() / 2**30))
        del unet
        torch.cuda.empty_cache()
    print(f"\n{args.model} UNet, batch {args.batch}, {args.size}x{args.size}, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}")
    print("| variant | p50 ms | vs fp32 | cosine vs fp32 | memory GiB |\n|---|---:|---:|---:|---:|")
    for name, seconds, cosine, memory in rows:
        print(f"| {name} | {seconds * 1000:.1f} | {rows[0][1] / seconds:.2f}x | {cosine:.5f} | {memory:.2f} |")


if __name__ == "__main__":
    main()
