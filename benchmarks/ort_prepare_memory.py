"""Peak memory of ONNX Runtime's graph preparation (transformer fusions, then polygraphy's constant folding) on a
UNet export: with its weights loaded (as `onnxruntime._prepare` does today) and with them left in the external data
file (the proto alone). Each variant in its own child process, run from the model's folder (the optimizer's checker
resolves external data relative to the working directory); both in this run. Prints the fusions, node count, time
and peak (VmHWM) of each.

    python benchmarks/ort_prepare_memory.py --onnx out/sd15/onnx/unet/model.onnx
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def prepare(onnx_file: str, with_weights: bool) -> None:
    """Fuse and fold the graph in this process; print a JSON line with what came out."""
    import onnx

    from diffship.targets import onnx_graph

    began = time.perf_counter()
    model = onnx_graph.load(Path(onnx_file)) if with_weights else onnx.load(onnx_file, load_external_data=False)
    fused, stats = onnx_graph.fuse(model, "denoiser", False)
    folded = onnx_graph.fold_constants(fused)
    peak_kib = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0])
    print(json.dumps({"fused": stats, "nodes": len(folded.graph.node), "seconds": round(time.perf_counter() - began, 1),
                      "peak_gib": round(peak_kib / 2**20, 2)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--variant", choices=["weights", "proto"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        prepare(args.onnx.name, args.variant == "weights")
        return
    path = args.onnx.resolve()
    results = {}
    for variant in ("weights", "proto"):
        run = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--onnx", str(path), "--variant", variant],
                             capture_output=True, text=True, check=True, cwd=path.parent)
        results[variant] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{variant:7s}: {results[variant]}", flush=True)
    same = results["weights"]["fused"] == results["proto"]["fused"] and \
        results["weights"]["nodes"] == results["proto"]["nodes"]
    print(f"same fusions and node count: {same}; peak proto / weights: "
          f"{results['proto']['peak_gib'] / results['weights']['peak_gib']:.2f}")


if __name__ == "__main__":
    main()
