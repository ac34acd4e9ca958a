"""Export a whole pipeline: one ONNX per component plus tokenizers, scheduler and model_index.json.

The folder is built under a temporary name and renamed into place only when every requested
component has exported and passed the checker, so a failed or interrupted export leaves nothing
where a finished one would be. Its layout is optimum's ONNX pipeline layout (`unet/model.onnx`, ...) under a
model_index.json in diffusers' own form, which optimum-onnx's `ORTDiffusionPipeline` loads unchanged.
"""

from __future__ import annotations

import gc
import json
import platform
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import diffusers
import onnx
import torch
import transformers

from diffship import __version__
from diffship.errors import DiffshipError
from diffship.exporters.onnx import DEFAULT_OPSET, export_component, onnx_io
from diffship.exporters.streamed import StreamedWeights
from diffship.host.memory import budget
from diffship.models.components import ComponentSpec, component_specs, wrap
from diffship.models.compressed import is_compressed
from diffship.models.families import detect_family, family_named, prediction_type, read_model_index, tasks_of
from diffship.models.loading import load_component
from diffship.models.source import ModelSource
from diffship.models.weightless import WeightFiles, fp32_bytes_or_none, parameter_keys, weightless_component
from diffship.store import cache
from diffship.store.artifacts import (
    MANIFEST_NAME,
    atomic_write_json,
    file_entries,
    prepare_output_dir,
    staged_dir,
)
from diffship.store.manifest import MANIFEST_SCHEMA

# Called with (component, event, detail): event is "start" or "done".
StepCallback = Callable[[str, str, dict[str, Any]], None]
# The library versions an export's bytes depend on (keys of store.versions.library_versions).
EXPORT_VERSIONS = ("diffship", "diffship_source", "torch", "onnx", "diffusers", "transformers")
ONE_PASS_PEAK = 1.5

def select_specs(folder: Path, components: list[str] | None) -> list[ComponentSpec]:
    """The specs to export: all of the pipeline's, or the named ones (unknown names are an error)."""
    specs = component_specs(folder)
    if not components:
        return specs
    known = {s.name for s in specs}
    unknown = [c for c in components if c not in known]
    if unknown:
        raise DiffshipError(f"Unknown component(s) {', '.join(unknown)}; this pipeline has {', '.join(known)}.")
    return [s for s in specs if s.name in components]


class ModuleLoader:
    """Loads pipeline modules on demand, keeping only the latest one in memory (full-size UNets are GBs)."""

    def __init__(self, folder: Path, allow_pickle: bool):
        self.folder, self.allow_pickle = folder, allow_pickle
        self.loaded: dict[str, torch.nn.Module] = {}

    def __call__(self, module: str) -> torch.nn.Module:
        if module not in self.loaded:
            self.loaded.clear()
            gc.collect()
            self.loaded[module] = load_component(self.folder, module, self.allow_pickle)
        return self.loaded[module]


def choose_streamed(setting: bool | str, folder: Path, module: str) -> bool:
    """Whether to export `module` streamed: the recipe's `streamed`, or for "auto" whether a one-pass export (about
    1.5 times the FP32 weights at its peak: 13.94 GiB for sdxl-arch's 9.58 GiB UNet, docs/performance.md) would
    outgrow the memory budget (`host.memory.budget`). Only safetensors weights stream."""
    if setting != "auto":
        return bool(setting)
    if is_compressed(folder / module) or not any((folder / module).glob("*.safetensors")):
        return False
    weights = fp32_bytes_or_none(folder / module)
    return weights is not None and ONE_PASS_PEAK * weights > budget()


def export_one(source: ModelSource, spec: ComponentSpec, dest: Path, opset: int, modules: ModuleLoader,
               streamed: bool = False, stored_weights: bool = False) -> None:
    """Export one component into `dest` (model.onnx, external data if any, and its config.json); `streamed` traces
    it weightless and writes its weights from the folder one tensor at a time, `stored_weights` in the 16-bit type
    they are stored in (a Cast to FP32 after each)."""
    # No model name in the file: exports are cached by the component's weights, which models (and a LoRA build and
    # its base) share; the manifest says which model a set came from.
    metadata = {"diffship.version": __version__}
    if streamed:
        modules.loaded.clear()
        module = weightless_component(source.folder, spec.module)
        wrapper = wrap(spec, module)
        files = WeightFiles.of(source.folder / spec.module)
        weights = StreamedWeights(parameter_keys(wrapper, module, set(files.files)), files.stored, stored_weights)
        export_component(spec, wrapper, dest, opset, metadata, weights)
    else:
        export_component(spec, wrap(spec, modules(spec.module)), dest, opset, metadata)
    shutil.copy2(source.folder / spec.module / "config.json", dest / "config.json")


def cached_export(source: ModelSource, spec: ComponentSpec, family: str, weights: str, opset: int,
                  versions: dict[str, str], modules: ModuleLoader, dest: Path | None, force: bool = False,
                  say: Callable[[str], None] | None = None, on_export: Callable[[], None] | None = None,
                  streamed: bool = False, stored_weights: bool = False) -> cache.Cached:
    """One component's export through the cache (keyed by its module's content hash `weights`, the opset and the
    versions its bytes depend on), copied into `dest` unless None; `on_export` is called when it has to be made."""

    def produce(staging: Path, info: dict[str, Any]) -> None:
        if on_export is not None:
            on_export()
        began = time.perf_counter()
        export_one(source, spec, staging, opset, modules, streamed, stored_weights)
        info |= {"component": spec.name, "seconds": round(time.perf_counter() - began, 2), "streamed": streamed}

    # a streamed export computes the same but its graph keeps what constant folding would fold: its own entry
    entry_key = cache.key(stage="export", component=spec.name, family=family, weights=weights, opset=opset,
                          **({"streamed": True, "stored_weights": stored_weights} if streamed else {}),
                          **{k: versions[k] for k in EXPORT_VERSIONS})
    return cache.cached_step("export", entry_key, f"{spec.name} export", produce, force=force, say=say, copy_to=dest)


def component_entry(root: Path, folder: Path, seconds: float) -> dict[str, Any]:
    """The manifest entry of an exported component folder: files with hashes, inputs and outputs."""
    return {"seconds": round(seconds, 2), "files": file_entries(root, folder), **onnx_io(folder / "model.onnx")}


def export_pipeline(source: ModelSource, out: Path, components: list[str] | None = None, opset: int = DEFAULT_OPSET,
                    overwrite: bool = False, allow_pickle: bool = False, on_step: StepCallback | None = None,
                    versions: dict[str, str] | None = None, force: bool = False,
                    streamed: bool | str = "auto") -> dict[str, Any]:
    """Export `source` into `out` and return the manifest written there. With `versions` (library_versions()) each
    component goes through the cache a build's exports share, so a model built or exported before is copied, not
    exported again (`force` exports anyway); without them every component is exported here (what a benchmark times)."""
    step = on_step or (lambda *_: None)
    out = out.resolve()
    prepare_output_dir(out, overwrite)
    specs = select_specs(source.folder, components)
    family = detect_family(source.folder).name
    entries: dict[str, Any] = {}
    with staged_dir(out) as tmp:
        modules = ModuleLoader(source.folder, allow_pickle)
        for i, spec in enumerate(specs):
            step(spec.name, "start", {"index": i + 1, "total": len(specs)})
            started = time.perf_counter()
            stream = choose_streamed(streamed, source.folder, spec.module)
            if versions is None:
                export_one(source, spec, tmp / spec.name, opset, modules, stream)
                cached = False
            else:
                weights = cache.folder_hash(source.folder / spec.module)
                done = cached_export(source, spec, family, weights, opset, versions, modules, tmp / spec.name, force,
                                     streamed=stream)
                cached = done.hit
            seconds = done.info["seconds"] if cached else time.perf_counter() - started
            entries[spec.name] = component_entry(tmp, tmp / spec.name, seconds)
            step(spec.name, "done", {"seconds": entries[spec.name]["seconds"], "cached": cached,
                                     "bytes": sum(f["bytes"] for f in entries[spec.name]["files"])})
        modules.loaded.clear()
        manifest = finish_pipeline_folder(source, tmp, specs, opset, entries)
    return manifest


def finish_pipeline_folder(source: ModelSource, root: Path, specs: list[ComponentSpec], opset: int,
                           entries: dict[str, Any]) -> dict[str, Any]:
    """Add tokenizers, scheduler, model_index.json and manifest.json beside the exported components."""
    family = detect_family(source.folder)
    # an SD3 folder may leave T5 out, and its tokenizer with it
    _copy_pipeline_files(source.folder, root, tuple(t for t, _ in family.tokenizers_in(source.folder)))
    _write_model_index(source.folder, root, family.name, {s.module for s in specs}, family.tokenizers)
    manifest = _manifest(source, family.name, prediction_type(source.folder), opset, entries, root)
    atomic_write_json(root / MANIFEST_NAME, manifest)
    return manifest


def _copy_pipeline_files(src: Path, dst: Path, tokenizers: tuple[str, ...]) -> None:
    for name in (*tokenizers, "scheduler"):
        if not (src / name).is_dir():
            raise DiffshipError(f"{src} is missing the `{name}` folder a deployed pipeline needs.")
        shutil.copytree(src / name, dst / name)
        if name != "scheduler":
            _write_bpe_files(dst / name)
    _drop_default_time_shift(dst / "scheduler" / "scheduler_config.json")


def _drop_default_time_shift(path: Path) -> None:
    """Leave out `time_shift_type` where it is diffusers' default ("exponential", the formula exp(mu) / (exp(mu) +
    1/t - 1)): OpenVINO GenAI 2026.3+ reads "exponential" as Flux.2's step-dependent mu instead (its
    flow_match_euler_discrete.cpp), so a Flux.1 folder saved by today's diffusers draws another schedule there (mu
    1.95 against 0.46 at 64x64, 3 steps). Without the key both read Flux.1's schedule, as in the hub's folders."""
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("time_shift_type") == "exponential":
        del config["time_shift_type"]
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_bpe_files(folder: Path) -> None:
    """vocab.json + merges.txt beside a tokenizer.json that lacks them: transformers 5 saves CLIP tokenizers as
    tokenizer.json only, and the clients' transformers 4 builds CLIPTokenizer from those two files."""
    if (folder / "vocab.json").is_file() or not (folder / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer, models  # start-up time: tokenizers

    model = Tokenizer.from_file(str(folder / "tokenizer.json")).model
    if isinstance(model, models.BPE):  # CLIP's; T5's Unigram tokenizer.json is what transformers 4 reads as it is
        model.save(str(folder))  # a BPE model writes both files


def _write_model_index(src: Path, dst: Path, family: str, modules: set[str], tokenizers: tuple[str, ...]) -> None:
    """model_index.json in diffusers' own form, which every client of the folder reads: OpenVINO GenAI accepts only
    diffusers' class names, optimum's OV / ORT pipelines choose their class from `_class_name` and load each model
    from its files. Component entries are the source's (`vae` for both VAE halves, as diffusers names it)."""
    index = read_model_index(src)
    new: dict[str, Any] = {"_class_name": family_named(family).pipelines[tasks_of(src)[0]],
                           "_diffusers_version": diffusers.__version__}
    for name in sorted(modules):  # a ControlNet diffship attached has no entry in the source's index
        if index.get(name):
            new[name] = index[name]
    for name in family_named(family).optional_encoders:  # left out as the source says: [null, null]
        if name in index and name not in new:
            new[name] = index[name]
    for name in (*tokenizers, "scheduler"):
        new[name] = index.get(name)
    new |= {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    for key in ("force_zeros_for_empty_prompt", "requires_aesthetics_score"):
        if key in index:
            new[key] = index[key]
    (dst / "model_index.json").write_text(json.dumps(new, indent=2) + "\n", encoding="utf-8")


def _manifest(source: ModelSource, family: str, prediction: str, opset: int, components: dict[str, Any],
              root: Path) -> dict[str, Any]:
    return {
        "schema": MANIFEST_SCHEMA,
        "tool": {"name": "diffship", "version": __version__},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": {"model": source.spec, "kind": source.kind, "folder": str(source.folder), "family": family,
                   "prediction_type": prediction},
        "export": {"format": "onnx", "opset": opset, "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
                   "precision": "fp32"},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__},
        "components": components,
        "pipeline_files": file_entries(root, root / "scheduler")
        + [e for name in sorted(p.name for p in root.glob("tokenizer*")) for e in file_entries(root, root / name)],
    }
