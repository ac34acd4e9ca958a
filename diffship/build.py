"""Run the stages for a recipe: export -> compile -> validate -> report -> manifest, each stage cached.

The output folder is assembled under a hidden temporary name and renamed into place at the end, so
an interrupted build leaves the previous output (or nothing) where a finished one would be. A
build whose artifacts fail validation still writes its folder, report and manifest (marked failed).
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffship import cache
from diffship.artifacts import (
    MANIFEST_NAME,
    atomic_write_json,
    file_entries,
    prepare_output_dir,
    staged_dir,
)
from diffship.errors import DiffshipError
from diffship.exporters.pipeline import ModuleLoader, component_entry, export_one, finish_pipeline_folder, select_specs
from diffship.isolation import compile_isolated, should_isolate
from diffship.manifest import ArtifactSet
from diffship.models.components import ComponentSpec, component_specs, native_size
from diffship.models.controlnet import controlnets_in
from diffship.models.families import component_config, detect_family, tasks_of
from diffship.models.lora import LoraSpec
from diffship.models.source import ModelSource, resolve
from diffship.provenance import build_manifest, library_versions, report_data
from diffship.recipe import Recipe
from diffship.runtime.tasks import inputs_digest, task_inputs, validated_tasks
from diffship.targets import CompileContext, check_available, get_target
from diffship.targets.accuracy_gate import Gate
from diffship.targets.calibration import CalibrationData, CalibrationFile, capture, check_calibration
from diffship.validation.baseline import Baseline
from diffship.validation.parity import Case
from diffship.validation.report import write_report
from diffship.validation.stage import validate_stage
from diffship.validation.suite import Plan

Say = Callable[[str], None]
EXPORT_FOLDER = "onnx"
# The roles an image needs: a build validates end to end, so it exports at least these components.
GENERATES = ("text_encoder", "denoiser", "vae_decoder")
REPORT_FOLDER = "report"


@dataclass(frozen=True)
class BuildResult:
    """Where the build went, what it recorded, and whether every artifact passed."""

    out: Path
    manifest: dict[str, Any]
    report: dict[str, Any]
    passed: bool
    all_cached: bool


def check_targets(recipe: Recipe) -> None:
    """Every target installed and every precision offered, each once, before any work starts."""
    keys = [f"{t.name}-{p}" for t in recipe.targets for p in t.precisions]
    if repeated := sorted({k for k in keys if keys.count(k) > 1}):
        raise DiffshipError(f"The recipe builds {', '.join(repeated)} more than once (one artifact set per target and "
                            "precision); list each precision once, in one [[targets]] entry per target.")
    for target in recipe.targets:
        check_available(target.name)
        backend = get_target(target.name)
        unknown = [p for p in target.precisions if p not in backend.PRECISIONS]
        if unknown:
            raise DiffshipError(f"Target {target.name!r} cannot build {', '.join(unknown)} yet; it offers "
                                f"{', '.join(backend.PRECISIONS)}.")
        if hasattr(backend, "preflight"):  # hardware the target needs (a GPU, FP8 kernels), checked before any work
            backend.preflight(target.precisions, backend.parse_options(target.options))


def plan_shapes(recipe: Recipe, spec: ComponentSpec, folder: Path) -> tuple[dict[str, list[int]], Plan]:
    """The shape ranges to record, and the resolution and parity cases validation uses (model defaults filled in)."""
    multiple = spec.vae_scale * 8
    native = native_size(component_config(folder, "unet"), spec.vae_scale)
    shapes: dict[str, list[int]] = {"batch": list(recipe.shapes.batch)}
    for side in ("height", "width"):
        low, high = getattr(recipe.shapes, side) or (multiple, 2 * native)
        for value in (low, high):
            if value % multiple:
                raise DiffshipError(f"shapes.{side} {value} is not a multiple of {multiple} pixels, which this model needs.")
        shapes[side] = [low, high]
    if shapes["batch"][0] > 1:
        raise DiffshipError("Validation generates one image per prompt and seed: shapes.batch must include 1.")
    v = recipe.validation
    height, width = v.height or native, v.width or native
    for side, value in (("height", height), ("width", width)):
        low, high = shapes[side]
        if value % multiple or not low <= value <= high:
            raise DiffshipError(
                f"Validation {side} {value} must be a multiple of {multiple} within shapes.{side} [{low}, {high}].")
    if v.parity_cases:
        cases = tuple(Case(c.batch, c.height, c.width) for c in v.parity_cases)
        for c in cases:
            spec.axis_sizes(c.batch, c.height, c.width)  # raises on a resolution the model cannot take
    else:
        first = Case(shapes["batch"][0], height, width)
        second = Case(min(2, shapes["batch"][1]), shapes["height"][0], shapes["width"][0])
        cases = (first,) if second == first else (first, second)
    unet_cases = None
    if shapes_fixed(shapes) and v.guidance_scale > 1.0:
        unet_cases = tuple(Case(2 * c.batch, c.height, c.width) for c in cases)
    inputs = task_inputs(height, width, v.image, v.mask, v.strength, control=v.control_image,
                         control_scale=v.control_scale, control_window=(v.control_start, v.control_end),
                         controlnets=len(controlnets_in(folder)))
    return shapes, Plan(height, width, cases, v, recipe.threshold("fp32"), unet_cases,
                        validated_tasks(tasks_of(folder)), inputs)


def build(recipe: Recipe, out: Path, force: bool = False, say: Say | None = None) -> BuildResult:
    """Build, validate and report every target of `recipe` into `out`."""
    say = say or (lambda _: None)
    started = time.perf_counter()
    check_targets(recipe)
    if (reason := cache.unwritable_reason()) is not None:
        say(f"The cache {cache.cache_root()} cannot be written ({reason}): building without it (stages it does not "
            "already hold run, and nothing is stored).")
    out = out.resolve()
    prepare_output_dir(out, overwrite=True)
    source = resolve(recipe.model, allow_pickle=recipe.allow_pickle, model_config=recipe.checkpoint_config, say=say,
                     variant=recipe.variant, loras=[LoraSpec(x.path, x.scale) for x in recipe.loras],
                     controlnets=recipe.controlnets)
    family = detect_family(source.folder)
    for target in recipe.targets:  # what a target cannot make for this family, said before any work
        if hasattr(backend := get_target(target.name), "check_family"):
            backend.check_family(family.name, backend.parse_options(target.options))
    specs = select_specs(source.folder, recipe.components)
    needed = [s.name for s in component_specs(source.folder, family) if s.role in GENERATES]
    if missing := [c for c in needed if c not in {s.name for s in specs}]:
        raise DiffshipError(
            f"A build validates images end to end, so it needs {', '.join(needed)}; the recipe leaves out "
            f"{', '.join(missing)}. To export and check single components use `diffship export -c` and `diffship validate`.")
    shapes, plan = plan_shapes(recipe, specs[0], source.folder)
    hits: dict[str, bool] = {}
    compressed = None
    if recipe.compress:
        source, compressed = _compress_stage(recipe, source, family.name, plan, force, hits, say)
    if any(get_target(t.name).needs_calibration(p) for t in recipe.targets for p in t.precisions):
        check_calibration(recipe.calibration.prompts, recipe.calibration.samples)
    versions = library_versions()
    say(f"Hashing {source.spec} ({family.title}) ...")
    module_hashes = {m: cache.folder_hash(source.folder / m)
                     for m in sorted({s.module for s in specs} | set(family.tokenizers) | {"scheduler"})}

    baseline = Baseline(source.folder, recipe.allow_pickle, say, recipe.validation.scheduler,
                        recipe.validation.scheduler_config)
    calibration = Calibration(recipe, plan, baseline, module_hashes, versions, force, hits)
    with staged_dir(out) as tmp:
        export_dir = tmp / EXPORT_FOLDER
        entries = _export_stage(source, family.name, specs, recipe.export.opset, recipe.allow_pickle, module_hashes,
                                versions, export_dir, force, hits, say)
        finish_pipeline_folder(source, export_dir, specs, recipe.export.opset, entries)
        sets = _compile_stage(recipe, tmp, export_dir, specs, entries, shapes, family.name, calibration, versions, force,
                              hits, say, source.folder, (plan.height, plan.width),
                              tuple((c.batch, c.height, c.width) for c in plan.unet_cases or plan.cases))
        int8_bar = compressed is not None and compressed["quantizer"] == "modelopt"
        results, pairs = validate_stage(recipe, source, specs, sets, plan, module_hashes, versions, baseline, force,
                                        hits, say, int8_bar)
        baseline.release()
        passed = all(r["passed"] for r in results.values())
        all_cached = all(hits.values())
        report = report_data(recipe, source, family.title, module_hashes, plan, shapes, entries, results, hits,
                              versions, passed, time.perf_counter() - started)
        if compressed is not None:
            report["compress"] = compressed
        say("Writing the report ...")
        written = write_report(report, pairs, tmp / REPORT_FOLDER)
        manifest = build_manifest(recipe, source, family.name, module_hashes, versions, shapes, sets, results, hits,
                             {k: p.relative_to(tmp).as_posix() for k, p in written.items()}, passed)
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
    return BuildResult(out, manifest, report, passed, all_cached)


def _compress_stage(recipe: Recipe, source: ModelSource, family: str, plan: Plan, force: bool, hits: dict[str, bool],
                    say: Say) -> tuple[ModelSource, dict[str, Any]]:
    """Run the recipe's compression steps (cached), and hand the compressed pipeline to the stages after."""
    from diffship.compress.run import RECORD_FILE, check_exportable, compress, settings_for

    check_exportable(recipe.compress)
    quantized = [f"{t.name}:{p}" for t in recipe.targets for p in t.precisions if p.startswith(("int8", "fp8"))]
    if quantized and any(s.step == "qat" for s in recipe.compress):
        raise DiffshipError(
            f"A qat step already makes the UNet INT8 (QDQ); {', '.join(quantized)} would quantize it again. "
            "Build the targets' fp32 precision: it runs the QDQ graph with INT8 kernels.")
    settings, measure_quality = settings_for(recipe, source.folder, plan.height, plan.width)
    entry_key = cache.key(stage="compress", weights=cache.folder_hash(source.folder),
                          steps=[s.model_dump() for s in recipe.compress], settings=settings.__dict__,
                          quality=measure_quality, versions=library_versions())
    checkpoints = cache.work_root() / "checkpoints" / entry_key

    def produce(staging: Path, info: dict[str, Any]) -> None:
        record = compress(source.folder, family, recipe.compress, settings, staging / "model", checkpoints,
                          recipe.allow_pickle, measure_quality, say)
        atomic_write_json(staging / RECORD_FILE, record)
        info |= {"steps": [s.step for s in recipe.compress]}

    done = cache.cached_step("compress", entry_key, "compressed model", produce, force=force, say=say)
    if done.hit:
        say("[compress] cached (no work)")
    else:
        shutil.rmtree(checkpoints, ignore_errors=True)  # finished: the entry now holds the result
    hits["compress"] = done.hit
    record = json.loads((done.path / RECORD_FILE).read_text(encoding="utf-8"))
    return ModelSource(source.spec, "compressed", done.path / "model"), record


def _export_stage(source: ModelSource, family: str, specs: list[ComponentSpec], opset: int, allow_pickle: bool,
                  module_hashes: dict[str, str], versions: dict[str, str], export_dir: Path, force: bool,
                  hits: dict[str, bool], say: Say) -> dict[str, Any]:
    modules = ModuleLoader(source.folder, allow_pickle)
    entries: dict[str, Any] = {}
    for i, spec in enumerate(specs):
        entry_key = cache.key(stage="export", component=spec.name, family=family, weights=module_hashes[spec.module],
                              opset=opset, **{k: versions[k] for k in ("diffship", "diffship_source", "torch", "onnx",
                                                                        "diffusers", "transformers")})
        prefix = f"[export {i + 1}/{len(specs)}] {spec.name}"
        done = cache.cached_step("export", entry_key, f"{spec.name} export",
                                 functools.partial(_export_into, source, spec, opset, modules, say, prefix),
                                 force=force, say=say, copy_to=export_dir / spec.name)
        entries[spec.name] = component_entry(export_dir, export_dir / spec.name, done.info["seconds"])
        hits[f"export:{spec.name}"] = done.hit
        if done.hit:
            say(f"{prefix}: cached (no work)")
        else:
            size = sum(f["bytes"] for f in entries[spec.name]["files"])
            say(f"{prefix}: done, {size / 2**20:.1f} MiB in {done.info['seconds']:.1f} s")
    modules.loaded.clear()
    return entries


def _export_into(source: ModelSource, spec: ComponentSpec, opset: int, modules: ModuleLoader, say: Say, prefix: str,
                 staging: Path, info: dict[str, Any]) -> None:
    say(f"{prefix}: exporting ...")
    began = time.perf_counter()
    export_one(source, spec, staging, opset, modules)
    info |= {"component": spec.name, "seconds": round(time.perf_counter() - began, 2)}


class Calibration:
    """The calibration inputs, captured from the baseline once per distinct recipe and kept in the cache."""

    def __init__(self, recipe: Recipe, plan: Plan, baseline: Baseline, module_hashes: dict[str, str],
                 versions: dict[str, str], force: bool, hits: dict[str, bool]):
        c = recipe.calibration
        self.settings = {"prompts": c.prompts, "samples": c.samples, "steps": c.steps_for(recipe.validation.steps),
                         "height": plan.height, "width": plan.width, "guidance_scale": plan.validation.guidance_scale,
                         "task": plan.tasks[0], "scheduler": [recipe.validation.scheduler,
                                                              recipe.validation.scheduler_config]}
        self.key = cache.key(stage="calibration", weights=module_hashes, **self.settings, versions=versions,
                             task_inputs=inputs_digest(plan.inputs) if plan.task_kwargs() or "controlnet" in plan.tasks
                             else None)
        self.baseline, self.force, self.hits, self.data, self.plan = baseline, force, hits, None, plan

    def __call__(self) -> CalibrationData:
        if self.data is not None:
            return self.data
        done = cache.cached_step("calibration", self.key, "calibration capture", self._capture, force=self.force,
                                 say=self.baseline.say)
        if done.hit:
            self.baseline.say("[calibration] cached (no work)")
        self.hits["calibration"] = done.hit
        self.path = done.path / "inputs.npz"
        self.data = CalibrationData.load(self.path, done.info)
        return self.data

    def as_file(self) -> CalibrationFile:
        """The captured inputs by their cache file (captured first if need be), for a compile in a child process."""
        self()
        return CalibrationFile(self.path, self.data.info)

    def _capture(self, staging: Path, info: dict[str, Any]) -> None:
        s = self.settings
        self.baseline.say(f"[calibration] capturing {s['samples']} UNet calls from {s['steps']}-step generations "
                          f"of {len(s['prompts'])} prompt(s) at {s['height']}x{s['width']} ...")
        began = time.perf_counter()
        data = capture(self.baseline.get(), s["prompts"], s["samples"], s["steps"], s["height"], s["width"],
                       s["guidance_scale"], task_kwargs=self.plan.task_kwargs())
        if "controlnet" in self.plan.tasks:  # the UNet variant's inputs with the ControlNets' residuals
            from diffship.validation.baseline import task_pipeline

            self.baseline.say("[calibration] and the controlled UNet's, with the ControlNets' residuals ...")
            controlled = task_pipeline(self.baseline.get(), detect_family(self.baseline.folder), "controlnet",
                                       self.baseline.folder, self.baseline.allow_pickle)
            more = capture(controlled, s["prompts"], s["samples"], s["steps"], s["height"], s["width"],
                           s["guidance_scale"], with_vae=False, task_kwargs=self.plan.task_kwargs("controlnet"))
            data.inputs["controlled_unet"] = more.inputs["controlled_unet"]
        data.save(staging / "inputs.npz")
        info |= {**data.info, "task": s["task"], "seconds": round(time.perf_counter() - began, 1)}
        self.baseline.say(f"[calibration] captured in {info['seconds']:.0f} s")
        self.baseline.release()  # quantization that follows needs the memory more than the baseline does


def shapes_fixed(shapes: dict[str, list[int]]) -> bool:
    """Whether the recipe pins batch, height and width to one value each (static artifacts are then possible)."""
    return all(low == high for low, high in shapes.values())


def static_shapes(spec: ComponentSpec, shapes: dict[str, list[int]], guidance: bool) -> dict[str, tuple[int, ...]] | None:
    """Input shapes when the recipe fixes batch and resolution (the UNet sees twice the batch under guidance)."""
    if not shapes_fixed(shapes):
        return None
    batch = spec.batch_for(shapes["batch"][0], guidance)
    sizes = spec.axis_sizes(batch, shapes["height"][0], shapes["width"][0])
    return {t.name: t.concrete(sizes) for t in spec.inputs}


def _compile_stage(recipe: Recipe, root: Path, export_dir: Path, specs: list[ComponentSpec], entries: dict[str, Any],
                   shapes: dict[str, list[int]], family: str, calibration: Calibration, versions: dict[str, str],
                   force: bool, hits: dict[str, bool], say: Say, model_folder: Path | None = None,
                   opt_size: tuple[int, int] | None = None,
                   unet_probes: tuple[tuple[int, int, int], ...] = ()) -> dict[str, tuple[ArtifactSet, Any, dict[str, Any]]]:
    """One artifact set per target and precision: (the set, the target's options, its manifest entry)."""
    sets = {}
    by_name = {s.name: s for s in specs}
    guided = recipe.validation.guidance_scale > 1.0
    for target in recipe.targets:
        backend = get_target(target.name)
        options = backend.parse_options(target.options)
        # Engines are tied to the GPU and library versions that built them: a different one is a different key.
        environment = backend.environment(options) if hasattr(backend, "environment") else None
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
                context = CompileContext(by_name[name], static_shapes(by_name[name], shapes, guided),
                                         calibration if backend.needs_calibration(precision) else None,
                                         (shapes["height"][0], shapes["width"][0]), shapes, opt_size, guided,
                                         model_folder, recipe.allow_pickle, recipe.export.opset,
                                         _gate(recipe, precision, unet_probes), say)
                entry_key = cache.key(stage="compile", target=target.name, precision=precision, options=repr(options),
                                      source=[f["sha256"] for f in entries[name]["files"]], static=context.static_shapes,
                                      calibration=calibration.key if context.calibration else None,
                                      probe=context.probe_size, ranges=shapes, opt=opt_size, guided=guided,
                                      environment=environment, gate=repr(context.gate), versions=versions)
                done = cache.cached_step("compile", entry_key, f"{name} {set_key} compile",
                                         functools.partial(_compile_into, backend, source, precision, options, context,
                                                           say, prefix, should_isolate(recipe.compile.isolate, source)),
                                         force=force, say=say, copy_to=set_dir / name)
                hits[f"compile:{set_key}:{name}"] = done.hit
                say(f"{prefix}: cached (no work)" if done.hit else f"{prefix}: done in {done.info['seconds']:.1f} s")
                shutil.copy2(export_dir / name / "config.json", set_dir / name / "config.json")
                components[name] = set_dir / name / done.info["artifact"]
            if set_dir != export_dir:
                _copy_pipeline_folder(export_dir, set_dir, list(entries), backend.model_index(family, list(entries)))
            if hasattr(backend, "finish_set"):  # what a set needs beside its components (the web target's app)
                backend.finish_set(set_dir, components, precision, options, family, say)
            recorded = {name: {"path": path.relative_to(root).as_posix(), "precision": precision,
                               "files": _artifact_files(root, export_dir, path, entries[name]["files"]),
                               "inputs": entries[name]["inputs"], "outputs": entries[name]["outputs"]}
                        for name, path in components.items()}
            artifact_set = ArtifactSet(root, set_dir, target.name, precision, components, shapes, "unvalidated",
                                       family=family)
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
        artifact, _ = compile_isolated(backend.__name__, source, precision, options, staging, context)
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


def _copy_pipeline_folder(export_dir: Path, set_dir: Path, components: list[str], index: dict[str, Any]) -> None:
    """Tokenizers, scheduler and a model_index.json beside a target's own artifacts, so the folder loads alone."""
    for folder in export_dir.iterdir():
        if folder.is_dir() and folder.name not in components:
            shutil.copytree(folder, set_dir / folder.name)
    exported = json.loads((export_dir / "model_index.json").read_text(encoding="utf-8"))
    merged = {k: v for k, v in exported.items() if k not in components and k != "_class_name"} | index
    atomic_write_json(set_dir / "model_index.json", merged)
