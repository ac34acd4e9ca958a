"""`diffship lora apply`: a new build folder from an existing one with LoRAs merged into its weights by patching the
artifacts' stored weights (no export, no compile), each patched component checked against the merged PyTorch one.

Only the weights a LoRA changes are written; everything else is copied byte for byte from the verified build. Sets
whose weights are quantized are refused (their scales were calibrated for the old weights: re-quantize by
rebuilding), as are targets that cannot patch in place (each says why in its `PATCH_REFUSAL`).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffship.errors import DiffshipError
from diffship.models.components import ComponentSpec, component_specs, modules_used, with_cache_specs, wrap
from diffship.models.families import detect_family
from diffship.models.loading import load_component
from diffship.models.lora import LoraSpec, check_file, lora_targets
from diffship.models.source import ModelSource, recipe_source
from diffship.recipe import LoraRecipe, Recipe
from diffship.stages.provenance import weights_of
from diffship.store import cache
from diffship.store.artifacts import (
    MANIFEST_NAME,
    atomic_write_json,
    atomic_write_text,
    clone_file,
    prepare_output_dir,
    read_json,
    sha256_file,
    staged_dir,
)
from diffship.store.manifest import SetRecord, open_artifacts, read_manifest
from diffship.targets import get_target
from diffship.targets.weight_patch import Change, patch_refusal
from diffship.validation.parity import Tolerance, artifact_cases, check_component, module_reference

Say = Callable[[str], None]
REPORT_FOLDER = "report"


@dataclass(frozen=True)
class ApplyResult:
    """Where the new build went, its manifest and report, and whether every patched component passed."""

    out: Path
    manifest: dict[str, Any]
    report: dict[str, Any]
    passed: bool


def choose_sets(sets: dict[str, SetRecord], wanted: list[dict[str, Any]] | None) -> dict[str, SetRecord]:
    """The sets to patch (all, or those `wanted` names); any that cannot be patched is an error naming the reason
    and the `--targets` that would leave it out."""
    chosen = {k: s for k, s in sets.items() if wanted is None or any(
        w["name"] == s.target and (not w.get("precisions") or s.precision in w["precisions"]) for w in wanted)}
    if not chosen:
        raise DiffshipError(f"The build has no such artifact set; it has {', '.join(sets)}.")
    refused = {k: r for k, s in chosen.items() if (r := patch_refusal(s.target, s.precision))}
    if refused:
        able = [f"{s.target}:{s.precision}" for k, s in chosen.items() if k not in refused]
        hint = f" Pass --targets {','.join(able)} to patch the others." if able else ""
        raise DiffshipError("Cannot swap LoRAs into " + "; ".join(f"{k} ({r})" for k, r in refused.items()) + "." + hint)
    return chosen


def _weight(module: torch.nn.Module, name: str) -> np.ndarray:
    weight = module.get_submodule(name).weight
    assert isinstance(weight, torch.Tensor)
    return weight.detach().numpy()


def weight_changes(before: Path, after: Path, loras: list[LoraSpec], components: list[str],
                   allow_pickle: bool) -> tuple[dict[str, list[Change]], dict[str, Any]]:
    """Per component, each weight the new LoRAs touch, before (the build's model) and after (merged); and the merged
    PyTorch components, the reference the patched artifacts are checked against."""
    modules = {name: load_component(before, name, allow_pickle) for name in components}
    denoiser = detect_family(before).denoiser.component
    touched: dict[str, set[str]] = {}
    for spec in loras:
        for component, name, _ in lora_targets(modules, spec, denoiser, allow_pickle):
            touched.setdefault(component, set()).add(name)
    old = {c: {n: _weight(modules[c], n).copy() for n in names}
           for c, names in touched.items()}
    del modules
    gc.collect()
    merged = {c: load_component(after, c, allow_pickle) for c in touched}
    changes = {c: [Change(f"{c}:{n}", old[c][n], _weight(merged[c], n))
                   for n in sorted(names)] for c, names in touched.items()}
    return changes, merged


def _copy_files(build: Path, out: Path, paths: list[str]) -> None:
    for rel in paths:
        if not (out / rel).exists():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            clone_file(build / rel, out / rel)


def apply_loras(build: Path, loras: list[LoraSpec], out: Path, wanted: list[dict[str, Any]] | None = None,
                say: Say | None = None) -> ApplyResult:
    """Patch `loras` into the sets of the build folder `build` (all, or `wanted`) and write a checked build to `out`."""
    say = say or (lambda _: None)
    started = time.perf_counter()
    build, out = build.resolve(), out.resolve()
    manifest = read_manifest(build)
    raw = read_json(build / MANIFEST_NAME)
    if manifest.kind != "build":
        raise DiffshipError(f"{build} is an export, not a build folder: `diffship lora apply` patches the output of "
                            "`diffship build`.")
    if out == build or build in out.parents:
        raise DiffshipError(f"--out {out} must be a new folder outside the build it patches ({build}).")
    if not loras:
        raise DiffshipError("Name at least one LoRA to apply: --lora PATH[:SCALE].")
    recipe = Recipe.model_validate(raw["recipe"])
    if recipe.compress:
        raise DiffshipError(f"{build} was compressed (pruned or quantized in PyTorch) before export, so its weights are "
                            "not the model's: rebuild with --lora.")
    for spec in loras:
        check_file(spec.path, recipe.allow_pickle)
    sets = choose_sets(manifest.sets(), wanted)
    opened = {k: open_artifacts(build, s.target, s.precision, verify=True) for k, s in sets.items()}
    prepare_output_dir(out, overwrite=False)

    before, after = recipe_source(recipe, [], say), recipe_source(recipe, loras, say)
    specs = {s.name: s for s in with_cache_specs(component_specs(after.folder), after.folder,
                                                        recipe.accelerations.cache_depth)}
    weighted = [m for m in dict.fromkeys(s.module for s in specs.values() if s.role in ("denoiser", "text_encoder"))]
    say(f"Finding the weights {len(loras)} LoRA(s) change ...")
    changes, merged = weight_changes(before.folder, after.folder, loras, weighted, recipe.allow_pickle)
    new_recipe = recipe.model_copy(update={"loras": [*recipe.loras, *(LoraRecipe(path=s.path, scale=s.scale)
                                                                         for s in loras)]})
    from diffship.stages.context import plan_shapes  # start-up time: onnx

    _, plan = plan_shapes(new_recipe, next(iter(specs.values())), after.folder)
    results: dict[str, Any] = {}
    records: dict[str, Any] = {}
    with staged_dir(out) as tmp:
        for key, record in sets.items():
            artifact_set, backend = opened[key], get_target(record.target)
            options = backend.parse_options(artifact_set.options) if artifact_set.options else None
            threshold = new_recipe.threshold(record.precision)
            tolerance = Tolerance(threshold.min_cosine, threshold.max_rel_l2)
            entry = raw["artifacts"][key]
            patched, parity = {}, {}
            for component, component_record in record.components.items():
                module = specs[component].module if component in specs else component
                if module in changes:
                    wanted_changes = changes[module]
                    if component in specs and specs[component].role == "shallow_denoiser":  # holds part of the UNet
                        used = modules_used(specs[component], merged[module])
                        wanted_changes = [c for c in wanted_changes if c.name.split(":", 1)[1] in used]
                    say(f"[patch {key}] {component}: {len(wanted_changes)} weights")
                    landed = backend.patch_weights(build / component_record.path, tmp / component_record.path,
                                                   wanted_changes)
                    patched[component] = len(landed)
                _copy_files(build, tmp, [f.path for f in component_record.files])
                if module in changes:
                    entry["components"][component]["files"] = [
                        {"path": f.path, "bytes": (tmp / f.path).stat().st_size, "sha256": sha256_file(tmp / f.path)}
                        for f in component_record.files]
                    parity[component] = _check(specs[component], merged[module], backend,
                                               tmp / component_record.path, options, record.precision, tolerance, plan)
                    say(f"[validate {key}] {component}: {'pass' if parity[component]['passed'] else 'FAIL'}")
            _copy_files(build, tmp, [f.path for f in record.pipeline_files])
            passed = all(p["passed"] for p in parity.values())
            results[key] = {"patched": patched, "parity": parity, "tolerance": asdict(tolerance), "passed": passed}
            records[key] = {**entry, "status": "passed" if passed else "failed",
                            "validation": {"parity_passed": passed, "lora_apply": True}}
        passed = all(r["passed"] for r in results.values())
        report = _report(build, raw, loras, results, passed, time.perf_counter() - started)
        atomic_write_json(tmp / REPORT_FOLDER / "report.json", report)
        atomic_write_text(tmp / REPORT_FOLDER / "report.md", _markdown(report))
        new_manifest = _manifest(raw, after, new_recipe, records, report, passed)
        atomic_write_json(tmp / MANIFEST_NAME, new_manifest)
    return ApplyResult(out, new_manifest, report, passed)


def _check(spec: ComponentSpec, module: Any, backend: Any, artifact: Path, options: Any, precision: str,
           tolerance: Tolerance, plan: Any) -> dict[str, Any]:
    """Parity of one patched component against its merged PyTorch module at the build's validation resolution."""
    cases = (plan.denoiser_cases or plan.cases)[:1] if spec.is_denoiser else plan.cases[:1]
    runner = backend.load(artifact, options, precision)
    try:
        return check_component(spec, module_reference(spec, wrap(spec, module)), runner, tolerance,
                               artifact_cases(backend, spec, artifact, cases))
    finally:
        del runner
        gc.collect()


def _report(build: Path, raw: dict[str, Any], loras: list[LoraSpec], results: dict[str, Any], passed: bool,
            seconds: float) -> dict[str, Any]:
    hashes = cache.file_hashes([s.path for s in loras])
    return {"kind": "lora-apply", "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "from": {"build": str(build), "created": raw.get("created"), "model": raw["source"]["model"]},
            "loras": [{"path": str(s.path), "sha256": h, "scale": s.scale} for s, h in zip(loras, hashes, strict=True)],
            "sets": results, "seconds": round(seconds, 2), "passed": passed}


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"# LoRA swap: {report['from']['model']}", "",
             f"Patched from `{report['from']['build']}` (built {report['from']['created']}) in {report['seconds']:.1f} s; "
             + ("**passed**" if report["passed"] else "**FAILED**") + ".", "",
             "LoRAs: " + ", ".join(f"`{Path(x['path']).name}` x{x['scale']:g} (sha256 {x['sha256'][:12]})"
                                   for x in report["loras"]), "",
             "| set | component | weights patched | batch | resolution | cosine | rel L2 | verdict |",
             "|---|---|---:|---:|---|---:|---:|---|"]
    for key, r in report["sets"].items():
        for component, p in r["parity"].items():
            for case in p["cases"]:
                worst = min(case["outputs"].values(), key=lambda m: m["cosine"])
                lines.append(f"| {key} | {component} | {r['patched'][component]} | {case['batch']} | "
                             f"{case['height']}x{case['width']} | {worst['cosine']:.7f} | {worst['rel_l2']:.2e} | "
                             f"{'pass' if case['passed'] else 'FAIL'} |")
    lines += ["", "Each patched component is compared with the PyTorch component with the same LoRAs merged; the "
              "components a LoRA does not touch are the build's files, unchanged (their hashes are the build's)."]
    return "\n".join(lines) + "\n"


def _manifest(raw: dict[str, Any], after: ModelSource, recipe: Recipe, records: dict[str, Any],
              report: dict[str, Any], passed: bool) -> dict[str, Any]:
    modules = {m: cache.folder_hash(after.folder / m) for m in raw["source"].get("modules", {})}
    source = {k: v for k, v in raw["source"].items() if k not in ("loras", "weights", "variant")}
    source |= {"folder": str(after.folder), "modules": modules, "sha256": cache.key(**modules), **weights_of(after)}
    raw = {k: v for k, v in raw.items() if k != "recommended"}  # measured on the weights before the LoRA
    return {**raw, "created": report["created"], "source": source, "recipe": recipe.model_dump(mode="json"),
            "artifacts": records, "cache": {},
            "lora_apply": {"from": report["from"], "loras": report["loras"], "seconds": report["seconds"],
                           "patched": {k: r["patched"] for k, r in report["sets"].items()}},
            "report": {"json": f"{REPORT_FOLDER}/report.json", "markdown": f"{REPORT_FOLDER}/report.md"},
            "passed": passed}
