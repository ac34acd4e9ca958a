"""The compress stage: the recipe's torch-side steps (prune, distill, QAT / PTQ) run once into the cache; every stage
after it reads the compressed pipeline as an ordinary diffusers folder."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffship.errors import DiffshipError
from diffship.models.source import ModelSource
from diffship.recipe import Recipe
from diffship.stages.compress_run import RECORD_FILE, check_exportable, compress, settings_for
from diffship.store import cache
from diffship.store.artifacts import atomic_write_json
from diffship.store.versions import library_versions
from diffship.validation.suite import Plan

Say = Callable[[str], None]


def compress_stage(recipe: Recipe, source: ModelSource, family: str, plan: Plan, force: bool, hits: dict[str, bool],
                    say: Say) -> tuple[ModelSource, dict[str, Any]]:
    """Run the recipe's compression steps (cached), and hand the compressed pipeline to the stages after."""
    check_exportable(recipe.compress)
    quantized = [f"{t.name}:{p}" for t in recipe.targets for p in t.precisions if p.startswith(("int8", "fp8"))]
    if quantized and any(s.step == "qat" for s in recipe.compress):
        raise DiffshipError(
            f"A qat step already makes the denoiser INT8 (QDQ); {', '.join(quantized)} would quantize it again. "
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
