"""Run a list of compression steps over a pipeline and measure every stage against the original.

The original UNet is the teacher and the reference: each stage row gives parameters, non-zero parameters,
bytes, the UNet call's latency in PyTorch (same process, same captured input) and, for models that declare
a quality task, prompt accuracy. The result is written as a pipeline folder the exporters read like any other.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffship.compress import prune, quantize
from diffship.compress.distill import distill, sample_set
from diffship.compress.precision import cast_pipeline
from diffship.compress.qat import quantize_int8
from diffship.compress.steps import TORCH_ONLY, Step
from diffship.errors import DiffshipError
from diffship.models.compressed import write_pipeline
from diffship.models.families import family_named, tasks_of
from diffship.stages import compress_measure as measure
from diffship.validation.baseline import load_baseline
from diffship.validation.capture import capture
from diffship.validation.quality import quality_task

Say = Callable[[str], None]
RECORD_FILE = "compress.json"


@dataclass(frozen=True)
class Settings:
    """How the teacher's UNet inputs are captured, and how quality is measured, for every stage."""

    prompts: list[str]
    denoise_steps: int
    height: int
    width: int
    guidance_scale: float
    quality_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    quality_steps: int = 20
    quality_guidance: float = 5.0
    latency_repeats: int = 20


def settings_for(recipe: Any, folder: Path, height: int, width: int) -> tuple[Settings, bool]:
    """The compress settings a recipe gives at this resolution, and whether the model's quality is measured."""
    q = recipe.validation.quality
    settings = Settings(list(recipe.calibration.prompts), recipe.calibration.steps_for(recipe.validation.steps),
                        height, width, recipe.validation.guidance_scale, list(q.seeds), q.steps, q.guidance_scale)
    return settings, q.enabled and quality_task(folder) == "digits"


def needs_data(steps: Sequence[Step]) -> bool:
    """Whether any step calibrates on the captured UNet inputs of every calibration prompt."""
    return any(s.step == "qat" or (s.step == "quantize" and s.activations != "none") for s in steps)


def check_exportable(steps: Sequence[Step]) -> None:
    """Refuse steps whose result ONNX export cannot carry, before a build spends time on them."""
    if torch_only := [s.step for s in steps if s.step in TORCH_ONLY]:
        raise DiffshipError(
            f"compress step(s) {', '.join(torch_only)} produce PyTorch-only components (cast modules, quanto or "
            "bitsandbytes tensors) that ONNX export cannot carry. Measure them with `diffship compress`; for "
            "INT8 artifacts use a qat step or a target's int8 precision, for FP16 a target's fp16.")


def compress(folder: Path, family: str, steps: Sequence[Step], settings: Settings, dest: Path, checkpoints: Path,
             allow_pickle: bool = False, quality: bool = False, say: Say | None = None) -> dict[str, Any]:
    """Apply `steps` in order to the pipeline in `folder`, write the result to `dest`, return the stage table."""
    say = say or (lambda _: None)
    if not steps:
        raise DiffshipError("compress needs at least one step.")
    if (tasks := tasks_of(folder))[0] != "text2img":
        raise DiffshipError(f"compress measures and distills on text-to-image generations; this model does "
                            f"{' and '.join(tasks)} only. Build it without compress steps.")
    if (declared := family_named(family)).loop == "diffusers":
        raise DiffshipError(f"compress steps (pruning, distillation, QAT, quanto, casts) drive diffship's UNet loop; "
                            f"the {declared.short} transformer is not supported yet. Build it without compress steps: "
                            "its targets' int8 / int8-auto precisions quantize it.")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    say(f"[compress] loading {folder.name} (PyTorch FP32, {device}) ...")
    pipe = load_baseline(folder, allow_pickle, device, torch.float32)
    denoiser = family_named(family).denoiser
    component, sensitive = denoiser.component, denoiser.sensitive

    def net() -> Any:  # the denoiser as it stands (bitsandbytes replaces the module)
        return getattr(pipe, component)

    teacher = copy.deepcopy(net()) if any(s.step in ("distill", "qat") for s in steps) else None
    full = needs_data(steps)
    say(f"[compress] capturing the {component}'s inputs over {settings.denoise_steps}-step generations of "
        f"{len(settings.prompts) if full else 1} prompt(s) at {settings.height}x{settings.width} ...")
    calls = capture(pipe, settings.prompts if full else settings.prompts[:1], None, settings.denoise_steps,
                    settings.height, settings.width, settings.guidance_scale, with_vae=False).inputs[component]
    samples = None
    if trains := [s for s in steps if s.step in ("distill", "qat") and s.steps]:
        images = max(s.images for s in trains)
        say(f"[compress] generating {images} images with the original as distillation data ...")
        captured = capture(pipe, settings.prompts, images * settings.denoise_steps, settings.denoise_steps,
                           settings.height, settings.width, settings.guidance_scale, seed=10_000, with_vae=False)
        samples = sample_set(captured, component, settings.denoise_steps, pipe.vae.config.scaling_factor,
                             pipe.scheduler.alphas_cumprod, settings.guidance_scale)
        del captured

    baseline: dict[str, Any] = {}

    def stage(label: str, step: dict[str, Any] | None, info: dict[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {"stage": label, "step": step, **measure.weight_stats(net()),
                               "denoiser_seconds": measure.denoiser_latency(net(), calls[0], settings.latency_repeats),
                               "info": info}
        if quality:
            row["quality"] = measure.digits_quality(pipe, settings.quality_seeds, settings.quality_steps,
                                                    settings.quality_guidance, settings.height, settings.width)
        if not baseline:
            baseline.update(row)
        row["speedup"] = baseline["denoiser_seconds"] / row["denoiser_seconds"]
        row["params_ratio"] = row["params"] / baseline["params"]
        accuracy = row.get("quality", {}).get("prompt_accuracy")
        shown = f", prompt accuracy {accuracy:.3f}" if accuracy is not None else ""
        say(f"      {label}: {row['params']:,} params ({row['nonzero']:,} non-zero), {row['bytes'] / 2**20:.2f} MiB, "
            f"{component} call {row['denoiser_seconds'] * 1000:.2f} ms ({row['speedup']:.2f}x){shown}")
        return row

    stages = [stage("original", None, {})]
    structure, quantizer, reshaped, changed = None, None, False, False
    for i, step in enumerate(steps):
        dump = step.model_dump()
        say(f"[compress {i + 1}/{len(steps)}] {step.step} ...")
        if quantizer is not None:
            raise DiffshipError(f"compress step {i + 1} ({step.step}) comes after quantization; quantize last.")
        if step.step in ("quantize", "qat") and reshaped:
            structure = copy.deepcopy(net())  # the pruned float shape the saved quantizer state is rebuilt on
        if step.step == "precision":
            info = cast_pipeline(pipe, step.dtype, step.vae, family_named(family))
        elif step.step == "prune-magnitude":
            info = prune.prune_magnitude(net(), step.sparsity, step.scope)
        elif step.step == "prune-channels":
            info = prune.prune_channels(net(), step.ratio, calls[0], step.round_to)
            reshaped = True
        elif step.step == "prune-heads":
            info = prune.prune_heads(net(), step.heads)
            reshaped = True
        elif step.step == "distill":
            assert teacher is not None and samples is not None  # made above when a step distills
            info = distill(net(), teacher, samples, step.steps, step.batch, step.lr, checkpoints / f"step{i + 1}",
                           step.checkpoint_every, say=say)
        elif step.step == "quantize":
            info = _quantize(pipe, component, step, folder, changed, calls, sensitive.trained_float)
            quantizer = "quanto" if step.library == "quanto" else "bitsandbytes"
        elif step.step == "qat":
            info = quantize_int8(net(), calls, sensitive.trained_float)
            quantizer = "modelopt"
            if step.steps:
                assert teacher is not None and samples is not None
                stages.append(stage("qat: calibrated only (PTQ)", dump, info))
                info = {**info, "training": distill(net(), teacher, samples, step.steps, step.batch, step.lr,
                                                    checkpoints / f"step{i + 1}", step.checkpoint_every, say=say)}
        else:  # pragma: no cover - the recipe's discriminated union admits no other step
            raise DiffshipError(f"Unknown compress step {step.step!r}.")
        changed = True
        stages.append(stage(_label(step), dump, info))
    record = {"steps": [s.model_dump() for s in steps], "stages": stages, "reshaped": reshaped,
              "quantizer": quantizer, "torch_only": any(s.step in TORCH_ONLY for s in steps),
              "device": device, "captured_calls": len(calls), "settings": settings.__dict__}
    # bitsandbytes layers and whole-pipeline casts have no diffship save format; quanto UNets are saved (for
    # PyTorch use) although ONNX export cannot take them.
    if quantizer != "bitsandbytes" and not any(s.step == "precision" for s in steps):
        say(f"[compress] writing the compressed pipeline to {dest} ...")
        write_pipeline(folder, dest, component, net().cpu(), structure, quantizer, record)
    return record


def _label(step: Step) -> str:
    details = {k: v for k, v in step.model_dump().items() if k not in ("step", "checkpoint_every")}
    return f"{step.step} (" + ", ".join(f"{k} {v}" for k, v in details.items()) + ")"


def _quantize(pipe: Any, component: str, step: Any, folder: Path, changed: bool, calls: list[Any],
              keep_float: tuple[str, ...]) -> dict[str, Any]:
    if step.library == "quanto":
        if step.weights == "nf4":
            raise DiffshipError("quantize: nf4 is a bitsandbytes format; optimum-quanto offers int8 and int4.")
        return quantize.quanto(getattr(pipe, component), step.weights, step.activations, calls, keep_float)
    if changed:
        raise DiffshipError("quantize with bitsandbytes loads the original denoiser's weights, so it must be the only "
                            "step (bitsandbytes quantizes while loading).")
    if step.activations != "none":
        raise DiffshipError("bitsandbytes quantizes weights only: set activations = 'none'.")
    model, info = quantize.bitsandbytes_denoiser(folder, component, step.weights)
    pipe.to(torch.float16)
    setattr(pipe, component, model)
    return info
