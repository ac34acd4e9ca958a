"""Staged validation's latency blocks at full size, each component alone: the baseline's PyTorch module, the set's
artifact, the module again (validation/latency_blocks.py), inside a memory cgroup, with the peak each block reached.

    python benchmarks/latency_blocks_memory.py BUILD --set onnxruntime-fp32 \
        [--components transformer,text_encoder_3] [--runs 2] [--cgroup-gib 20]

BUILD is a finished `diffship build` folder (its manifest names the model folder and the validation size). Issue 45's
ninth start was killed by its 20 GiB cgroup in these blocks for sd35m-arch's FP32 transformer when they shared one
process; this shows what each block holds now that a large component's run each in a child.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from build_matrix import cgroup_figures, memory_cgroup  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", type=Path)
    parser.add_argument("--set", default="onnxruntime-fp32")
    parser.add_argument("--components", default="transformer,text_encoder_3")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--cgroup-gib", type=float)
    args = parser.parse_args()
    # charged from before diffship's imports, as a build is
    group = memory_cgroup(args.cgroup_gib) if args.cgroup_gib else None
    if group is not None:
        (group / "cgroup.procs").write_text(str(os.getpid()))
    from diffship.host.cpu import describe
    from diffship.models.components import component_specs
    from diffship.store.manifest import open_artifacts
    from diffship.targets import get_target
    from diffship.validation import latency
    from diffship.validation.baseline import baseline_device
    from diffship.validation.latency_blocks import Block, time_blocks

    manifest = json.loads((args.build / "manifest.json").read_text())
    chosen = manifest["artifacts"][args.set]
    artifacts = open_artifacts(args.build, chosen["target"], chosen["precision"])
    folder = Path(manifest["source"]["folder"])
    v = manifest["recipe"]["validation"]
    height, width = v.get("height") or 512, v.get("width") or 512  # the recipe's validation size, else 512
    backend = get_target(artifacts.target)
    options = backend.parse_options(artifacts.options) if artifacts.options else None
    specs = {s.name: s for s in component_specs(folder)}
    device, dtype = baseline_device()
    print(f"{folder.name}, {args.set}, {height}x{width}; {describe()}; {time.strftime('%Y-%m-%d')}")
    for name in args.components.split(","):
        spec = specs[name]
        batch = spec.batch_for(1, v.get("guidance_scale", 7.5) > 1.0)
        block = Block(spec, spec.sample_inputs(batch, height, width), folder, False, v.get("streamed_reference", "auto"),
                      device, dtype, artifacts.target, artifacts.components[name], options, artifacts.precision)
        started = time.perf_counter()
        times, in_child = time_blocks(block, 1, args.runs)
        base, target = latency.summarize(times["baseline"]), latency.summarize(times["target"])
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        print(f"  {name} (batch {batch}): baseline {base['p50_s']:.2f} s, target {target['p50_s']:.2f} s, "
              f"{latency.speedup(base, target):.2f}x; blocks in children: {in_child}; largest child so far "
              f"{children / 2**30:.2f} GiB, this process {latency.peak_rss_bytes() / 2**30:.2f} GiB; "
              f"{time.perf_counter() - started:.0f} s")
    if group is not None:
        figures = cgroup_figures(group)
        print(f"  inside a {figures['cgroup_limit'] / 2**30:.0f} GiB cgroup: peak charge "
              f"{figures['cgroup_peak'] / 2**30:.2f} GiB (page cache included), the limit hit "
              f"{figures['cgroup_limit_hits']} times")


if __name__ == "__main__":
    main()
