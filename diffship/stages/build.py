"""Run the stages for a recipe: export -> compile -> validate -> report -> manifest, each stage cached.

The output folder is assembled under a hidden temporary name and renamed into place at the end, so
an interrupted build leaves the previous output (or nothing) where a finished one would be. A
build whose artifacts fail validation still writes its folder, report and manifest (marked failed).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffship.errors import DiffshipError
from diffship.exporters.pipeline import ModuleLoader, cached_export, component_entry, finish_pipeline_folder, select_specs
from diffship.models.components import ComponentSpec, component_specs, native_size
from diffship.models.controlnet import controlnets_in
from diffship.models.families import Family, component_config, detect_family, tasks_of
from diffship.models.lora import LoraSpec
from diffship.models.source import ModelSource, resolve
from diffship.recipe import Recipe
from diffship.runtime.tasks import task_inputs, validated_tasks
from diffship.stages.calibrate import Calibration
from diffship.stages.compile import compile_stage, shapes_fixed
from diffship.stages.provenance import build_manifest, report_data
from diffship.stages.unit import Unit
from diffship.stages.validate import validate_stage
from diffship.store import cache
from diffship.store.artifacts import MANIFEST_NAME, atomic_write_json, prepare_output_dir, staged_dir
from diffship.store.manifest import ArtifactSet
from diffship.store.versions import library_versions
from diffship.targets import get_target
from diffship.targets.calibration import check_calibration
from diffship.validation.baseline import Baseline
from diffship.validation.parity import Case
from diffship.validation.report import write_report
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


def check_targets(recipe: Recipe, installed: bool = True) -> None:
    """Every target installed (unless `installed` is false: a farm's driver, which builds nothing itself) and every
    precision offered, each once, before any work starts."""
    keys = [f"{t.name}-{p}" for t in recipe.targets for p in t.precisions]
    if repeated := sorted({k for k in keys if keys.count(k) > 1}):
        raise DiffshipError(f"The recipe builds {', '.join(repeated)} more than once (one artifact set per target and "
                            "precision); list each precision once, in one [[targets]] entry per target.")
    for target in recipe.targets:
        backend = get_target(target.name, installed)
        unknown = [p for p in target.precisions if p not in backend.PRECISIONS]
        if unknown:
            raise DiffshipError(f"Target {target.name!r} cannot build {', '.join(unknown)} yet; it offers "
                                f"{', '.join(backend.PRECISIONS)}.")
        if installed and hasattr(backend, "preflight"):  # hardware the target needs (a GPU, FP8 kernels), checked before any work
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


@dataclass
class Context:
    """What every stage of one build reads: the resolved (and compressed) model, its components, shapes and plan, the
    modules' content hashes, library versions, the PyTorch baseline (loaded on first use) and the calibration."""

    recipe: Recipe
    source: ModelSource
    family: str
    family_title: str
    specs: list[ComponentSpec]
    shapes: dict[str, list[int]]
    plan: Plan
    module_hashes: dict[str, str]
    versions: dict[str, str]
    baseline: Baseline
    calibration: Calibration
    compressed: dict[str, Any] | None
    hits: dict[str, bool]
    force: bool
    say: Say


@dataclass(frozen=True)
class Outline:
    """The recipe's model resolved and checked: its folder, family, the components to build, shapes and plan."""

    source: ModelSource
    family: Family
    specs: list[ComponentSpec]
    shapes: dict[str, list[int]]
    plan: Plan


def outline(recipe: Recipe, say: Say | None = None, installed: bool = True) -> Outline:
    """Resolve the recipe's model and check everything about the recipe that needs no stage to run (what each target
    can make for this family, components, shapes, calibration settings): bad input fails here, before any work."""
    source = resolve(recipe.model, allow_pickle=recipe.allow_pickle, model_config=recipe.checkpoint_config, say=say,
                     variant=recipe.variant, loras=[LoraSpec(x.path, x.scale) for x in recipe.loras],
                     controlnets=recipe.controlnets)
    family = detect_family(source.folder)
    for target in recipe.targets:  # what a target cannot make for this family, said before any work
        if hasattr(backend := get_target(target.name, installed), "check_family"):
            backend.check_family(family.name, backend.parse_options(target.options))
    specs = select_specs(source.folder, recipe.components)
    needed = [s.name for s in component_specs(source.folder, family) if s.role in GENERATES]
    if missing := [c for c in needed if c not in {s.name for s in specs}]:
        raise DiffshipError(
            f"A build validates images end to end, so it needs {', '.join(needed)}; the recipe leaves out "
            f"{', '.join(missing)}. To export and check single components use `diffship export -c` and `diffship validate`.")
    shapes, plan = plan_shapes(recipe, specs[0], source.folder)
    if any(get_target(t.name, installed).needs_calibration(p) for t in recipe.targets for p in t.precisions):
        check_calibration(recipe.calibration.prompts, recipe.calibration.samples)
    return Outline(source, family, specs, shapes, plan)


def prepare(recipe: Recipe, force: bool, say: Say, installed: bool = True) -> Context:
    """The recipe's outline, compressed when it says so, with everything the stages share (`installed`: whether the
    targets' packages must be here, as for a compile or a validation; an export of a TensorRT row runs anywhere)."""
    o = outline(recipe, say, installed)
    source, family, specs, shapes, plan = o.source, o.family, o.specs, o.shapes, o.plan
    hits: dict[str, bool] = {}
    compressed = None
    if recipe.compress:
        source, compressed = _compress_stage(recipe, source, family.name, plan, force, hits, say)
    versions = library_versions()
    say(f"Hashing {source.spec} ({family.title}) ...")
    module_hashes = {m: cache.folder_hash(source.folder / m)
                     for m in sorted({s.module for s in specs} | set(family.tokenizers) | {"scheduler"})}
    baseline = Baseline(source.folder, recipe.allow_pickle, say, recipe.validation.scheduler,
                        recipe.validation.scheduler_config)
    calibration = Calibration(recipe, plan, baseline, module_hashes, versions, force, hits)
    return Context(recipe, source, family.name, family.title, specs, shapes, plan, module_hashes, versions, baseline,
                   calibration, compressed, hits, force, say)


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
    c = prepare(recipe, force, say)
    with staged_dir(out) as tmp:
        export_dir = tmp / EXPORT_FOLDER
        entries = _export_stage(c, c.specs, export_dir)
        finish_pipeline_folder(c.source, export_dir, c.specs, recipe.export.opset, entries)
        sets = _compile(c, tmp, export_dir, entries)
        results, pairs = _validate(c, sets)
        c.baseline.release()
        passed = all(r["passed"] for r in results.values())
        all_cached = all(c.hits.values())
        report = report_data(recipe, c.source, c.family_title, c.module_hashes, c.plan, c.shapes, entries, results,
                             c.hits, c.versions, passed, time.perf_counter() - started)
        if c.compressed is not None:
            report["compress"] = c.compressed
        say("Writing the report ...")
        written = write_report(report, pairs, tmp / REPORT_FOLDER)
        manifest = build_manifest(recipe, c.source, c.family, c.module_hashes, c.versions, c.shapes, sets, results,
                                  c.hits, {k: p.relative_to(tmp).as_posix() for k, p in written.items()}, passed)
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
    return BuildResult(out, manifest, report, passed, all_cached)


def run_unit(recipe: Recipe, unit: Unit, force: bool = False, say: Say | None = None) -> bool:
    """Run one stage of `recipe`'s build into the cache (a farm task) and whether it was already there.

    The stages it reads (an export for a compile, every compile of the set for its validation) must be cached already
    or are made here; the build folder itself is assembled later by `build()`, from cache hits."""
    say = say or (lambda _: None)
    narrowed = recipe if unit.target is None else recipe.model_copy(update={"targets": [
        t.model_copy(update={"precisions": [unit.precision]}) for t in recipe.targets if t.name == unit.target]})
    if unit.target is not None and not narrowed.targets:
        raise DiffshipError(f"The recipe has no target {unit.target!r}.")
    installed = unit.stage in ("compile", "validate")
    check_targets(narrowed, installed)
    c = prepare(narrowed, force, say, installed)
    if unit.stage == "calibrate":
        c.calibration()
        return c.hits["calibration"]
    specs = [s for s in c.specs if unit.component in (None, s.name)]
    if not specs:
        raise DiffshipError(f"The model has no component {unit.component!r}; it has {', '.join(s.name for s in c.specs)}.")
    if unit.stage == "compress":  # preparing the context ran it
        return c.hits.get("compress", True)
    with tempfile.TemporaryDirectory(prefix="diffship-unit-") as scratch:
        export_dir = Path(scratch) / EXPORT_FOLDER
        entries = _export_stage(c, specs, None if unit.stage == "export" else export_dir)
        if unit.stage == "validate":
            finish_pipeline_folder(c.source, export_dir, c.specs, narrowed.export.opset, entries)
        if unit.stage in ("compile", "validate"):
            sets = _compile(c, Path(scratch), export_dir, entries, assemble=unit.stage == "validate")
        if unit.stage == "validate":
            _validate(c, sets)
            c.baseline.release()
    return all(c.hits.values())


def _compile(c: Context, root: Path, export_dir: Path, entries: dict[str, Any],
             assemble: bool = True) -> dict[str, tuple[ArtifactSet, Any, dict[str, Any]]]:
    return compile_stage(c.recipe, root, export_dir, c.specs, entries, c.shapes, c.family, c.calibration, c.versions,
                         c.force, c.hits, c.say, c.source.folder, (c.plan.height, c.plan.width),
                         tuple((x.batch, x.height, x.width) for x in c.plan.unet_cases or c.plan.cases), assemble)


def _validate(c: Context, sets: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    int8_bar = c.compressed is not None and c.compressed["quantizer"] == "modelopt"
    return validate_stage(c.recipe, c.source, c.specs, sets, c.plan, c.module_hashes, c.versions, c.baseline, c.force,
                          c.hits, c.say, int8_bar)


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


def _export_stage(c: Context, specs: list[ComponentSpec], export_dir: Path | None) -> dict[str, Any]:
    """Each component's ONNX export, copied into `export_dir` (None: only made sure of in the cache)."""
    modules = ModuleLoader(c.source.folder, c.recipe.allow_pickle)
    opset, say = c.recipe.export.opset, c.say
    entries: dict[str, Any] = {}
    for i, spec in enumerate(specs):
        prefix = f"[export {i + 1}/{len(specs)}] {spec.name}"
        done = cached_export(c.source, spec, c.family, c.module_hashes[spec.module], opset, c.versions, modules,
                             export_dir / spec.name if export_dir else None, c.force, say,
                             on_export=lambda p=prefix: say(f"{p}: exporting ..."))
        c.hits[f"export:{spec.name}"] = done.hit
        if export_dir is not None:
            entries[spec.name] = component_entry(export_dir, export_dir / spec.name, done.info["seconds"])
        if done.hit:
            say(f"{prefix}: cached (no work)")
        else:
            size = sum(f["bytes"] for f in entries[spec.name]["files"]) if export_dir else 0
            say(f"{prefix}: done" + (f", {size / 2**20:.1f} MiB" if size else "") + f" in {done.info['seconds']:.1f} s")
    modules.loaded.clear()
    return entries
