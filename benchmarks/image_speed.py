"""The whole image as a user waits for it (text encoders, every step, decode): a build's recommended set and
accelerations against PyTorch FP32 eager and PyTorch BF16, taking turns in one run, p50 and fastest call, with the
image's PSNR / SSIM against FP32's and where each side's time goes.

    python benchmarks/image_speed.py BUILD [--runs 5] [--all] [--json FILE]

BUILD is a `diffship build` folder whose recipe measured accelerations (`make bench-image` builds sd15-arch at
512x512, 20 steps with benchmarks/recipes/sd15-accelerated.toml, then runs this). Rows: the recommended set with its
accelerations and without them; `--all` adds every row the build measured.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from diffship.accelerations import Accelerations
from diffship.host.cpu import describe
from diffship.runtime.pipeline import DeployedPipeline
from diffship.validation import latency
from diffship.validation.baseline import Baseline
from diffship.validation.e2e import Sample, compare_images, sample_latents
from diffship.validation.reference import LiveReference


def rows_to_time(build: Path, every: bool) -> list[tuple[str, str, Accelerations]]:
    """(set key, label, accelerations) of the rows to time: the recommended one and its set's own loop, or all."""
    manifest = json.loads((build / "manifest.json").read_text())
    report = json.loads((build / manifest["report"]["json"]).read_text())
    best = manifest.get("recommended")
    if best is None:
        raise SystemExit(f"{build}'s manifest has no recommended set: build it with [accelerations] in the recipe.")
    chosen = [(best["set"], "none", Accelerations()), (best["set"], best["label"],
                                                      Accelerations.model_validate(best["accelerations"]))]
    if every:
        chosen = [(key, row["accelerations"], Accelerations.model_validate(row["settings"]))
                  for key, r in report["sets"].items() for row in r.get("accelerations", {}).get("rows", [])]
    return list(dict.fromkeys(chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--all", action="store_true", help="Time every set x accelerations the build measured.")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    manifest = json.loads((args.build / "manifest.json").read_text())
    recipe, folder = manifest["recipe"], Path(manifest["source"]["folder"])
    v = recipe["validation"]
    rows = rows_to_time(args.build, args.all)
    baseline = Baseline(folder, False, print, v.get("scheduler"), v.get("scheduler_config") or {})
    reference = LiveReference(baseline.get(), folder, SimpleNamespace(inputs=None))  # text-to-image: no task inputs
    sets = manifest["artifacts"]
    pipes = {key: DeployedPipeline.load(args.build, sets[key]["target"], sets[key]["precision"])
             for key in dict.fromkeys(k for k, _, _ in rows)}
    first = next(iter(pipes.values()))
    height, width = v.get("height") or first.native_resolution[0], v.get("width") or first.native_resolution[1]
    s = Sample(v["prompts"][0], v["seeds"][0], v.get("negative_prompt"), height, width, v["steps"], v["guidance_scale"])
    latents = sample_latents(s, first)
    images: dict[str, Any] = {}
    timings: dict[str, list[dict[str, Any]]] = {}

    def call(name: str, run: Any) -> Any:
        def go() -> None:
            generation = run()
            images[name] = generation.images[0]
            timings.setdefault(name, []).append(generation.timings)
        return go

    calls = {"PyTorch FP32 eager": call("PyTorch FP32 eager", lambda: reference.generation(s, latents)),
             "PyTorch BF16": call("PyTorch BF16", lambda: reference.bf16_generation(s, latents))}
    for key, label, accelerations in rows:
        pipe = pipes[key]
        pipe.load_accelerations(accelerations)
        calls[f"{key} {label}"] = call(f"{key} {label}", lambda p=pipe, a=accelerations: p(
            s.prompt, s.negative_prompt, height, width, s.steps, s.guidance_scale, s.seed, latents=latents,
            accelerations=a))
    print(f"Timing {len(calls)} pipelines in turns: 1 warm-up + {args.runs} runs each ({height}x{width}, {s.steps} steps)")
    times = latency.interleaved(calls, 1, args.runs)
    fp32, bf16 = latency.summarize(times["PyTorch FP32 eager"]), latency.summarize(times["PyTorch BF16"])
    figures = {"model": manifest["source"]["model"], "cpu": describe(), "date": str(date.today()),
               "size": [height, width], "steps": s.steps, "runs": args.runs, "rows": {}}
    print(f"\n{figures['model']}, {figures['cpu']}, {figures['date']}")
    print(f"{'':64} {'p50':>8} {'fastest':>8} {'vs FP32 p50/fastest':>20} {'vs BF16':>8} {'PSNR':>8} {'SSIM':>7}")
    for name, t in times.items():
        mine = latency.summarize(t)
        quality = compare_images(images["PyTorch FP32 eager"], images[name])
        parts = split(timings[name][-args.runs:])
        figures["rows"][name] = {"time": mine, "speedup": fp32["p50_s"] / mine["p50_s"],
                                 "speedup_fastest": fp32["min_s"] / mine["min_s"],
                                 "speedup_vs_bf16": bf16["p50_s"] / mine["p50_s"], "quality": quality, "split": parts}
        psnr = "same" if quality["identical"] else f"{quality['psnr_db']:.1f}"
        print(f"{name:64} {mine['p50_s']:7.2f}s {mine['min_s']:7.2f}s "
              f"{fp32['p50_s'] / mine['p50_s']:9.2f}x /{fp32['min_s'] / mine['min_s']:6.2f}x "
              f"{bf16['p50_s'] / mine['p50_s']:7.2f}x {psnr:>8} {quality['ssim']:7.4f}")
        print(f"{'':64} where it goes (medians): " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))


def split(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The medians of a side's text encoding, denoising steps and decode (diffusers' side: the steps its callback
    sees, which leave out the first)."""
    import numpy as np

    keys = [k for k in ("text_encode", "decode") if all(k in r for r in runs)]
    parts = {k: float(np.median([r[k] for r in runs])) for k in keys}
    parts["steps"] = float(np.median([sum(r["steps"]) for r in runs]))
    parts["total"] = float(np.median([r["total"] for r in runs]))
    return parts


if __name__ == "__main__":
    main()
