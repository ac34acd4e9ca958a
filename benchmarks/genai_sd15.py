"""OpenVINO GenAI on diffship's full-size OpenVINO int8-auto set: its image against diffship's runtime's, and its
time per denoising step against diffship's runtime on the same folder, measured in one run.

The set is `diffship build benchmarks/recipes/sd15-genai.toml` (sd15-arch at 512x512; cached after the first run),
whose validation already drew the first sample in GenAI and optimum-intel against diffusers. This script then runs
the sample in diffship's runtime, in GenAI (its own environment, `diffship clients install genai`, applying the
precision the set records) and in diffship's runtime again, so host noise shows as the spread of the two diffship
runs. Step times: diffship's are its pipeline's per-step timings, GenAI's its ImageGenerationPerfMetrics
iteration durations; the first step of each is left out (warm-up).

    python benchmarks/genai_sd15.py [--recipe benchmarks/recipes/sd15-genai.toml] [--out out/bench-genai]
                                    [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

from diffship.clients import GENAI, missing_reason
from diffship.clients.environments import run_jobs
from diffship.host.cpu import describe
from diffship.recipe import load_recipe
from diffship.runtime.pipeline import DeployedPipeline
from diffship.stages.build import build
from diffship.validation.e2e import compare_images

HERE = Path(__file__).parent


def _median_after_first(seconds: list[float]) -> float:
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=HERE / "recipes" / "sd15-genai.toml")
    parser.add_argument("--out", type=Path, default=Path("out/bench-genai"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if reason := missing_reason(GENAI):
        raise SystemExit(reason)

    recipe = load_recipe(args.recipe)
    result = build(recipe, args.out, say=print)
    key = next(k for k in result.report["sets"] if k.startswith("openvino-"))
    precision = key.split("-", 1)[1]
    v = recipe.validation
    size = v.height or 512
    clients = result.report["sets"][key].get("clients", {}).get("rows", [])

    runs: list[dict] = []

    def diffship_run() -> np.ndarray:
        pipe = DeployedPipeline.load(args.out, "openvino", precision)
        gen = pipe(v.prompts[0], None, size, size, steps=v.steps, guidance_scale=v.guidance_scale, seed=v.seeds[0])
        runs.append({"who": "diffship", "step_s": _median_after_first(gen.timings["steps"]),
                     "total_s": gen.timings["total"]})
        return gen.images[0]

    def genai_run(work: Path) -> np.ndarray:
        job = {"folder": str(args.out / key), "task": "text2img", "prompt": v.prompts[0], "negative_prompt": None,
               "seed": v.seeds[0], "steps": v.steps, "guidance": v.guidance_scale, "height": size, "width": size,
               "precision": "recorded", "out": str(work / "genai.npy")}
        [done] = run_jobs(GENAI, [job], work / "genai")
        if not done["ok"]:
            raise SystemExit(f"GenAI failed: {done['error']}")
        runs.append({"who": "genai", "step_s": _median_after_first(done["step_ms"]) / 1000,
                     "total_s": done["generate_ms"] / 1000, "version": done["version"],
                     "computes_in": done["computes_in"]})
        return np.load(work / "genai.npy")

    with tempfile.TemporaryDirectory() as tmp:
        first = diffship_run()
        genai = genai_run(Path(tmp))
        second = diffship_run()
    ours = [r["step_s"] for r in runs if r["who"] == "diffship"]
    theirs = next(r for r in runs if r["who"] == "genai")
    metrics = compare_images(first, genai)
    figures = {
        "date": date.today().isoformat(), "cpu": describe(), "model": recipe.model, "set": key, "size": size,
        "steps": v.steps, "runs": runs,
        "genai_vs_diffship_psnr_db": metrics["psnr_db"], "genai_vs_diffship_identical": metrics["identical"],
        "diffship_runs_identical": bool(np.array_equal(first, second)),
        "step_ratio_genai_over_diffship": theirs["step_s"] / statistics.mean(ours),
        "build_clients": [{k: r.get(k) for k in ("client", "status", "psnr_db", "version", "computes_in", "reason")}
                          for r in clients],
    }
    print(f"\n{recipe.model} {key} at {size}x{size}, {v.steps} steps, on {figures['cpu']}")
    for r in runs:
        print(f"  {r['who']:9s} {r['step_s'] * 1000:8.1f} ms per step (median after the first), "
              f"{r['total_s']:.2f} s per image")
    print(f"  GenAI / diffship time per step: {figures['step_ratio_genai_over_diffship']:.2f}x "
          f"(diffship's two runs: {ours[0] * 1000:.1f} and {ours[1] * 1000:.1f} ms)")
    psnr = "identical" if metrics["identical"] else f"{metrics['psnr_db']:.1f} dB"
    print(f"  GenAI's image against diffship's runtime's: {psnr}")
    for row in figures["build_clients"]:
        got = f"{row['psnr_db']:.1f} dB" if row.get("psnr_db") else row.get("reason") or row["status"]
        print(f"  build's clients step, {row['client']} against diffusers: {row['status']} ({got})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
