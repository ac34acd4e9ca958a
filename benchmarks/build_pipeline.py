"""Run `diffship build` on a full-size recipe and print ONNX Runtime vs PyTorch latency, measured in the same run.

The numbers come from the build's own latency harness (warm-up, then runs interleaved with the
PyTorch baseline), so they are exactly what a user's report shows. The cache is bypassed (`force`)
so every stage really runs; peak resident memory is the build process's.

    python benchmarks/build_pipeline.py [benchmarks/recipes/sd15-onnxruntime.toml] [--out out/bench-sd15]
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

from diffship.recipe import load_recipe
from diffship.stages.build import build
from diffship.validation.latency import peak_rss_bytes


def cpu_description() -> str:
    from diffship.host.cpu import describe

    return describe()


HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", type=Path, default=HERE / "recipes" / "sd15-onnxruntime.toml")
    parser.add_argument("--out", type=Path, default=Path("out/bench-sd15"))
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    started = time.perf_counter()
    result = build(recipe, args.out, force=True, say=lambda line: print(line, flush=True))
    seconds = time.perf_counter() - started
    print(f"\n{recipe.model}, {cpu_description()}, {date.today()}: "
          f"build {seconds:.0f} s, peak RSS {peak_rss_bytes() / 2**30:.2f} GiB")
    figures = {}
    for key, r in result.report["sets"].items():
        lat = r["latency"]
        print(f"\n{key} vs {result.report['baseline']['note']}")
        print(f"{'':34} {'baseline p50':>13} {'target p50':>11} {'speedup':>8}")
        for name, v in lat["components"].items():
            print(f"{name + ' (batch ' + str(v['batch']) + ')':34} {v['baseline']['p50_s']:12.3f}s {v['target']['p50_s']:10.3f}s "
                  f"{v['speedup']:7.2f}x")
        p = lat["pipeline"]
        if p["baseline"]["step"]:
            print(f"{'denoising step in the pipeline':34} {p['baseline']['step']['p50_s']:12.3f}s "
                  f"{p['target']['step']['p50_s']:10.3f}s {p['step_speedup']:7.2f}x")
        print(f"{'pipeline, ' + str(p['steps']) + ' steps':34} {p['baseline']['total']['p50_s']:12.3f}s "
              f"{p['target']['total']['p50_s']:10.3f}s {p['speedup']:7.2f}x")
        print(f"min PSNR {r['e2e']['min_psnr_db']} dB, min SSIM {r['e2e']['min_ssim']:.5f}, "
              f"max pixel diff {r['e2e']['max_abs_diff']}")
        figures[key] = {"latency": lat, "e2e": {k: v for k, v in r["e2e"].items() if k != "samples"},
                        "memory": r["memory"]}
    if args.json:
        args.json.write_text(json.dumps({"build_seconds": seconds, "peak_rss_bytes": peak_rss_bytes(), **figures}, indent=2))


if __name__ == "__main__":
    main()
