"""What a build records about itself: the machine, the report's data and the manifest.

Kept apart from the stages so the record of a build is read in one place: everything that ends up in
report.json and manifest.json, and nothing that does work.
"""

from __future__ import annotations

import platform
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import torch

from diffship import __version__
from diffship.host.cpu import cpu_facts
from diffship.models.families import prediction_type
from diffship.models.source import ModelSource
from diffship.recipe import Recipe
from diffship.store import cache
from diffship.store.manifest import MANIFEST_SCHEMA, ArtifactSet
from diffship.validation.baseline import baseline_device, describe
from diffship.validation.recommend import recommended
from diffship.validation.suite import Plan

REPORT_SCHEMA = 1


def weights_of(source: ModelSource) -> dict[str, Any]:
    """How the source's weights were read: a variant upcast to the baseline's precision, a converted single file."""
    precision = str(baseline_device()[1]).removeprefix("torch.").replace("float", "fp")
    said: dict[str, Any] = {}
    if source.variant:
        said = {"variant": source.variant, "weights": f"{source.variant} variant files, upcast to {precision} at load"}
    elif source.kind == "single-file":
        said = {"weights": f"single-file checkpoint converted by diffusers' from_single_file ({source.folder.name})"}
    if source.loras:
        merged = ", ".join(f"{Path(r['path']).name} x{r['scale']:g}" for r in source.loras)
        said |= {"loras": list(source.loras), "weights": (said.get("weights", "") + "; " if said else "")
                 + f"LoRA merged before export: {merged}"}
    if source.controlnets:
        said["controlnets"] = list(source.controlnets)
    return said


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": psutil.cpu_count(logical=True), "memory_bytes": psutil.virtual_memory().total, "cpu": cpu_facts()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def report_data(recipe: Recipe, source: ModelSource, family: str, module_hashes: dict[str, str], plan: Plan,
                 shapes: dict[str, list[int]], entries: dict[str, Any], results: dict[str, Any], hits: dict[str, bool],
                 versions: dict[str, str], passed: bool, seconds: float) -> dict[str, Any]:
    return {
        "schema": REPORT_SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {"spec": source.spec, "kind": source.kind, "family": family, "sha256": cache.key(**module_hashes),
                  **weights_of(source)},
        "baseline": describe(*baseline_device()),
        "machine": machine(),
        "versions": versions,
        "recipe": recipe.model_dump(mode="json"),
        "validation": {"height": plan.height, "width": plan.width, "steps": plan.validation.steps,
                       "guidance_scale": plan.validation.guidance_scale,
                       "parity_cases": [asdict(c) for c in plan.cases]},
        "shapes": shapes,
        "export": {c: {"seconds": e["seconds"], "bytes": sum(f["bytes"] for f in e["files"]),
                       "cached": hits[f"export:{c}"]} for c, e in entries.items()},
        "sets": results,
        "cache": {"hits": sum(hits.values()), "misses": len(hits) - sum(hits.values())},
        "build_seconds": round(seconds, 2),
        "passed": passed,
    }


def build_manifest(recipe: Recipe, source: ModelSource, family: str, module_hashes: dict[str, str], versions: dict[str, str],
              shapes: dict[str, list[int]], sets: dict[str, tuple[ArtifactSet, Any, dict[str, Any]]],
              results: dict[str, Any], hits: dict[str, bool],
              report_files: dict[str, str], passed: bool) -> dict[str, Any]:
    artifacts = {}
    for set_key, (_, _, recorded) in sets.items():
        r = results[set_key]
        if "not_run" in r:  # converted and spec-checked; parity could not run on this machine, so none is claimed
            artifacts[set_key] = {**recorded, "status": "spec-checked" if r["passed"] else "failed",
                                  "validation": {"spec_passed": bool(r["spec"] and r["spec"]["passed"]),
                                                 "parity_passed": None, "not_run": r["not_run"]}}
            continue
        artifacts[set_key] = {
            **recorded, "status": "passed" if r["passed"] else "failed",
            "validation": {"parity_passed": r["parity"]["passed"], "e2e_passed": r["e2e"]["passed"],
                           "min_psnr_db": r["e2e"]["min_psnr_db"], "min_ssim": r["e2e"]["min_ssim"],
                           "identical_images": r["e2e"]["identical"], "images": r["e2e"]["images"],
                           **({"spec_passed": r["spec"]["passed"]} if r.get("spec") else {})},
        }
    return {
        "schema": MANIFEST_SCHEMA,
        "kind": "build",
        "tool": {"name": "diffship", "version": __version__},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": {"model": source.spec, "kind": source.kind, "folder": str(source.folder), "family": family,
                   "prediction_type": prediction_type(source.folder), "sha256": cache.key(**module_hashes),
                   "modules": module_hashes, **weights_of(source)},
        "recipe": recipe.model_dump(mode="json"),
        "versions": versions,
        "shapes": shapes,
        "artifacts": artifacts,
        "cache": {k: "hit" if v else "miss" for k, v in hits.items()},
        "report": report_files,
        **({"generation": generation} if (generation := generation_defaults(recipe)) else {}),
        **({"recommended": best} if (best := recommended(results)) else {}),
        "passed": passed,
    }


def generation_defaults(recipe: Recipe) -> dict[str, Any] | None:
    """The sampling a build was validated with, when its recipe names a scheduler (a few-step LoRA's LCM at 4
    steps): `diffship generate` on the build defaults to it. Without one, generate keeps its own defaults."""
    v = recipe.validation
    if v.scheduler is None:
        return None
    return {"scheduler": v.scheduler, "scheduler_config": dict(v.scheduler_config), "steps": v.steps,
            "guidance_scale": v.guidance_scale}
