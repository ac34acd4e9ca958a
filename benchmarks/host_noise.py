"""How much of a speed figure is the machine's: one OpenVINO UNet call back to back in a process of its own (no
PyTorch model loaded), with two fixed probes between calls: an FP32 matmul (AVX-512 FMA) and a BF16 matmul (AMX on a
Xeon with AMX, through oneDNN).

The probes are the same work every time, so when they slow down, the cores did: another guest on the physical
core's sibling hyperthread (AMX and the FMA units are per physical core). The correlation between the call's time
and the probes says how much of its spread comes from there.

    python benchmarks/host_noise.py IR.xml --inputs trajectory.npz [--seconds 200] [--json FILE]

`--inputs` is an .npz of one UNet call (`<i>/sample`, `<i>/timestep`, `<i>/encoder_hidden_states`, as
`benchmarks/unet_capture.py` writes); the first call in it is used.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import numpy as np
import openvino as ov
import torch

from diffship.host.cpu import cpu_facts, describe


def probe(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ir", type=Path)
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with np.load(args.inputs) as arrays:
        first = sorted({k.split("/")[0] for k in arrays.files}, key=int)[0]
        call = {k.split("/")[1]: arrays[k] for k in arrays.files if k.startswith(f"{first}/")}
    request = ov.Core().compile_model(str(args.ir), "CPU", {"PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
    a32, b32 = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    for _ in range(2):
        request.infer(call)
    rows = []
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        request.infer(call)
        rows.append((time.perf_counter() - started, probe(a32, b32, 20), probe(a16, b16, 40)))
        print("call {:.3f} s   fp32 probe {:.3f} s   bf16 probe {:.3f} s".format(*rows[-1]), flush=True)
    r = np.array(rows)
    summary = {"date": date.today().isoformat(), "cpu": describe(cpu_facts()), "calls": len(r),
               **{f"{name}_{stat}": round(float(fn(r[:, i])), 3) for i, name in enumerate(("call", "fp32_probe", "bf16_probe"))
                  for stat, fn in (("min", np.min), ("p50", np.median), ("max", np.max))},
               "corr_call_fp32_probe": round(float(np.corrcoef(r[:, 0], r[:, 1])[0, 1]), 2),
               "corr_call_bf16_probe": round(float(np.corrcoef(r[:, 0], r[:, 2])[0, 1]), 2)}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
