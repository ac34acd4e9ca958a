"""The compile stage: one artifact set per target and precision, each component compiled (or reused from the cache)
from its export, then the set's folder assembled beside it (tokenizers, scheduler, model_index.json).

With `assemble` false the stage only compiles components into the cache, without assembling the sets: what a farm's
compile task runs.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffship.models.components import ComponentSpec
from diffship.recipe import Recipe
from diffship.stages.context import Context, shapes_fixed
from diffship.stages.isolation import compile_isolated, should_isolate
from diffship.store import cache
from diffship.store.artifacts import atomic_write_json, file_entries
from diffship.store.manifest import ArtifactSet
from diffship.targets import CompileContext, get_target
from diffship.targets.accuracy_gate import Gate

Say = Callable[[str], None]


def static_shapes(spec: ComponentSpec, shapes: dict[str, list[int]], guidance: bool) -> dict[str, tuple[int, ...]] | None:
    """Input shapes when the recipe fixes batch and resolution (the UNet sees twice the batch under guidance)."""
    if not shapes_fixed(shapes):
        return None
    batch = spec.batch_for(shapes["batch"][0], guidance)
    sizes = spec.axis_sizes(batch, shapes["height"][0], shapes["width"][0])
    return {t.name: t.concrete(sizes) for t in spec.inputs}


def compile_stage(c: Context, root: Path, export_dir: Path, entries: dict[str, Any],
                  assemble: bool = True) -> dict[str, tuple[ArtifactSet, Any, dict[str, Any]]]:
    """One artifact set per target and precision: (the set, the target's options, its manifest entry). Without
    `assemble`, only the components are compiled into the cache (a farm's compile task): no set is returned."""
    recipe, shapes, say = c.recipe, c.shapes, c.say
    opt_size = (c.plan.height, c.plan.width)
    # The UNet parity cases validation will check: what an accuracy-aware precision probes.
    denoiser_probes = tuple((x.batch, x.height, x.width) for x in c.plan.denoiser_cases or c.plan.cases)
    sets = {}
    by_name = {s.name: s for s in c.specs}
    guided = recipe.validation.guidance_scale > 1.0
    for target in recipe.targets:
        backend = get_target(target.name)
        options = backend.parse_options(target.options)
        # Engines are tied to the GPU and library versions that built them: a different one is a different key.
        environment = backend.environment(options)
        # What the target's sets hold of each component: all its outputs, or those the pipeline reads (Core ML)
        held = {n: s if backend.CLIENT_OUTPUTS_KEPT else s.pipeline_outputs() for n, s in by_name.items()}
        for precision in target.precisions:
            set_key = f"{target.name}-{precision}"
            writes = backend.writes_artifacts(precision, options)
            set_dir = root / set_key if writes else export_dir
            components: dict[str, Path] = {}
            for i, name in enumerate(entries):
                prefix = f"[compile {set_key} {i + 1}/{len(entries)}] {name}"
                source = export_dir / name / "model.onnx"
                if not writes:
                    components[name] = backend.compile(source, precision, options)
                    continue
                context = CompileContext(held[name], static_shapes(held[name], shapes, guided),
                                         c.calibration if backend.needs_calibration(precision) else None,
                                         (shapes["height"][0], shapes["width"][0]), shapes, opt_size, guided,
                                         c.source.folder, recipe.allow_pickle, recipe.export.opset,
                                         _gate(recipe, precision, denoiser_probes), say)
                entry_key = cache.key(stage="compile", target=target.name, precision=precision, options=repr(options),
                                      source=[f["sha256"] for f in entries[name]["files"]], static=context.static_shapes,
                                      calibration=c.calibration.key if context.calibration else None,
                                      probe=context.probe_size, ranges=shapes, opt=opt_size, guided=guided,
                                      environment=environment, gate=repr(context.gate), versions=c.versions)
                done = cache.cached_step("compile", entry_key, f"{name} {set_key} compile",
                                         functools.partial(_compile_into, backend, source, precision, options, context,
                                                           say, prefix, should_isolate(recipe.compile.isolate, source)),
                                         force=c.force, say=say, copy_to=set_dir / name)
                c.hits[f"compile:{set_key}:{name}"] = done.hit
                say(f"{prefix}: cached (no work)" if done.hit else f"{prefix}: done in {done.info['seconds']:.1f} s")
                shutil.copy2(export_dir / name / "config.json", set_dir / name / "config.json")
                components[name] = set_dir / name / done.info["artifact"]
            if not assemble:
                continue
            if set_dir != export_dir:
                _copy_pipeline_folder(export_dir, set_dir, list(entries), backend.model_index(c.family, list(entries)))
            backend.finish_set(set_dir, components, precision, options, c.family, say)  # e.g. the web target's app
            recorded = {name: {"path": path.relative_to(root).as_posix(), "precision": precision,
                               "files": _artifact_files(root, export_dir, path, entries[name]["files"]),
                               "inputs": entries[name]["inputs"], "outputs": [
                                   o for o in entries[name]["outputs"] if o["name"] in {t.name for t in held[name].outputs}]}
                        for name, path in components.items()}
            artifact_set = ArtifactSet(root, set_dir, target.name, precision, components, shapes, "unvalidated",
                                       family=c.family)
            sets[set_key] = (artifact_set, options, {"target": target.name, "precision": precision,
                                                      **({"environment": environment} if environment else {}),
                                                      "pipeline": set_dir.relative_to(root).as_posix(),
                                                      "components": recorded,
                                                      "pipeline_files": _pipeline_files(root, set_dir, components)})
    return sets


def _gate(recipe: Recipe, precision: str, probes: tuple[tuple[int, int, int], ...]) -> Gate | None:
    """What an accuracy-aware precision must meet: the recipe's threshold for it, the search's margin and time, and
    the UNet parity cases validation will check (batch, height, width)."""
    if not precision.endswith("-auto"):
        return None
    t, search = recipe.threshold(precision), recipe.int8_auto
    return Gate(t.min_cosine, t.max_rel_l2, search.margin, search.time_limit_minutes * 60, probes)


def _compile_into(backend: Any, source: Path, precision: str, options: Any, context: CompileContext, say: Say,
                  prefix: str, isolate: bool, staging: Path, info: dict[str, Any]) -> None:
    say(f"{prefix}: compiling ..." + (" (in a child process)" if isolate else ""))
    began = time.perf_counter()
    if isolate:
        artifact, _ = compile_isolated(backend.module.__name__, source, precision, options, staging, context)
    else:
        artifact = backend.compile(source, precision, options, staging, context)
    info |= {"artifact": artifact.name, "seconds": round(time.perf_counter() - began, 2)}


def _artifact_files(root: Path, export_dir: Path, artifact: Path, exported: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Hashes of an artifact's folder; when it is the export itself (ONNX Runtime FP32), the export stage's, re-rooted,
    so multi-GB weights are not hashed a second time."""
    if artifact.parent.parent == export_dir:
        prefix = export_dir.relative_to(root).as_posix()
        return [{**f, "path": f"{prefix}/{f['path']}"} for f in exported]
    return file_entries(root, artifact.parent)


def _pipeline_files(root: Path, folder: Path, components: dict[str, Any]) -> list[dict[str, Any]]:
    """Hashes of what a set's folder holds besides its components: tokenizers, scheduler, model_index.json (and a
    web set's app)."""
    files = [e for name in sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in components)
             for e in file_entries(root, folder / name)]
    return [*files, *({"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size,
                       "sha256": cache.sha256_file(p)} for p in sorted(folder.iterdir())
                      if p.is_file() and p.name != "manifest.json")]  # an export folder's own, made anew each build


def _copy_pipeline_folder(export_dir: Path, set_dir: Path, components: list[str], index: dict[str, Any] | None) -> None:
    """Tokenizers, scheduler and a model_index.json beside a target's own artifacts, so the folder loads alone."""
    for folder in export_dir.iterdir():
        if folder.is_dir() and folder.name not in components:
            shutil.copytree(folder, set_dir / folder.name)
    exported = json.loads((export_dir / "model_index.json").read_text(encoding="utf-8"))
    if index is None:  # the export's own index: a folder in diffusers' form, which clients load
        merged = exported
    else:  # the target's own pipeline classes for its components
        merged = {k: v for k, v in exported.items() if k not in components and k != "_class_name"} | index
    atomic_write_json(set_dir / "model_index.json", merged)
