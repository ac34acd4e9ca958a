"""The PyTorch baseline: diffusers' own pipeline over the source model, loaded strictly.

PyTorch FP16 on a GPU when one is present, PyTorch FP32 on the CPU otherwise; `describe` says which,
so the report never leaves the reader guessing what the artifacts were compared with.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffship.host.memory import release_freed
from diffship.models.components import ComponentSpec, wrap
from diffship.models.families import Family, controlnets_in, detect_family, tasks_of
from diffship.models.loading import load_component
from diffship.models.streamed_module import reference_component
from diffship.runtime.diffusers_loop import pipeline_latents, pipeline_of
from diffship.runtime.generation import Generation, uint8_images
from diffship.runtime.schedulers import make_scheduler
from diffship.runtime.tasks import TaskInputs, accepted_by
from diffship.store.artifacts import read_json


class Baseline:
    """The PyTorch pipeline of a build, loaded on first use and dropped when a memory-hungry stage needs the room."""

    def __init__(self, folder: Path, allow_pickle: bool, say: Callable[[str], None], scheduler: str | None = None,
                 scheduler_config: dict[str, Any] | None = None, streamed: bool | str = "auto"):
        self.folder, self.allow_pickle, self.say, self.pipe = folder, allow_pickle, say, None
        self.scheduler = (scheduler, scheduler_config or {})
        self.streamed = streamed

    def get(self) -> Any:
        if self.pipe is None:
            device, dtype = baseline_device()
            self.say(f"Loading the PyTorch baseline ({device}, {str(dtype).removeprefix('torch.')}) ...")
            self.pipe = load_baseline(self.folder, self.allow_pickle, device, dtype, streamed=self.streamed)
            self.pipe.scheduler = make_scheduler(self.pipe.scheduler, *self.scheduler)
        return self.pipe

    def release(self) -> None:
        self.pipe = None
        release_freed()


def baseline_device() -> tuple[str, torch.dtype]:
    """CUDA in FP16 when available (the deployment baseline), else the CPU in FP32."""
    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


def describe(device: str, dtype: torch.dtype) -> dict[str, str]:
    """The baseline as the report names it."""
    precision = {torch.float16: "fp16", torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    return {"framework": "pytorch", "torch": torch.__version__, "device": device, "precision": precision,
            "note": f"diffusers PyTorch pipeline, {precision.upper()} on {where}"
                    + ("" if device == "cuda" else " (no GPU here, so the baseline is FP32 on the CPU)")}


def load_baseline(folder: Path, allow_pickle: bool = False, device: str | None = None,
                  dtype: torch.dtype | None = None, task: str | None = None, streamed: bool | str = False) -> Any:
    """diffusers' pipeline for `task` (the family's first by default) over the model in `folder`, every module loaded
    strictly; with `streamed`, a module too large to hold runs block by block (models/streamed_module.py)."""
    import diffusers  # start-up time: diffusers
    import transformers  # start-up time: transformers

    default_device, default_dtype = baseline_device()
    device, dtype = device or default_device, dtype or default_dtype
    family = detect_family(folder)
    task = task or tasks_of(folder)[0]
    load = load_component if device == "cuda" else functools.partial(reference_component, setting=streamed)
    modules: dict[str, Any] = {name: load(folder, name, allow_pickle)
                               for name in (family.denoiser.component, "vae", *family.encoders_in(folder))}
    for name, kind in family.tokenizers_in(folder):
        modules[name] = getattr(transformers, kind).from_pretrained(folder / name)
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
    modules["scheduler"] = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    pipeline_class = getattr(diffusers, family.pipelines[task])
    pipe = pipeline_of(pipeline_class, modules, read_json(folder / "model_index.json"))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def task_pipeline(pipe: Any, family: Family, task: str, folder: Path | None = None, allow_pickle: bool = False) -> Any:
    """The family's diffusers pipeline for `task`, sharing `pipe`'s modules (diffusers' `from_pipe`); the
    "controlnet" task adds the ControlNets of `folder` (several as diffusers' MultiControlNetModel)."""
    import diffusers  # start-up time: diffusers

    if task == "controlnet":
        nets = [load_component(folder, name, allow_pickle).to(pipe.device, pipe.dtype) for name in controlnets_in(folder)]
        other = getattr(diffusers, family.controlnet_pipeline).from_pipe(
            pipe, controlnet=nets[0] if len(nets) == 1 else diffusers.MultiControlNetModel(nets))
        other.set_progress_bar_config(disable=True)
        return other
    wanted = getattr(diffusers, family.pipelines[task])
    if isinstance(pipe, wanted):
        return pipe
    other = wanted.from_pipe(pipe)
    other.set_progress_bar_config(disable=True)
    return other


def run_baseline(pipe: Any, prompt: str, negative_prompt: str | None, height: int, width: int, steps: int,
                 guidance_scale: float, seed: int, latents: torch.Tensor | None, batch: int = 1, task: str = "text2img",
                 inputs: TaskInputs | None = None) -> Generation:
    """One diffusers generation, timed per step (same fields as the runtime's): text2img from the given initial
    latents, img2img and inpaint from `inputs` with every draw from the seed's generator."""
    marks: list[float] = []

    def on_step_end(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        return kwargs

    arguments: dict[str, Any] = {"height": height, "width": width}
    if inputs is not None and task == "controlnet":
        arguments |= inputs.diffusers_kwargs(task)
    if task in ("text2img", "controlnet") and latents is not None:
        arguments["latents"] = pipeline_latents(pipe, latents.to(pipe.device, pipe.dtype))
    elif inputs is not None:
        arguments |= inputs.diffusers_kwargs(task)
    arguments = accepted_by(pipe, arguments)
    generator = torch.Generator("cpu").manual_seed(seed)
    started = time.perf_counter()
    with torch.inference_mode():
        out = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                   num_images_per_prompt=batch, generator=generator, output_type="np", callback_on_step_end=on_step_end,
                   **arguments)
    total = time.perf_counter() - started
    images = uint8_images(out.images)
    steps_s = [float(s) for s in np.diff(marks)]  # the first step's start is not observable from a callback
    return Generation(images, np.empty(0), {"steps": steps_s, "total": total})


def component_call(pipe: Any, spec: ComponentSpec, inputs: dict[str, np.ndarray], folder: Path,
                   allow_pickle: bool = False) -> Callable[[], Any]:
    """A zero-argument call of one baseline component on fixed inputs, on the baseline's device and dtype. A module
    the main task's pipeline does not hold (a ControlNet: only the controlnet task's pipeline has it) is loaded from
    `folder`."""
    module = getattr(pipe, spec.module, None)
    if not isinstance(module, torch.nn.Module):
        module = load_component(folder, spec.module, allow_pickle).to(pipe.device, pipe.dtype)
    return module_call(module, spec, inputs, pipe.device, pipe.dtype)


def module_call(module: torch.nn.Module, spec: ComponentSpec, inputs: dict[str, np.ndarray], device: Any,
                dtype: torch.dtype) -> Callable[[], Any]:
    """A zero-argument call of `module` (on `device` in `dtype`) as component `spec`, on fixed inputs."""
    wrapper = wrap(spec, module)
    device = torch.device(device)
    args = [torch.from_numpy(np.ascontiguousarray(inputs[t.name])).to(device) for t in spec.inputs]
    args = [a.to(dtype) if a.is_floating_point() else a for a in args]

    def call() -> Any:
        with torch.inference_mode():
            result = wrapper(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result

    return call


def reference_module(pipe: Any, spec: ComponentSpec, folder: Path, allow_pickle: bool) -> torch.nn.Module:
    """The FP32 CPU wrapper component parity is measured against (the baseline's own when it is FP32 on the CPU)."""
    if pipe.device.type == "cpu" and pipe.dtype == torch.float32 and hasattr(pipe, spec.module):
        return wrap(spec, getattr(pipe, spec.module))
    return wrap(spec, reference_component(folder, spec.module, allow_pickle))
