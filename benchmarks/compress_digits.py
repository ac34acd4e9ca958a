"""Compression on digits-sd: what pruning, distillation and QAT buy in ONNX Runtime, and what they cost in quality.

Three parts, each measured against the unmodified model in the same run:
- `pruning`: channel pruning (30 %) + one attention head per layer + distillation; UNet step latency of the
  exported ONNX models in ONNX Runtime (CPU) at several batch sizes, and prompt accuracy per stage.
- `magnitude`: unstructured 50 % magnitude pruning; true non-zero count and its (lack of) effect on latency.
- `qat`: INT8 QDQ from Model Optimizer, calibrated only (PTQ) and after QAT, built for ONNX Runtime and OpenVINO
  with prompt accuracy measured on the artifacts; the targets' own INT8 (same calibration data) for reference.

    python benchmarks/compress_digits.py                      # everything (about 30 min on 2 cores)
    python benchmarks/compress_digits.py --parts magnitude    # one part
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffship.compress.steps import ChannelStep, DistillStep, HeadStep, MagnitudeStep  # noqa: E402
from diffship.compress.table import stage_table  # noqa: E402
from diffship.models.digits import prompt_for  # noqa: E402
from diffship.stages.compress_run import Settings, compress  # noqa: E402
from diffship.validation.report import markdown_table  # noqa: E402


def prompts() -> list[str]:
    """Every digit in three wordings: the captured denoising inputs distillation and calibration learn from."""
    return [prompt_for(d, t) for t in (0, 1, 4) for d in range(10)]


def export_unet(folder: Path, dest: Path) -> Path:
    from diffship.exporters.onnx import export_component
    from diffship.models.components import component_specs, wrap
    from diffship.models.loading import load_component

    spec = next(s for s in component_specs(folder) if s.name == "unet")
    return export_component(spec, wrap(spec, load_component(folder, "unet", allow_pickle=True)), dest)


def ort_latency(models: dict[str, Path], batches: list[int], threads: list[int], rounds: int, runs: int) -> list[dict[str, Any]]:
    """Median ms per UNet call of each model, interleaved call by call so drift hits every model alike."""
    import onnxruntime as ort

    from diffship.models.components import component_specs
    from diffship.models.source import resolve

    spec = next(s for s in component_specs(resolve("digits-sd").folder) if s.name == "unet")
    rows = []
    for n_threads in threads:
        options = ort.SessionOptions()
        options.intra_op_num_threads = n_threads
        sessions = {k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for k, p in models.items()}
        for batch in batches:
            feed = spec.sample_inputs(batch, 32, 32)
            times: dict[str, list[float]] = {k: [] for k in sessions}
            for s in sessions.values():
                for _ in range(5):
                    s.run(None, feed)
            for _ in range(rounds * runs):
                for k, s in sessions.items():
                    began = time.perf_counter()
                    s.run(None, feed)
                    times[k].append(time.perf_counter() - began)
            rows.append({"threads": n_threads, "batch": batch,
                         **{k: statistics.median(v) * 1000 for k, v in times.items()}})
    return rows


def print_latency(rows: list[dict[str, Any]], base: str, other: str) -> None:
    print(f"\n| threads | batch | {base} ms | {other} ms | speedup |\n|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['threads']} | {r['batch']} | {r[base]:.2f} | {r[other]:.2f} | {r[base] / r[other]:.2f}x |")


def print_stages(record: dict[str, Any]) -> None:
    title, columns, rows = stage_table(record)
    print(f"\n{title}\n" + "\n".join(markdown_table(columns, rows)))


def run_compress(steps: list[Any], work: Path, name: str, settings: Settings) -> tuple[dict[str, Any], Path]:
    from diffship.models.source import resolve

    dest = work / name
    if (dest / "compress.json").is_file():  # reuse a finished run (delete the folder to redo it)
        return json.loads((dest / "compress.json").read_text()), dest / "model"
    from diffship.store import cache

    # Checkpoints keyed by the steps and settings: an interrupted run resumes, a changed one starts over.
    checkpoints = work / f"{name}-checkpoints" / cache.key(steps=[s.model_dump() for s in steps], settings=settings.__dict__)
    record = compress(resolve("digits-sd").folder, "sd1", steps, settings, dest / "model", checkpoints,
                      quality=True, say=print)
    (dest / "compress.json").write_text(json.dumps(record, indent=1))
    return record, dest / "model"


def part_pruning(args: argparse.Namespace, settings: Settings, results: dict[str, Any]) -> None:
    from diffship.models.source import resolve

    steps = [ChannelStep(step="prune-channels", ratio=args.ratio), HeadStep(step="prune-heads", heads=1),
             DistillStep(step="distill", steps=args.distill_steps, batch=32, lr=1e-3, images=512, checkpoint_every=250)]
    record, folder = run_compress(steps, args.work, "pruned", settings)
    print_stages(record)
    models = {"original": export_unet(resolve("digits-sd").folder, args.work / "onnx-original"),
              "pruned": export_unet(folder, args.work / "onnx-pruned")}
    rows = ort_latency(models, args.batches, args.threads, args.rounds, args.runs)
    print_latency(rows, "original", "pruned")
    results["pruning"] = {"stages": record["stages"], "ort_latency": rows}


def part_magnitude(args: argparse.Namespace, settings: Settings, results: dict[str, Any]) -> None:
    from diffship.models.source import resolve

    record, folder = run_compress([MagnitudeStep(step="prune-magnitude", sparsity=0.5)], args.work, "magnitude", settings)
    print_stages(record)
    import onnx

    models = {"original": export_unet(resolve("digits-sd").folder, args.work / "onnx-original"),
              "magnitude": export_unet(folder, args.work / "onnx-magnitude")}
    graph = onnx.load(str(models["magnitude"]))
    values = np.concatenate([onnx.numpy_helper.to_array(t).ravel() for t in graph.graph.initializer
                             if t.data_type == onnx.TensorProto.FLOAT])
    print(f"\nexported ONNX: {values.size:,} float initializer values, {np.count_nonzero(values):,} non-zero")
    rows = ort_latency(models, args.batches, args.threads, args.rounds, args.runs)
    print_latency(rows, "original", "magnitude")
    results["magnitude"] = {"stages": record["stages"], "ort_latency": rows,
                            "onnx_values": int(values.size), "onnx_nonzero": int(np.count_nonzero(values))}


def part_qat(args: argparse.Namespace, settings: Settings, results: dict[str, Any]) -> None:
    from diffship.recipe import parse_recipe
    from diffship.stages.build import build

    base = {"model": "digits-sd",
            "calibration": {"prompts": settings.prompts, "steps": settings.denoise_steps, "samples": args.samples},
            "validation": {"prompts": ["a handwritten digit seven"], "seeds": [0], "latency": {"enabled": False},
                           "quality": {"seeds": args.seeds}}}
    fp32_targets = [{"name": "onnxruntime", "precisions": ["fp32"]}, {"name": "openvino", "precisions": ["fp32"]}]
    int8_targets = [{"name": "onnxruntime", "precisions": ["int8"]}, {"name": "openvino", "precisions": ["int8-hybrid"]}]
    runs = {"targets' own INT8 (PTQ)": {**base, "targets": int8_targets},
            "Model Optimizer INT8, calibrated only (PTQ)": {**base, "targets": fp32_targets,
                                                            "compress": [{"step": "qat", "steps": 0}]},
            f"Model Optimizer INT8 + QAT ({args.qat_steps} steps, lr {args.qat_lr:g})": {
                **base, "targets": fp32_targets,
                "compress": [{"step": "qat", "steps": args.qat_steps, "batch": 32, "lr": args.qat_lr, "images": 512}]}}
    table = {}
    for label, recipe in runs.items():
        print(f"\n== build: {label}")
        report = build(parse_recipe(recipe), args.work / f"build-{len(table)}", say=print).report
        for key, r in report["sets"].items():
            q = r["quality"]
            table[f"{label} / {key}"] = {"prompt_accuracy": q["prompt_accuracy"], "fd_digits": q["fd_digits"],
                                         "baseline": q["baseline_prompt_accuracy"], "parity": r["parity"]["passed"]}
        if "compress" in report:
            table[f"{label} / PyTorch fake-quant"] = {
                "prompt_accuracy": report["compress"]["stages"][-1]["quality"]["prompt_accuracy"],
                "fd_digits": report["compress"]["stages"][-1]["quality"]["fd_digits"]}
    print(f"\n| INT8 UNet / where it ran | prompt accuracy ({10 * len(args.seeds)} digits) | FD-digits |\n|---|---:|---:|")
    for k, v in table.items():
        print(f"| {k} | {v['prompt_accuracy']:.3f} | {v['fd_digits']:.1f} |")
    results["qat"] = table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["pruning", "magnitude", "qat"],
                        choices=["pruning", "magnitude", "qat"])
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench-compress")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--distill-steps", type=int, default=1500)
    parser.add_argument("--qat-steps", type=int, default=600)
    parser.add_argument("--qat-lr", type=float, default=1e-4)
    parser.add_argument("--samples", type=int, default=64, help="calibration UNet calls for the targets' own INT8")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    settings = Settings(prompts(), 20, 32, 32, 7.5, args.seeds, 20, 5.0)
    results: dict[str, Any] = {"settings": settings.__dict__}
    for part in args.parts:
        {"pruning": part_pruning, "magnitude": part_magnitude, "qat": part_qat}[part](args, settings, results)
    (args.work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\nresults: {args.work / 'results.json'}")


if __name__ == "__main__":
    main()
