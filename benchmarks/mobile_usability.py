"""onnxruntime's mobile usability check (NNAPI, Core ML) of a UNet export before and after the mobile target's rewrite.

Three rows per provider: the export as it is (dynamic shapes), the export with its shapes pinned, and the mobile
target's graph (pinned, then `mobile.rewrite`: host timestep embedding, folded shape logic, decomposed norms and erf).

    python benchmarks/mobile_usability.py --export out/build/onnx [--height 512 --width 512]
"""

from __future__ import annotations

import argparse
import tempfile
from datetime import date
from pathlib import Path

import onnx

from diffship.host.cpu import describe
from diffship.models.components import component_specs
from diffship.store.manifest import read_manifest
from diffship.targets import mobile, onnx_graph
from diffship.targets.mobile_check import usability
from diffship.targets.pinned import pin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, required=True, help="an export folder (a build's onnx/)")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    args = parser.parse_args()
    folder = Path(read_manifest(args.export).source.folder)
    spec = next(s for s in component_specs(folder) if s.is_denoiser)
    source = args.export / "unet" / "model.onnx"
    sizes = spec.axis_sizes(2, args.height, args.width)
    shapes = {t.name: t.concrete(sizes) for t in spec.inputs}
    rows = {"export, dynamic shapes": usability(source)}
    size = onnx_graph.weight_bytes(source)
    # The mobile target refuses a component over 2 GB (the ORT format's limit), and its rewrite's shape inference
    # cannot serialize one: the rewritten row is for models a phone can hold.
    variants = [("export, shapes pinned", False)] + ([("mobile target's graph", True)] if size < onnx_graph.TWO_GB else [])
    with tempfile.TemporaryDirectory(dir=args.export) as tmp:
        for label, rewrite in variants:
            model = onnx.load(str(source))
            pin(model, shapes)
            if rewrite:
                mobile.rewrite(model, source.parent / "config.json")
            path = Path(tmp) / label.split(",")[0].replace(" ", "-").replace("'", "") / "model.onnx"
            path.parent.mkdir()
            onnx.save(model, str(path), save_as_external_data=True, location="model.onnx_data")
            del model
            rows[label] = usability(path)
    print(f"UNet of {read_manifest(args.export).source.model} ({size / 1e9:.2f} GB) at batch 2, {args.height}x"
          f"{args.width}; {describe()}, {date.today()}")
    if size >= onnx_graph.TWO_GB:
        print("(over 2 GB: the mobile target refuses it, so there is no rewritten graph to check)")
    print("| graph | provider | nodes it takes | partitions | verdict | ops it lacks |\n|---|---|---:|---:|---|---|")
    for label, result in rows.items():
        for provider, u in result.items():
            print(f"| {label} | {provider} | {u['supported_nodes']} / {u['nodes']} ({u['share']:.1%}) | "
                  f"{u['partitions']} | {u['verdict']} | {', '.join(u['unsupported_ops'][:8]) or '-'} |")


if __name__ == "__main__":
    main()
