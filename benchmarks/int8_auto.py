"""`int8-auto` on full-size SD 1.5-shaped pipelines it was not tuned on: `sd15-arch` and the same architecture with
other random weights, each through `diffship build` with OpenVINO and ONNX Runtime int8-auto beside PyTorch BF16.

For each model and set it prints the UNet speedup over PyTorch FP32 eager (measured by the build's own interleaved
latency runs, in the same process), the worst UNet cosine on the real 20-step trajectory, the layers kept in float
and the search's time, with the CPU model and instruction sets read from the system (`diffship.host.cpu`).

    python benchmarks/int8_auto.py [--recipe benchmarks/recipes/sd15-int8-auto.toml] [--out out/bench-int8-auto]
                                   [--seed 7] [--model sd15-arch] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from dataclasses import replace
from datetime import date
from pathlib import Path

import psutil
from build_matrix import run_group

from diffship.host.cpu import cpu_facts, describe

HERE = Path(__file__).parent
GROUP = "openvino:int8-auto,onnxruntime:int8-auto,torch:bf16"


def other_seed(out: Path, seed: int) -> Path:
    """`sd15-arch` with another seed, written once as a diffusers folder."""
    from diffship.models.builtin import BUILTINS, write_builtin

    folder = out / f"sd15-arch-seed{seed}"
    if not (folder / "model_index.json").is_file():
        write_builtin(replace(BUILTINS["sd15-arch"], name=folder.name, seed=seed), folder)
    return folder


def figures(out: Path) -> dict[str, dict]:
    """Per set: UNet speedup over the baseline, real-step cosine, what the search kept and how long it took."""
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / manifest["report"]["json"]).read_text())
    rows = {}
    for key, r in report["sets"].items():
        unet = ((r.get("latency") or {}).get("components") or {}).get("unet")
        search = ((r.get("runtime") or {}).get("unet") or {}).get("search") or {}
        rows[key] = {"passed": r["passed"],
                     "unet_speedup_vs_pytorch_fp32": unet["baseline"]["p50_s"] / unet["target"]["p50_s"] if unet else None,
                     # each side's fastest call: the uncontended ratio on a shared host (benchmarks/host_noise.py)
                     "unet_speedup_fastest_calls": unet["baseline"]["min_s"] / unet["target"]["min_s"] if unet else None,
                     "unet_step_in_pipeline_speedup": _step_speedup(r),
                     "unet_real_steps_min_cosine": ((r.get("parity") or {}).get("denoiser_steps") or {}).get("min_cosine"),
                     "min_psnr_db": (r.get("e2e") or {}).get("min_psnr_db"),
                     "computes_in": ((r.get("runtime") or {}).get("unet") or {}).get("summary"),
                     "kept_in_float": [k["layer"] for k in search.get("kept_in_float", [])],
                     "fell_back": search.get("fell_back"), "search_seconds": search.get("seconds"),
                     "candidates": len(search.get("candidates", []))}
    return rows


def _step_speedup(report_set: dict) -> float | None:
    """The median denoising step of the whole pipeline, PyTorch FP32 over the set (a UNet call on real inputs,
    20 per side, so less exposed to this machine's run-to-run noise than the 3 timed component calls)."""
    pipeline = (report_set.get("latency") or {}).get("pipeline") or {}
    base, target = (pipeline.get("baseline") or {}).get("step"), (pipeline.get("target") or {}).get("step")
    return base["p50_s"] / target["p50_s"] if base and target else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=HERE / "recipes" / "sd15-int8-auto.toml")
    parser.add_argument("--out", type=Path, default=Path("out/bench-int8-auto"))
    parser.add_argument("--seed", type=int, default=7, help="Seed of the second, unseen model.")
    parser.add_argument("--model", action="append", help="Only these models (sd15-arch, seed).")
    parser.add_argument("--targets", default=GROUP, help=f"The build's --targets (default {GROUP}).")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    models = {"sd15-arch": "sd15-arch", "seed": None}
    results = {}
    for label in args.model or list(models):
        model = models[label] or str(other_seed(args.out, args.seed).resolve())
        recipe = args.out / f"{label}.toml"
        recipe.write_text(args.recipe.read_text().replace('model = "sd15-arch"', f"model = {json.dumps(model)}"))
        run = run_group(recipe, args.targets, args.out / label, dict(os.environ))
        results[label] = {"model": model, "exit_code": run["exit_code"], "wall_seconds": run["wall_seconds"],
                          "peak_tree_rss_bytes": run["peak_tree_rss_bytes"], "stages": run["stages"],
                          "sets": figures(args.out / label) if (args.out / label / "manifest.json").is_file() else {}}
    facts = cpu_facts()
    print(f"\n{args.recipe.name}: {describe(facts)}, {psutil.virtual_memory().total / 2**30:.0f} GiB, {date.today()}")
    for label, r in results.items():
        print(f"\n{label} ({r['model']}): exit {r['exit_code']}, {r['wall_seconds']:.0f} s, peak "
              f"{r['peak_tree_rss_bytes'] / 2**30:.2f} GiB")
        for key, s in r["sets"].items():
            speedup, cosine = s["unet_speedup_vs_pytorch_fp32"], s["unet_real_steps_min_cosine"]
            step, fastest = s["unet_step_in_pipeline_speedup"], s["unet_speedup_fastest_calls"]
            search = "" if s["search_seconds"] is None else (
                f", kept in float {len(s['kept_in_float'])}, search {s['search_seconds']:.0f} s / {s['candidates']} "
                f"candidates{'; FELL BACK: ' + s['fell_back'] if s['fell_back'] else ''}")
            print(f"  {key:24} {'passed' if s['passed'] else 'FAILED':7} UNet {'-' if speedup is None else f'{speedup:.2f}x'}"
                  f" over PyTorch FP32 (fastest calls {'-' if fastest is None else f'{fastest:.2f}x'}; in-pipeline step "
                  f"{'-' if step is None else f'{step:.2f}x'}), "
                  f"real-step cosine {'-' if cosine is None else f'{cosine:.5f}'}, "
                  f"{s['computes_in']}{search}")
    if args.json:
        args.json.write_text(json.dumps({"recipe": str(args.recipe), "cpu": facts, "date": str(date.today()),
                                         "models": results}, indent=2))
    sys.exit(max((r["exit_code"] for r in results.values()), default=0))


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
