"""Run the stages for a recipe: export -> compile -> validate -> report -> manifest, each stage cached.

The output folder is assembled under a hidden temporary name and renamed into place at the end, so
an interrupted build leaves the previous output (or nothing) where a finished one would be. A
build whose artifacts fail validation still writes its folder, report and manifest (marked failed).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffship.errors import DiffshipError
from diffship.exporters.pipeline import finish_pipeline_folder
from diffship.host.memory import memory_limit
from diffship.recipe import Recipe
from diffship.stages.compile import compile_stage
from diffship.stages.context import Say, check_targets, prepare
from diffship.stages.export import EXPORT_FOLDER, export_stage
from diffship.stages.preflight import check_memory
from diffship.stages.provenance import build_manifest, report_data
from diffship.stages.unit import Unit
from diffship.stages.validate import validate_stage
from diffship.store import cache
from diffship.store.artifacts import MANIFEST_NAME, atomic_write_json, prepare_output_dir, staged_dir
from diffship.validation.recommend import recommended
from diffship.validation.report import write_report

REPORT_FOLDER = "report"


@dataclass(frozen=True)
class BuildResult:
    """Where the build went, what it recorded, and whether every artifact passed."""

    out: Path
    manifest: dict[str, Any]
    report: dict[str, Any]
    passed: bool
    all_cached: bool


def build(recipe: Recipe, out: Path, force: bool = False, say: Say | None = None) -> BuildResult:
    """Build, validate and report every target of `recipe` into `out` (within the recipe's `memory_gib`, which every
    stage's choice between holding weights whole and streaming them plans on)."""
    with memory_limit(recipe.memory_gib):
        return _build(recipe, out, force, say)


def _build(recipe: Recipe, out: Path, force: bool = False, say: Say | None = None) -> BuildResult:
    say = say or (lambda _: None)
    started = time.perf_counter()
    check_targets(recipe)
    if (reason := cache.unwritable_reason()) is not None:
        say(f"The cache {cache.cache_root()} cannot be written ({reason}): building without it (stages it does not "
            "already hold run, and nothing is stored).")
    out = out.resolve()
    prepare_output_dir(out, overwrite=True)
    c = prepare(recipe, force, say)
    check_memory(c)
    with staged_dir(out) as tmp:
        export_dir = tmp / EXPORT_FOLDER
        entries = export_stage(c, c.specs, export_dir)
        finish_pipeline_folder(c.source, export_dir, c.specs, recipe.export.opset, entries)
        sets = compile_stage(c, tmp, export_dir, entries)
        results, pairs = validate_stage(c, sets)
        c.baseline.release()
        passed = all(r["passed"] for r in results.values())
        all_cached = all(c.hits.values())
        report = report_data(recipe, c.source, c.family_title, c.module_hashes, c.plan, c.shapes, entries, results,
                             c.hits, c.versions, passed, time.perf_counter() - started)
        if c.compressed is not None:
            report["compress"] = c.compressed
        if best := recommended(results):
            report["recommended"] = best
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
    with memory_limit(recipe.memory_gib):
        return _run_unit(narrowed, unit, force, say, installed)


def _run_unit(narrowed: Recipe, unit: Unit, force: bool, say: Say, installed: bool) -> bool:
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
        entries = export_stage(c, specs, None if unit.stage == "export" else export_dir)
        if unit.stage == "validate":
            finish_pipeline_folder(c.source, export_dir, c.specs, narrowed.export.opset, entries)
        if unit.stage in ("compile", "validate"):
            sets = compile_stage(c, Path(scratch), export_dir, entries, assemble=unit.stage == "validate")
        if unit.stage == "validate":
            validate_stage(c, sets)
            c.baseline.release()
    return all(c.hits.values())
