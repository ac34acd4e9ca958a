"""What artifact sets are compared with: the PyTorch pipeline run live beside each set (interleaved validation), or
its outputs recorded once per build and the pipeline freed before any set loads (staged validation).

Both answer the same questions with the same code on the same inputs, so a set's parity values and images do not
depend on the mode; staged validation holds the baseline and an artifact set in memory one after the other instead
of together, which is what lets a full-size SDXL build validate on a 24 GiB machine.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from diffship.models.components import ComponentSpec, run_torch
from diffship.models.families import detect_family
from diffship.runtime.pipeline import Generation
from diffship.validation import latency
from diffship.validation.baseline import Baseline, reference_module, run_baseline, task_pipeline
from diffship.validation.e2e import LatentSpace, Sample, sample_arguments
from diffship.validation.parity import Case

Say = Callable[[str], None]
# Staged when the baseline and one artifact set of the same size would not fit together with room for activations:
# measured peaks are about 2.5 times the weights when both are loaded (docs/performance.md, issue 23).
STAGED_ABOVE = 2.5


class LiveReference:
    """The PyTorch pipeline, run whenever a set asks for a baseline output (interleaved validation)."""

    staged = False

    def __init__(self, pipe: Any, folder: Path, plan: Any, allow_pickle: bool = False):
        self.pipe, self.folder, self.plan, self.allow_pickle = pipe, folder, plan, allow_pickle
        self._pipes: dict[str, Any] = {}
        self._bf16: dict[str, Any] = {}

    def outputs(self, spec: ComponentSpec, case: Case, seed: int) -> dict[str, np.ndarray]:
        """The FP32 module's outputs on the seeded inputs parity uses for `case`."""
        inputs = spec.sample_inputs(case.batch, case.height, case.width, seed=seed)
        return run_torch(reference_module(self.pipe, spec, self.folder, self.allow_pickle), spec, inputs)

    def generation(self, s: Sample, latents: Any) -> Generation:
        """The baseline's image for one end-to-end sample, from the given initial latents."""
        return run_baseline(self._task_pipe(s.task), s.prompt, s.negative_prompt, s.height, s.width, s.steps,
                            s.guidance_scale, s.seed, latents, task=s.task, inputs=self.plan.inputs)


    def _task_pipe(self, task: str) -> Any:
        if task not in self._pipes:
            self._pipes[task] = task_pipeline(self.pipe, detect_family(self.folder), task, self.folder, self.allow_pickle)
        return self._pipes[task]

    def bf16_generation(self, s: Sample, latents: Any) -> Generation:
        """The sample through a BF16 copy of the task's pipeline (the whole-image headline's second baseline: what
        PyTorch gives with no export at all), made on first use."""
        if s.task not in self._bf16:
            # the whole pipeline copied, so its registered options (SDXL's force_zeros, the refiner's aesthetic score)
            # stay; the copy lives as long as this reference, one set's validation
            self._bf16[s.task] = copy.deepcopy(self._task_pipe(s.task)).to(torch.bfloat16)
        return run_baseline(self._bf16[s.task], s.prompt, s.negative_prompt, s.height, s.width, s.steps,
                            s.guidance_scale, s.seed, latents, task=s.task, inputs=self.plan.inputs)


class RecordedReference:
    """The baseline's outputs for every parity case and end-to-end sample, recorded by a LiveReference in one pass
    (plus its whole-pipeline timings) before the pipeline is freed (staged validation).

    A set that asks for something not recorded (a target that picks its own parity shapes) gets it live: the pipeline
    is loaded again for that set and freed after it (`release`)."""

    staged = True

    def __init__(self, baseline: Baseline, folder: Path, plan: Any, allow_pickle: bool = False):
        self.baseline, self.folder, self.plan, self.allow_pickle = baseline, folder, plan, allow_pickle
        self._outputs: dict[tuple[str, Case, int], dict[str, np.ndarray]] = {}
        self._images: dict[Sample, tuple[Any, Generation]] = {}
        self.pipeline_timings: list[dict[str, Any]] = []
        self.recorded = False

    def record(self, specs: list[ComponentSpec], samples: list[Sample], say: Say) -> None:
        """Run the baseline once for everything the plan compares: parity cases, samples, pipeline latency."""
        if self.recorded:
            return
        live = self._live()
        say(f"[validate] recording the baseline: parity cases of {len(specs)} components, {len(samples)} image(s)")
        for spec in specs:
            cases = self.plan.denoiser_cases if spec.is_denoiser and self.plan.denoiser_cases else self.plan.cases
            for i, case in enumerate(cases):
                self._outputs[(spec.name, case, i)] = live.outputs(spec, case, i)
        space = LatentSpace.of_folder(self.folder)
        for s in samples:
            latents, _ = sample_arguments(s, space, self.plan.inputs)
            self._images[s] = (latents, live.generation(s, latents))
        self.recorded = True
        self.time_pipeline(samples, say)

    def restore(self, outputs: dict[tuple[str, Case, int], dict[str, np.ndarray]],
                images: dict[Sample, tuple[Any, Generation]], samples: list[Sample], say: Say) -> None:
        """Take what an earlier run recorded (recorded_store) and time the pipeline here: timings are never reused."""
        self._outputs, self._images, self.recorded = dict(outputs), dict(images), True
        say(f"[validate] the baseline's outputs recorded by an earlier run: {len(outputs)} parity case(s), "
            f"{len(images)} image(s)")
        self.time_pipeline(samples, say, cold=True)

    @property
    def outputs_recorded(self) -> dict[tuple[str, Case, int], dict[str, np.ndarray]]:
        return self._outputs

    @property
    def images_recorded(self) -> dict[Sample, tuple[Any, Generation]]:
        return self._images

    def time_pipeline(self, samples: list[Sample], say: Say, cold: bool = False) -> None:
        """The whole pipeline's timings on the first sample (when latency is on), then the pipeline freed. A pipeline
        that just generated the samples is warm; one loaded only for this (`cold`) gets one warm-up run whatever
        the recipe says."""
        lat = self.plan.validation.latency
        warmup = 1 if cold else min(lat.warmup, 1)
        if lat.enabled and samples:
            s = samples[0]
            latents, _ = sample_arguments(s, LatentSpace.of_folder(self.folder), self.plan.inputs)
            live = self._live()
            say(f"[validate] baseline pipeline latency: {warmup} warm-up + {lat.pipeline_runs} timed run(s), measured "
                "here (the sets' runs are timed in their own stage)")
            self.pipeline_timings += latency.after_warmup(lambda: live.generation(s, latents).timings, warmup,
                                                          lat.pipeline_runs)
        self.release()

    def outputs(self, spec: ComponentSpec, case: Case, seed: int) -> dict[str, np.ndarray]:
        key = (spec.name, case, seed)
        if key not in self._outputs:
            self._outputs[key] = self._live().outputs(spec, case, seed)
        return self._outputs[key]

    def generation(self, s: Sample, latents: Any) -> Generation:
        recorded = self._images.get(s)
        same = recorded is not None and (latents is None if recorded[0] is None else
                                         latents is not None and np.array_equal(np.asarray(recorded[0]),
                                                                                 np.asarray(latents)))
        if not same:
            self._images[s] = (latents, self._live().generation(s, latents))
        return self._images[s][1]

    def release(self) -> None:
        """Free the PyTorch pipeline (the recorded outputs stay)."""
        self.baseline.release()  # gives the freed memory back too

    def _live(self) -> LiveReference:
        return LiveReference(self.baseline.get(), self.folder, self.plan, self.allow_pickle)


def weights_bytes(folder: Path) -> int:
    """Bytes of the model's weight files (what the PyTorch baseline holds in memory, in FP32)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())


def choose_staged(setting: bool | str, folder: Path) -> tuple[bool, str]:
    """Whether to stage validation and why: the recipe's `staged`, or for "auto" whether the baseline and a set of
    the same size would outgrow this machine's memory."""
    if setting != "auto":
        return bool(setting), f"the recipe sets staged = {str(bool(setting)).lower()}"
    weights, total = weights_bytes(folder), psutil.virtual_memory().total
    staged = STAGED_ABOVE * weights > 0.8 * total
    return staged, (f"{weights / 2**30:.1f} GiB of weights: {STAGED_ABOVE} times that "
                    f"{'exceeds' if staged else 'fits in'} 80 % of this machine's {total / 2**30:.0f} GiB")

