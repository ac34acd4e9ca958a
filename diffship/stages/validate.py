"""The validate stage of a build: every artifact set against the PyTorch baseline, each set's result cached.

What all sets are compared with (the UNet's inputs and outputs over the baseline's denoising steps, the baseline's
prompt accuracy) is run once per build, and only when a set that can run here needs it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from diffship.clients import installed_versions
from diffship.models.components import ComponentSpec
from diffship.models.source import ModelSource
from diffship.recipe import Recipe
from diffship.runtime.tasks import inputs_digest
from diffship.stages.context import Context
from diffship.store import cache
from diffship.store.manifest import ArtifactSet
from diffship.targets import get_target
from diffship.validation.accelerated import judge
from diffship.validation.baseline import Baseline, baseline_device
from diffship.validation.quality import quality_task
from diffship.validation.recorded_store import load_record, save_record
from diffship.validation.reference import LiveReference, RecordedReference, choose_staged
from diffship.validation.suite import Plan, baseline_quality, denoiser_trajectory, task_samples, validate_set

Say = Callable[[str], None]


class BaselineRuns:
    """What every artifact set is compared with, run once per build and only when a set needs it: the UNet's inputs
    and outputs over the baseline's denoising steps, the baseline's prompt accuracy (digits-sd), and the baseline
    itself: the live pipeline, or (staged) everything recorded in one pass and the pipeline freed."""

    def __init__(self, recipe: Recipe, source: ModelSource, specs: list[ComponentSpec], plan: Plan, baseline: Baseline,
                 say: Say, record_key: str | None = None, force: bool = False):
        """Staged when `record_key` is given: the cache key of the recording."""
        self.recipe, self.source, self.specs, self.plan, self.baseline, self.say = recipe, source, specs, plan, baseline, say
        self.checks_quality = plan.validation.quality.enabled and quality_task(source.folder) == "digits"
        self._trajectory: dict[str, Any] | None = None
        self._quality: dict[str, Any] | None = None
        staged = record_key is not None
        self.recorded = RecordedReference(baseline, source.folder, plan, recipe.allow_pickle) if staged else None
        self.record_key, self.force = record_key, force

    def reference(self) -> LiveReference | RecordedReference:
        """The baseline a set is compared with; staged, recorded on first use (after the trajectory and quality
        baseline, which need the pipeline too) and the pipeline freed. The recording is a cache entry: a later build
        on the same model and validation settings reads it instead of running the pipeline."""
        if self.recorded is None or self.record_key is None:
            return LiveReference(self.baseline.get(), self.source.folder, self.plan, self.recipe.allow_pickle)
        if not self.recorded.recorded:
            recorded, samples = self.recorded, task_samples(self.plan)

            def produce(folder: Path, info: dict[str, Any]) -> None:
                trajectory, quality = self.trajectory(), self.quality()  # before the recording frees the pipeline
                recorded.record(self.specs, samples, self.say)
                save_record(folder, trajectory, quality, recorded.outputs_recorded, recorded.images_recorded)

            done = cache.cached_step("baseline", self.record_key, "baseline record", produce, force=self.force,
                                     say=self.say)
            if done.hit:
                self._trajectory, self._quality, outputs, images = load_record(done.path)
                recorded.restore(outputs, images, samples, self.say)
        return self.recorded

    def trajectory(self) -> dict[str, Any]:
        if self._trajectory is None:
            denoiser = next(s for s in self.specs if s.is_denoiser)
            self.say(f"[validate] capturing the {denoiser.name}'s inputs over {self.plan.validation.steps} denoising "
                     "steps of the baseline")
            self._trajectory = denoiser_trajectory(self.baseline.get(), denoiser, self.plan, self.source.folder,
                                                   self.recipe.allow_pickle)
        return self._trajectory

    def quality(self) -> dict[str, Any] | None:
        if self.checks_quality and self._quality is None:
            self._quality = baseline_quality(self.baseline.get(), self.plan, self.say)
        return self._quality


def _validate_into(runs: BaselineRuns, artifact_set: ArtifactSet, options: Any, plan: Plan, not_run: str | None,
                   staging: Path, info: dict[str, Any]) -> None:
    """Validate one set (against the baseline unless it cannot run here) and keep its results and image pairs."""
    can_run = not_run is None
    reference = runs.reference() if can_run else None
    result, set_pairs = validate_set(artifact_set, runs.specs, reference, runs.source.folder, plan, options,
                                     runs.recipe.allow_pickle, runs.say, runs.trajectory() if can_run else None,
                                     runs.quality() if can_run else None)
    if runs.recorded is not None:
        runs.recorded.release()  # a set that needed something not recorded loaded the pipeline again
        result["baseline_held"] = "recorded once, then freed (staged validation)"
    (staging / "result.json").write_text(json.dumps(result), encoding="utf-8")
    empty = np.zeros((0, 1, 1, 3), np.uint8)
    np.savez_compressed(staging / "images.npz",
                        baseline=np.stack([p["baseline"] for p in set_pairs]) if set_pairs else empty,
                        target=np.stack([p["target"] for p in set_pairs]) if set_pairs else empty)
    info |= {"set": f"{artifact_set.target}-{artifact_set.precision}"}


def validate_stage(c: Context, sets: dict[str, tuple[ArtifactSet, Any, dict[str, Any]]]
                   ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Validate every set; a UNet that QAT made INT8 QDQ (modelopt) is judged by the int8 bar whatever the set's
    name."""
    recipe, source, specs, plan, say = c.recipe, c.source, c.specs, c.plan, c.say
    int8_bar = c.compressed is not None and c.compressed["quantizer"] == "modelopt"
    staged, why = choose_staged(recipe.validation.staged, source.folder)
    if staged:
        say(f"[validate] staged: the baseline is recorded once and freed before each set loads ({why})")
    device, dtype = baseline_device()
    # What the baseline's outputs and every set's results both depend on.
    compared = {"weights": c.module_hashes, "resolution": [plan.height, plan.width],
                "cases": [asdict(case) for case in plan.cases],
                "tasks": list(plan.tasks), "task_inputs": inputs_digest(plan.inputs) if plan.inputs else None,
                "baseline": [device, str(dtype)], "versions": c.versions}
    # Not the latency settings: the recording does not keep the pipeline's timings.
    record_key = cache.key(stage="baseline", components=[s.name for s in specs],
                           validation=recipe.validation.model_dump(mode="json", exclude={"latency", "staged"}),
                           denoiser_cases=[asdict(case) for case in plan.denoiser_cases or ()], **compared)
    runs = BaselineRuns(recipe, source, specs, plan, c.baseline, say, record_key if staged else None, c.force)
    results: dict[str, Any] = {}
    pairs: dict[str, list[dict[str, Any]]] = {}
    for set_key, (artifact_set, options, recorded) in sets.items():
        set_plan = replace(plan, threshold=recipe.threshold("int8" if int8_bar else artifact_set.precision))
        backend = get_target(artifact_set.target)
        # A set that cannot run on this machine (Core ML off macOS) is checked without the baseline's help.
        not_run = backend.prediction_unavailable()
        entry_key = cache.key(not_run=not_run,
            stage="validate", artifacts={n: [f["sha256"] for f in e["files"]] for n, e in recorded["components"].items()},
            pipeline=[f["sha256"] for f in recorded["pipeline_files"]], options=repr(options),
            validation=recipe.validation.model_dump(mode="json"), threshold=set_plan.threshold.model_dump(),
            # what the accelerations' rows measured; not the budget, which judges them after (judge, below)
            accelerations=recipe.accelerations.model_dump(mode="json"),
            clients=installed_versions(recipe.validation.clients), **compared)
        done = cache.cached_step("validate", entry_key, f"{set_key} validation",
                                 functools.partial(_validate_into, runs, artifact_set, options, set_plan, not_run),
                                 force=c.force, say=say)
        result = json.loads((done.path / "result.json").read_text(encoding="utf-8"))
        with np.load(done.path / "images.npz") as images:
            pairs[set_key] = [{"baseline": images["baseline"][i], "target": images["target"][i], **sample}
                              for i, sample in enumerate([*result.get("e2e", {}).get("samples", []),
                                                          *result.get("extra_pairs", [])])]
        if "accelerations" in result:  # judged by this build's budget, measured now or by an earlier build
            judge(result["accelerations"], recipe.budget, result)
        c.hits[f"validate:{set_key}"] = done.hit
        if done.hit:
            say(f"[validate {set_key}] cached (no work): results of {done.info['created']}")
        results[set_key] = {**result, "cached": done.hit}
        verdict = "passed" if result["passed"] else "FAILED"
        if "not_run" in result:
            verdict = "spec checks passed; parity not run" if result["passed"] else "FAILED"
        say(f"[validate {set_key}] {verdict}")
    return results, pairs
