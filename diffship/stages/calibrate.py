"""The calibration stage: the UNet's (and text encoders') inputs captured from the PyTorch baseline at the recipe's
steps, once per distinct recipe, and kept in the cache for every quantized target that needs them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from diffship.models.components import cache_specs, component_specs, run_torch
from diffship.models.families import detect_family
from diffship.recipe import Recipe
from diffship.runtime.tasks import inputs_digest
from diffship.store import cache
from diffship.targets.calibration import CalibrationData, CalibrationFile
from diffship.validation.baseline import Baseline, reference_module, task_pipeline
from diffship.validation.capture import capture
from diffship.validation.suite import Plan


class Calibration:
    """The calibration inputs, captured from the baseline once per distinct recipe and kept in the cache."""

    def __init__(self, recipe: Recipe, plan: Plan, baseline: Baseline, module_hashes: dict[str, str],
                 versions: dict[str, str], force: bool, hits: dict[str, bool]):
        c = recipe.calibration
        self.settings: dict[str, Any] = {
            "prompts": c.prompts, "samples": c.samples, "steps": c.steps_for(recipe.validation.steps),
            "height": plan.height, "width": plan.width, "guidance_scale": plan.validation.guidance_scale,
            "task": plan.tasks[0], "scheduler": [recipe.validation.scheduler, recipe.validation.scheduler_config]}
        if depth := recipe.accelerations.cache_depth:  # its graphs' inputs too, the shallow one's features with them
            self.settings["deep_cache_depth"] = depth
        self.key = cache.key(stage="calibration", weights=module_hashes, **self.settings, versions=versions,
                             task_inputs=inputs_digest(plan.inputs) if plan.inputs is not None and (
                                 plan.task_kwargs() or "controlnet" in plan.tasks) else None)
        self.baseline, self.force, self.hits, self.plan = baseline, force, hits, plan
        self.data: CalibrationData | None = None

    def __call__(self) -> CalibrationData:
        if self.data is not None:
            return self.data
        done = cache.cached_step("calibration", self.key, "calibration capture", self._capture, force=self.force,
                                 say=self.baseline.say)
        if done.hit:
            self.baseline.say("[calibration] cached (no work)")
        self.hits["calibration"] = done.hit
        self.path = done.path / "inputs.npz"
        data = self.data = CalibrationData.load(self.path, done.info)
        return data

    def as_file(self) -> CalibrationFile:
        """The captured inputs by their cache file (captured first if need be), for a compile in a child process."""
        data = self()
        return CalibrationFile(self.path, data.info)

    def _capture(self, staging: Path, info: dict[str, Any]) -> None:
        s = self.settings
        self.baseline.say(f"[calibration] capturing {s['samples']} denoiser calls from {s['steps']}-step generations "
                          f"of {len(s['prompts'])} prompt(s) at {s['height']}x{s['width']} ...")
        began = time.perf_counter()
        data = capture(self.baseline.get(), s["prompts"], s["samples"], s["steps"], s["height"], s["width"],
                       s["guidance_scale"], task_kwargs=self.plan.task_kwargs())
        if "controlnet" in self.plan.tasks:  # the UNet variant's inputs with the ControlNets' residuals

            self.baseline.say("[calibration] and the controlled denoiser's, with the ControlNets' residuals ...")
            controlled = task_pipeline(self.baseline.get(), detect_family(self.baseline.folder), "controlnet",
                                       self.baseline.folder, self.baseline.allow_pickle)
            more = capture(controlled, s["prompts"], s["samples"], s["steps"], s["height"], s["width"],
                           s["guidance_scale"], with_vae=False, task_kwargs=self.plan.task_kwargs("controlnet"))
            controlled_name = detect_family(self.baseline.folder).denoiser.controlled
            data.inputs[controlled_name] = more.inputs[controlled_name]
        if depth := s.get("deep_cache_depth"):
            self.baseline.say("[calibration] and deep-feature caching's graphs', their features computed on each call")
            data.inputs |= cache_inputs(self.baseline.get(), self.baseline.folder, data.inputs, depth,
                                         self.baseline.allow_pickle)
        data.save(staging / "inputs.npz")
        info |= {**data.info, "task": s["task"], "seconds": round(time.perf_counter() - began, 1)}
        self.baseline.say(f"[calibration] captured in {info['seconds']:.0f} s")
        self.baseline.release()  # quantization that follows needs the memory more than the baseline does


def cache_inputs(pipe: Any, folder: Path, captured: dict[str, list[dict[str, Any]]],
                 depth: int, allow_pickle: bool) -> dict[str, list[dict[str, Any]]]:
    """Calibration inputs of deep-feature caching's graphs from the denoiser's captured calls: the caching graph takes
    the same inputs, the shallow one those and the deep features the caching graph computes on each call."""
    spec = next(s for s in component_specs(folder) if s.is_denoiser)
    caching, shallow = cache_specs(spec, folder, depth)
    calls = captured[spec.name]
    reference = reference_module(pipe, caching, folder, allow_pickle)
    features = [run_torch(reference, caching, call)["cached_features"] for call in calls]
    return {caching.name: calls, shallow.name: [call | {"cached_features": f} for call, f in zip(calls, features,
                                                                                                  strict=True)]}
