"""A full-size diffusion transformer through the streaming paths, each stage in a child process of its own, with its
wall time and the peak resident memory of its whole process tree (sampled every 0.25 s): issue 45's figures.

    python benchmarks/dit_streaming.py --model flux-arch --work /path/with/70GB [--size 512] [--stages ...]

Stages (each skipped when its output is already in --work, so a run that stops resumes):
  write      the built-in, layer by layer in BF16 (flux-arch: T5-XXL shortened to one layer with --short-t5, so the
             transformer's stages fit this machine's disk; the transformer and its inputs are exact)
  export     the transformer to ONNX, streamed, weights kept in BF16 behind Casts
  int8 int4  OpenVINO int8-weights / int4-weights, weight by weight
  blocks     per-block parity of each compiled transformer against the PyTorch chain run one block at a time
             (`validation/blocks.py`), on sample inputs at --size
  generate   one image at --size, 4 steps, through each compiled transformer (the text encoders and the decoder
             exported and stored INT8 weight-only beside it), diffusers' FluxPipeline over the runners as `diffship
             generate` runs a set; random weights, so the picture is noise: what it shows is that the set runs whole
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import psutil
from build_matrix import cgroup_figures, memory_cgroup, tree_anon, tree_rss

HERE = Path(__file__).resolve().parent
STAGES = ("write", "export", "int8", "int4", "blocks", "generate")

CHILD = r"""
import json, sys, time, dataclasses
from pathlib import Path
stage, model_name, work, size, short_t5 = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
folder = work / "model"
started = time.perf_counter()
result = {}
if stage == "write":
    from diffship.models.builtin import BUILTINS
    from diffship.models.builtin_write import write_builtin
    model = BUILTINS[model_name]
    if short_t5:
        encoders = tuple({**c, "num_layers": 1} if c.get("kind") == "t5" else c for c in model.text_encoders)
        model = dataclasses.replace(model, text_encoders=encoders)
    folder.mkdir(parents=True)
    write_builtin(model, folder)
elif stage == "export":
    from diffship.exporters.pipeline import ModuleLoader, export_one
    from diffship.models.components import component_specs
    from diffship.models.source import resolve
    spec = next(s for s in component_specs(folder) if s.is_denoiser)
    export_one(resolve(str(folder)), spec, work / "onnx", 17, ModuleLoader(folder, False), streamed=True,
               stored_weights=True)
elif stage in ("int8", "int4"):
    from diffship.models.components import component_specs
    from diffship.targets import CompileContext, get_target
    spec = next(s for s in component_specs(folder) if s.is_denoiser)
    target = get_target("openvino")
    precision = {"int8": "int8-weights", "int4": "int4-weights"}[stage]
    target.compile(work / "onnx" / "model.onnx", precision, target.parse_options({"streamed": True}),
                   work / stage, CompileContext(spec))
elif stage == "blocks":
    from diffship.models.components import component_specs
    from diffship.models.streamed_module import StreamedComponent
    from diffship.targets import get_target
    from diffship.validation.blocks import block_parity, boundary_tensors, reference_chain
    spec = next(s for s in component_specs(folder) if s.is_denoiser)
    reference = StreamedComponent(folder, spec.module)
    taps = boundary_tensors(work / "onnx" / "model.onnx", [name for name, _ in reference.blocks])
    began = time.perf_counter()
    chain = reference_chain(reference, spec, spec.sample_inputs(1, size, size, seed=0))  # before any graph loads
    result["reference_seconds"] = round(time.perf_counter() - began, 1)
    target = get_target("openvino")
    for precision in ("int8", "int4"):
        if not (work / precision / "openvino_model.xml").is_file():
            continue
        began = time.perf_counter()
        runner = target.load_tapped(work / precision / "openvino_model.xml", target.parse_options({"cache_dir": ""}),
                                    f"{precision}-weights", [t for names in taps.values() for t in names])
        loaded = time.perf_counter()
        result[precision] = block_parity(chain, runner, taps, 0.99)
        result[precision]["seconds"] = round(time.perf_counter() - loaded, 1)  # the tapped run and the comparison
        result[precision]["load_seconds"] = round(loaded - began, 1)
        del runner
elif stage == "generate":
    import gc
    import shutil
    import numpy as np
    from PIL import Image
    from diffship.exporters.pipeline import ModuleLoader, export_one, finish_pipeline_folder
    from diffship.models.components import component_specs
    from diffship.models.source import resolve
    from diffship.runtime.pipeline import DeployedPipeline
    from diffship.store.manifest import ArtifactSet
    from diffship.targets import CompileContext, get_target
    from diffship.validation.e2e import compare_images
    source, target, root = resolve(str(folder)), get_target("openvino"), work / "pipeline"
    specs = [s for s in component_specs(folder) if s.name != "vae_encoder"]
    small = [s for s in specs if not s.is_denoiser]
    denoiser = next(s for s in specs if s.is_denoiser)
    if not (root / "model_index.json").is_file():
        modules = ModuleLoader(folder, False)
        for spec in small:  # the text encoders and the decoder: exported and stored INT8 weight-only, as a set would
            export_one(source, spec, root / spec.name, 17, modules)
            target.compile(root / spec.name / "model.onnx", "int8-weights", target.parse_options({}),
                           work / "small" / spec.name, CompileContext(spec))
        modules.loaded.clear()
        (root / denoiser.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(folder / denoiser.module / "config.json", root / denoiser.name / "config.json")
        finish_pipeline_folder(source, root, specs, 17, {})
    images = {}
    for precision in ("int8", "int4"):
        if not (work / precision / "openvino_model.xml").is_file():
            continue
        components = {s.name: work / "small" / s.name / "openvino_model.xml" for s in small}
        components[denoiser.name] = work / precision / "openvino_model.xml"
        artifacts = ArtifactSet(root, root, "openvino", f"{precision}-weights", components, None, "unvalidated",
                                None, "flux")
        began = time.perf_counter()
        # no compiled-model cache: OpenVINO would write the compiled 12 GB transformer beside the IR's 12 GB
        pipe = DeployedPipeline.from_artifacts(artifacts, target.parse_options({"cache_dir": ""}))
        loaded = time.perf_counter() - began
        generation = pipe("a photograph of an astronaut riding a horse", height=size, width=size, steps=4,
                          guidance_scale=0.0, seed=0)
        images[precision] = generation.images[0]
        Image.fromarray(images[precision]).save(work / f"generate-{precision}.png")
        result[precision] = {"load_seconds": round(loaded, 1), "image_seconds": round(generation.timings["total"], 1),
                             "step_seconds": [round(t, 1) for t in generation.timings["steps"]],
                             "std": float(np.asarray(images[precision], dtype=np.float32).std())}
        del pipe, generation
        gc.collect()  # the pipeline's stand-ins and runners refer to each other: freed only by a collection
    if len(images) == 2:
        result["int4_vs_int8"] = compare_images(images["int8"], images["int4"])
result["seconds"] = round(time.perf_counter() - started, 1)
print("RESULT " + json.dumps(result, default=float))
"""


def run_stage(stage: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-c", CHILD, stage, args.model, str(args.work), str(args.size), str(int(args.short_t5))]
    group = memory_cgroup(args.cgroup_gib) if args.cgroup_gib else None
    started = time.perf_counter()
    # the child enters the cgroup before it runs anything, so all it and its children charge counts
    enter = (lambda: (group / "cgroup.procs").write_text(str(os.getpid()))) if group else None
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                             preexec_fn=enter)
    proc, peak, done = psutil.Process(child.pid), {"bytes": 0, "anon": 0}, threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            peak["bytes"] = max(peak["bytes"], tree_rss(proc))
            peak["anon"] = max(peak["anon"], tree_anon(proc))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result: dict = {}
    assert child.stdout is not None
    try:
        for line in child.stdout:
            if line.startswith("RESULT "):
                result = json.loads(line[7:])
            elif args.verbose:
                print("   ", line, end="", flush=True)
        child.wait()
    finally:
        done.set()
        sampler.join()  # no thread left running when the next stage forks (preexec_fn)
        limits = cgroup_figures(group) if group is not None else {}
    if child.returncode:
        killed = " (killed: out of memory in the cgroup?)" if child.returncode in (-9, 137) else ""
        sys.exit(f"stage {stage} failed (exit {child.returncode}){killed}")
    output = {"write": "model", "export": "onnx", "generate": "pipeline"}.get(stage, stage)
    return {"stage": stage, "wall_seconds": round(time.perf_counter() - started, 1), "peak_tree_rss": peak["bytes"],
            "peak_tree_anon": peak["anon"], **limits, "disk_bytes": _size(args.work / output), **result}


def plot_blocks(result: dict, path: Path) -> Path:
    """Each compiled transformer's per-block cosine against the PyTorch chain, one line per precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(10, 4))
    for precision in ("int8", "int4"):
        rows = [row for row in result.get(precision, {}).get("blocks", []) if "cosine" in row]
        axes.plot(range(len(rows)), [row["cosine"] for row in rows], marker=".", label=f"{precision}-weights")
    axes.set_xlabel("block (the transformer's outermost ModuleList items, in call order)")
    axes.set_ylabel("cosine against PyTorch FP32")
    axes.set_title("per-block parity: the compiled graph at each block boundary against the PyTorch chain")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def done(stage: str, work: Path) -> bool:
    marker = {"write": work / "model" / "model_index.json", "export": work / "onnx" / "model.onnx",
              "int8": work / "int8" / "openvino_model.xml", "int4": work / "int4" / "openvino_model.xml"}
    return stage in marker and marker[stage].is_file()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flux-arch", help="a built-in (tiny-flux for a smoke run)")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--short-t5", action="store_true", help="T5-XXL with one layer (the transformer exact)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--cgroup-gib", type=float, help="run each stage in a memory cgroup of this size (root)")
    args = parser.parse_args()
    from diffship.host.cpu import describe

    results = []
    for stage in args.stages:
        if done(stage, args.work):
            print(f"{stage}: already in {args.work}, skipped", flush=True)
            continue
        print(f"{stage} ...", flush=True)
        results.append(run_stage(stage, args))
        r = results[-1]
        limited = (f", cgroup peak {r['cgroup_peak'] / 2**30:.2f} of {r['cgroup_limit'] / 2**30:.0f} GiB "
                   f"(limit hit {r['cgroup_limit_hits']} times)" if "cgroup_peak" in r else "")
        print(f"{stage}: {r['wall_seconds']:.0f} s, tree peak {r['peak_tree_rss'] / 2**30:.2f} GiB "
              f"(anonymous {r['peak_tree_anon'] / 2**30:.2f}){limited}, on disk {r['disk_bytes'] / 1e9:.1f} GB",
              flush=True)
        for precision in ("int8", "int4"):
            if precision in r:
                p = r[precision]
                if "min_cosine" in p:
                    print(f"  {precision}: min block cosine {p['min_cosine']:.6f}, first failing "
                          f"{p['first_failing_block']}, final cosine "
                          f"{min(f['cosine'] for f in p['final'].values()):.6f} ({p['seconds']:.0f} s)")
                else:
                    print(f"  {precision}: image {p['image_seconds']:.0f} s (steps {p['step_seconds']}), "
                          f"loaded in {p['load_seconds']:.0f} s")
        if stage == "blocks" and any(p in r for p in ("int8", "int4")):
            print(f"  per-block cosine drawn in {plot_blocks(r, args.work / 'blocks.png')}")
        if "int4_vs_int8" in r:
            print(f"  int4 against int8: PSNR {r['int4_vs_int8']['psnr_db']} dB, SSIM {r['int4_vs_int8']['ssim']:.3f}")
    print(f"\n{args.model} at {args.size}x{args.size}, {describe()}, {psutil.cpu_count()} CPUs, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {date.today()}")
    if args.json:  # a resumed run adds its stages to those already recorded
        recorded = json.loads(args.json.read_text()) if args.json.is_file() else []
        ran = {r["stage"] for r in results}
        args.json.write_text(json.dumps([r for r in recorded if r["stage"] not in ran] + results, indent=2,
                                        default=float))


if __name__ == "__main__":
    main()
