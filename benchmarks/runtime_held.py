"""What a deployed set's runtime holds per component, against `lazy_runners.held_bytes`, the estimate that decides
whether a set loads whole: each component loaded alone in a fresh process, then called once at the recipe's validation
size (OpenVINO's CPU plugin repacks its weights at the first call), with the anonymous and file-backed resident memory
after each and the call's peak beyond what stays held (its activations).

    python benchmarks/runtime_held.py BUILD --set openvino-bf16 [--components transformer,vae_decoder] [--whole]

--whole loads the set as a deployed pipeline does (whole, or one component at a time where it does not fit) and calls
each component once in turn, with and without OpenVINO's release of the last model's activation buffers
(`targets/openvino.SCRATCH_SHARE`), each in a fresh process: the anonymous memory after each call.

BUILD is a finished `diffship build` folder. Issue 45's tenth start loaded sd35m-arch's OpenVINO BF16 set whole because
its files sat under the share, and the 1024x1024 VAE decoder's parity was killed by the 20 GiB cgroup beside it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path
from typing import Any

GIB = 2**30


def resident() -> dict[str, int]:
    """This process's anonymous and file-backed resident bytes, and its peak resident bytes (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile", "VmHWM")}


def measure(build: str, set_name: str, name: str) -> dict[str, Any]:
    """One component alone: what its load holds, and its call's peak beyond that."""
    from diffship.models.components import component_specs
    from diffship.runtime.lazy_runners import held_bytes
    from diffship.store.manifest import open_artifacts
    from diffship.targets import get_target

    manifest = json.loads((Path(build) / "manifest.json").read_text())
    chosen = manifest["artifacts"][set_name]
    artifacts = open_artifacts(Path(build), chosen["target"], chosen["precision"])
    v = manifest["recipe"]["validation"]
    height, width = v.get("height") or 512, v.get("width") or 512
    spec = {s.name: s for s in component_specs(Path(manifest["source"]["folder"]))}[name]
    inputs = spec.sample_inputs(1, height, width)
    backend, artifact = get_target(artifacts.target), artifacts.components[name]
    options = backend.parse_options(artifacts.options) if artifacts.options else None
    before = resident()
    started = time.perf_counter()
    runner = backend.load(artifact, options, artifacts.precision)
    loaded, load_s = resident(), time.perf_counter() - started
    runner.run({k: v for k, v in inputs.items() if k in runner.input_names})
    after = resident()
    return {"component": name, "estimate": held_bytes(artifact), "loaded": loaded["RssAnon"] - before["RssAnon"],
            "anon": after["RssAnon"] - before["RssAnon"], "file": after["RssFile"] - before["RssFile"],
            "load_s": load_s, "call_peak": after["VmHWM"] - after["RssAnon"] - after["RssFile"]}


def whole(build: str, set_name: str, release: bool) -> list[tuple[str, int]]:
    """The set loaded as a deployed pipeline, each component called once at the validation size: anonymous bytes
    after each call, and this process's peak resident bytes last."""
    from diffship.models.components import component_specs
    from diffship.runtime.pipeline import DeployedPipeline
    from diffship.store.manifest import open_artifacts
    from diffship.targets import openvino

    if not release:
        openvino.SCRATCH_SHARE = float("inf")
    manifest = json.loads((Path(build) / "manifest.json").read_text())
    chosen = manifest["artifacts"][set_name]
    deployed = DeployedPipeline.from_artifacts(open_artifacts(Path(build), chosen["target"], chosen["precision"]))
    v = manifest["recipe"]["validation"]
    specs = {s.name: s for s in component_specs(Path(manifest["source"]["folder"]))}
    rows = []
    for name, runner in deployed.runners.items():
        inputs = specs[name].sample_inputs(1, v.get("height") or 512, v.get("width") or 512)
        runner.run({k: x for k, x in inputs.items() if k in runner.input_names})
        rows.append((name, resident()["RssAnon"]))
    return [*rows, ("peak resident", resident()["VmHWM"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", type=Path)
    parser.add_argument("--set", default="openvino-bf16")
    parser.add_argument("--components")
    parser.add_argument("--whole", action="store_true")
    args = parser.parse_args()
    from diffship.host.cpu import describe

    manifest = json.loads((args.build / "manifest.json").read_text())
    names = args.components.split(",") if args.components else list(manifest["artifacts"][args.set]["components"])
    print(f"{args.build.name}, {args.set}; {describe()}; {time.strftime('%Y-%m-%d')}")
    context = multiprocessing.get_context("spawn")
    if args.whole:
        for release in (False, True):
            with context.Pool(1) as pool:
                rows = pool.apply(whole, (str(args.build), args.set, release))
            print(f"  as deployed, {'releasing' if release else 'keeping'} the last model's buffers: "
                  + ", ".join(f"{name} {value / GIB:.2f}" for name, value in rows) + " GiB")
        return
    print(f"  {'component':<16} {'estimate':>9} {'loaded':>9} {'anon':>9} {'file':>9} {'call peak':>10}  (GiB: anonymous "
          "after the load; anonymous and file-backed after one call, where a CPU plugin has repacked its weights; the "
          "call's peak resident beyond them)")
    for name in names:
        with context.Pool(1) as pool:  # a fresh process: nothing an earlier component left
            row = pool.apply(measure, (str(args.build), args.set, name))
        print(f"  {name:<16} {row['estimate'] / GIB:9.2f} {row['loaded'] / GIB:9.2f} {row['anon'] / GIB:9.2f} "
              f"{row['file'] / GIB:9.2f} "
              f"{row['call_peak'] / GIB:10.2f}  load {row['load_s']:.0f} s")


if __name__ == "__main__":
    main()
