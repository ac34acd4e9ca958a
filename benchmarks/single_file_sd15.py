"""A full-size single-file checkpoint through the shipped standard configuration: `sd15-arch` written in the
original (LDM / A1111) layout, given to diffship with no --model-config, must be detected as SD 1.x, converted
offline, and export to exactly the ONNX weights of `sd15-arch`'s own folder (initializer hashes, every component).

Prints the detection, conversion time and peak memory, and per component how many initializers match.

    python benchmarks/single_file_sd15.py [--work out/bench-single-file] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import sys
import time
from datetime import date
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ldm_checkpoint import write_ldm_checkpoint

from diffship.exporters.pipeline import export_pipeline
from diffship.host.cpu import cpu_facts, describe
from diffship.models.single_file import detect_config
from diffship.models.source import resolve

COMPONENTS = ["text_encoder", "unet", "vae_encoder", "vae_decoder"]


def digests(model: Path) -> dict[str, str]:
    """Initializer name -> sha256 of its values (external data loaded)."""
    graph = onnx.load(str(model)).graph
    return {i.name: hashlib.sha256(onnx.numpy_helper.to_array(i, base_dir=str(model.parent)).tobytes()).hexdigest()
            for i in graph.initializer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("out/bench-single-file"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folder = resolve("sd15-arch").folder
    checkpoint = args.work / "sd15-arch.safetensors"
    began = time.perf_counter()
    if not checkpoint.is_file():
        write_ldm_checkpoint(folder, checkpoint)
    written = time.perf_counter() - began
    config = detect_config(checkpoint)
    began = time.perf_counter()
    source = resolve(str(checkpoint), say=print)
    converted = time.perf_counter() - began
    results = {}
    for name, src in (("folder", resolve("sd15-arch")), ("single-file", source)):
        export_pipeline(src, args.work / f"onnx-{name}", COMPONENTS, overwrite=True,
                        on_step=lambda *a: print("   ", *a))
    for component in COMPONENTS:
        a = digests(args.work / "onnx-folder" / component / "model.onnx")
        b = digests(args.work / "onnx-single-file" / component / "model.onnx")
        same = sum(a[k] == b.get(k) for k in a)
        results[component] = {"initializers": len(a), "identical": same, "equal": a == b}
        print(f"{component}: {same} of {len(a)} initializers identical" + ("" if a == b else "  <-- DIFFERENT"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    summary = {"date": date.today().isoformat(), "cpu": describe(cpu_facts()), "checkpoint_bytes": checkpoint.stat().st_size,
               "detected": config, "write_seconds": round(written, 1), "convert_seconds": round(converted, 1),
               "peak_rss_gib": round(peak / 2**30, 2), "components": results,
               "passed": all(r["equal"] for r in results.values())}
    print(json.dumps({k: v for k, v in summary.items() if k != "components"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    raise SystemExit(0 if summary["passed"] else 1)


if __name__ == "__main__":
    main()
