"""Swap against rebuild: a LoRA brought into an existing `sd15-arch` build by `diffship lora apply` (weights patched
in place, patched components checked against the merged PyTorch ones) against `diffship build --lora` (merge,
export, compile, the build's full validation), both as a user runs them, in this run, on this machine.

Builds the base once (reused when its folder passed before), then times the swap and the rebuild, each in its own
process with the whole process tree's peak memory sampled (psutil, 0.25 s). The merged model folder the swap makes
is deleted from the cache before the rebuild, so both pay for the merge. Prints wall times, the ratio, peaks, and
whether the swapped files equal the rebuilt ones.

    python benchmarks/lora_swap.py --work /work/bench/swap [--targets onnxruntime:fp32] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from lora_files import kohya_lora

from diffship.host.cpu import cpu_facts, describe
from diffship.models.source import resolve

RECIPE = Path(__file__).parent / "recipes" / "sd15-onnxruntime.toml"


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def run(args: list[str], env: dict[str, str]) -> dict:
    """One diffship command in its own process: exit code, wall seconds, peak tree RSS."""
    print("\n$ diffship " + " ".join(args), flush=True)
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "diffship.cli", *args], env=env)
    proc, peak, done = psutil.Process(child.pid), {"bytes": 0}, threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            peak["bytes"] = max(peak["bytes"], tree_rss(proc))

    threading.Thread(target=sample, daemon=True).start()
    code = child.wait()
    done.set()
    return {"exit": code, "seconds": round(time.perf_counter() - started, 1), "peak_gib": round(peak["bytes"] / 2**30, 2)}


def files(manifest: Path) -> dict[str, str]:
    data = json.loads(manifest.read_text())
    return {f["path"]: f["sha256"] for s in data["artifacts"].values() for c in s["components"].values()
            for f in c["files"]}


def runtime_swap(base: Path, lora: Path, runs: int = 2) -> dict:
    """`generate --lora`'s cost: loading the base build's pipeline with and without the LoRA merged at load, and a
    UNet call of each (ONNX Runtime loses its NCHWc layout pass under initializer overrides)."""
    import gc

    from diffship.models.components import component_specs
    from diffship.models.lora import LoraSpec
    from diffship.runtime.pipeline import DeployedPipeline

    out = {}
    # Two rounds, alternating, the second one kept: the first load of each reads the files from disk cold.
    for label, loras in (("plain", None), ("with LoRA", [LoraSpec(lora, 0.8)])) * 2:
        began = time.perf_counter()
        pipe = DeployedPipeline.load(base, loras=loras)
        out[label] = {"load_s": round(time.perf_counter() - began, 1)}
        spec = next(s for s in component_specs(Path(json.loads((base / "manifest.json").read_text())["source"]["folder"]))
                    if s.name == "unet")
        inputs = spec.sample_inputs(2, 512, 512)
        pipe.runners["unet"].run(inputs)
        calls = []
        for _ in range(runs):
            t = time.perf_counter()
            pipe.runners["unet"].run(inputs)
            calls.append(time.perf_counter() - t)
        out[label]["unet_call_s"] = round(min(calls), 2)
        del pipe
        gc.collect()
        print(label, out[label], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("out/bench-lora-swap"))
    parser.add_argument("--targets", default="onnxruntime:fp32")
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--runtime", action="store_true", help="also time generate --lora's load and UNet call")
    parser.add_argument("--runtime-only", action="store_true", help="only that, on an existing base build")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DIFFSHIP_CACHE": os.environ.get("DIFFSHIP_CACHE", str(work / "cache"))}
    os.environ["DIFFSHIP_CACHE"] = env["DIFFSHIP_CACHE"]
    lora = work / "style-lora.safetensors"
    if not lora.is_file():
        kohya_lora(resolve("sd15-arch").folder, lora, rank=16, alpha=8.0)
    if args.runtime_only:
        print(json.dumps(runtime_swap(work / "base", lora), indent=1))
        return
    build = ["build", str(args.recipe), "--targets", args.targets]
    base = work / "base"
    results = {}
    if not (base / "manifest.json").is_file() or not json.loads((base / "manifest.json").read_text())["passed"]:
        results["base build"] = run([*build, "--out", str(base)], env)
    for folder in ("swapped", "rebuilt"):
        shutil.rmtree(work / folder, ignore_errors=True)
    results["lora apply"] = run(["lora", "apply", str(base), "--lora", f"{lora}:0.8", "--out", str(work / "swapped")],
                                env)
    for merged in (Path(env["DIFFSHIP_CACHE"]) / "models").glob("lora-*"):
        shutil.rmtree(merged)
    results["build --lora"] = run([*build, "--lora", f"{lora}:0.8", "--out", str(work / "rebuilt")], env)
    swapped, rebuilt = files(work / "swapped" / "manifest.json"), files(work / "rebuilt" / "manifest.json")
    differ = sorted(p for p, h in swapped.items() if rebuilt.get(p) != h and not p.endswith(".xml"))
    runtime = runtime_swap(base, lora) if args.runtime else None
    summary = {"date": date.today().isoformat(), "cpu": describe(cpu_facts()), "targets": args.targets,
               "runtime_lora": runtime,
               "runs": results, "rebuild_over_swap": round(results["build --lora"]["seconds"]
                                                           / results["lora apply"]["seconds"], 1),
               "files_differing_from_the_rebuild": differ}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
