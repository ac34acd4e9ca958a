"""`diffship generate`: a build or export folder end to end, prompt -> image, through the artifacts only."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import Progress

from diffship.cli.shared import console, lora_specs, out
from diffship.errors import DiffshipError
from diffship.runtime.schedulers import parse_scheduler


def generate(
    folder: Annotated[Path, typer.Argument(help="A build or export folder.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What to draw.")],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="PNG to write (several images: name-<i>.png).")] = Path(
        "image.png"),
    backend: Annotated[str | None, typer.Option(help="Which artifacts to run (target name); default: the first.")] = None,
    precision: Annotated[str | None, typer.Option(help="Which precision of that target.")] = None,
    negative_prompt: Annotated[str | None, typer.Option("--negative-prompt", "-n")] = None,
    steps: Annotated[int | None, typer.Option(
        help="Denoising steps (default: the build's validated steps when its recipe named a scheduler, else 20).")] = None,
    guidance_scale: Annotated[float | None, typer.Option(
        "--guidance-scale", "-g", help="Classifier-free guidance; Flux: the guidance its transformer embeds (default: the "
        "build's validated one, else diffusers' for the family, 7.5 for SD 1.x / 2.x / XL).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initial latents (same as diffusers' CPU generator).")] = 0,
    batch: Annotated[int, typer.Option(help="Images per prompt.")] = 1,
    height: Annotated[int | None, typer.Option(help="Pixels (default: the model's native size).")] = None,
    width: Annotated[int | None, typer.Option(help="Pixels (default: the model's native size).")] = None,
    image: Annotated[Path | None, typer.Option(
        help="Init image: img2img generates from it at its size; with --mask, inpainting repaints part of it.")] = None,
    mask: Annotated[Path | None, typer.Option(help="Inpainting mask, the image's size: white = repaint.")] = None,
    strength: Annotated[float | None, typer.Option(
        help="How much of the init image to repaint, (0, 1] (default: diffusers' for the model: 0.8 SD, 0.3 SDXL).")] = None,
    scheduler: Annotated[str | None, typer.Option(
        help="Sampler: euler, euler-a, dpm++2m, dpm++2m-karras, ddim, lcm, pndm, unipc or a diffusers scheduler class, "
             "with config overrides as NAME:key=value,... (default: the folder's own).")] = None,
    aesthetic_score: Annotated[float | None, typer.Option(
        help="SDXL refiner: the aesthetic score conditioning (default: diffusers' 6.0).")] = None,
    negative_aesthetic_score: Annotated[float | None, typer.Option(
        help="SDXL refiner: the negative aesthetic score (default: diffusers' 2.5).")] = None,
    lora: Annotated[list[str] | None, typer.Option(
        help="A LoRA merged into the weights as they load, PATH[:SCALE], no files written (ONNX Runtime and OpenVINO "
             "FP32 / FP16 / BF16 sets); repeat for several.")] = None,
    control_image: Annotated[list[Path] | None, typer.Option(
        help="A control image per ControlNet of the build, in its order (repeat); it is resized to the output.")] = None,
    control_scale: Annotated[list[float] | None, typer.Option(
        help="Conditioning scale per control image (repeat; default 1.0 each, as diffusers).")] = None,
    control_start: Annotated[float, typer.Option(help="Fraction of the steps before the ControlNets act.")] = 0.0,
    control_end: Annotated[float, typer.Option(help="Fraction of the steps after which they stop.")] = 1.0,
    max_sequence_length: Annotated[int | None, typer.Option(
        help="SD3 / Flux: the T5 tokens the prompt is padded or cut to, 2 to 512 (default: diffusers' 256 SD3, "
             "512 Flux).")] = None,
    accelerate: Annotated[list[str] | None, typer.Option(
        help="Accelerations, NAME:key=value,... (deep-cache:interval=3,depth=1; guidance:until=0.5), repeat to combine, "
             "or none (default: the build's recommended ones, on its recommended set).")] = None,
) -> None:
    """Generate images with a folder of deployed artifacts (hashes checked against its manifest first)."""
    from diffship.runtime.img2img import call_default  # start-up time: torch
    from diffship.runtime.pipeline import DeployedPipeline, save_images  # start-up time: torch
    from diffship.runtime.tasks import read_image  # start-up time: numpy
    from diffship.store.manifest import read_manifest  # start-up time: pydantic

    if out_file.suffix.lower() != ".png":
        raise DiffshipError(f"--out {out_file} must be a .png file.")
    manifest = read_manifest(folder)
    backend, precision, accelerations = _accelerations(manifest, backend, precision, accelerate)
    started = time.perf_counter()
    pipe = DeployedPipeline.load(folder, backend, precision, loras=lora_specs(lora))
    pipe.load_accelerations(accelerations)
    if lora:
        console.print(f"Loaded with {len(lora)} LoRA(s) merged into the weights in {time.perf_counter() - started:.1f} s")
    if pipe.artifacts.status == "failed":
        console.print(f"[yellow]warning:[/] these {pipe.artifacts.target} {pipe.artifacts.precision} artifacts "
                      "FAILED validation in their build; see the report before shipping them.")
    # A build validated with a named scheduler (a few-step LoRA's LCM at 4 steps) samples that way unless told otherwise.
    validated = manifest.generation or {}
    if scheduler:
        pipe.use_scheduler(*parse_scheduler(scheduler))
    elif validated:
        pipe.use_scheduler(validated["scheduler"], validated.get("scheduler_config"))
    steps = steps if steps is not None else validated.get("steps", 20)
    if guidance_scale is None and "guidance_scale" in validated:
        guidance_scale = validated["guidance_scale"]
    elif guidance_scale is None:  # diffship's loop has always used 7.5; the transformers take diffusers' own default
        guidance_scale = 7.5 if pipe.family.loop == "diffship" else call_default(pipe.family.pipelines[pipe.tasks[0]],
                                                                                 "guidance_scale")
    if (aesthetic_score is not None or negative_aesthetic_score is not None) and not pipe.family.aesthetic_conditioning:
        raise DiffshipError(f"--aesthetic-score conditions the SDXL refiner; this is a {pipe.family.title} model.")
    controls = _controls(control_image, control_scale, control_start, control_end)
    init = read_image(image, "--image") if image else None
    masked = read_image(mask, "--mask") if mask else None
    if strength is not None and init is None:
        raise DiffshipError("--strength applies to img2img: give the init image with --image.")
    h, w = height or pipe.native_resolution[0], width or pipe.native_resolution[1]
    if init is None:
        pipe.check_request(batch, h, w)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"{pipe.artifacts.target} {pipe.artifacts.precision}", total=steps)
        img2img = init is not None and masked is None
        result = pipe(prompt, negative_prompt, height if img2img else h, width if img2img else w, steps, guidance_scale,
                      seed, batch, on_step=lambda i, n: progress.update(task, completed=i, total=n), image=init,
                      mask=masked, strength=strength, aesthetic_score=aesthetic_score,
                      negative_aesthetic_score=negative_aesthetic_score, controls=controls,
                      max_sequence_length=max_sequence_length, accelerations=accelerations)
    h, w = result.images.shape[1:3]
    paths = save_images(result.images, out_file)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    t = result.timings
    steps_ms = 1000 * sum(t["steps"]) / max(len(t["steps"]), 1)
    out.print(f"Wrote {', '.join(map(str, paths))} ({pipe.artifacts.target} {pipe.artifacts.precision}, {h}x{w}, "
              f"{type(pipe.scheduler).__name__}{', ' + accelerations.label if accelerations.active else ''}): "
              f"{t['total']:.2f} s total, {steps_ms:.1f} ms per step")


def _accelerations(manifest: Any, backend: str | None, precision: str | None,
                   values: list[str] | None) -> tuple[str | None, str | None, Any]:
    """The set and accelerations to generate with: with no set asked for, the build's recommended one (or the first
    where it has none); `--accelerate` where given, else the recommended accelerations when the set is the
    recommended one."""
    from pydantic import ValidationError  # start-up time: pydantic

    from diffship.accelerations import Accelerations, parse_accelerations  # start-up time: pydantic

    best = manifest.recommended
    chosen = manifest.artifacts.get(best["set"]) if best else None
    if chosen is None or (backend or chosen.target) != chosen.target or (precision or chosen.precision) != chosen.precision:
        return backend, precision, parse_accelerations(values or []).only("generate")
    if values:
        return chosen.target, chosen.precision, parse_accelerations(values).only("generate")
    try:
        accelerations = Accelerations.model_validate(best["accelerations"])
    except ValidationError as exc:
        raise DiffshipError(f"The manifest's recommended accelerations cannot be read ({exc.errors()[0]['msg']}): "
                            "generate with --accelerate.") from None
    console.print(f"Using the build's recommended {chosen.target} {chosen.precision} set"
                  + (f" with {accelerations.label}" if accelerations.active else "")
                  + f" ({best['pipeline_speedup']:.2f}x PyTorch FP32 within its quality budget"
                  + ("; --accelerate none to turn them off)" if accelerations.active else ")"))
    return chosen.target, chosen.precision, accelerations


def _controls(images: list[Path] | None, scales: list[float] | None, start: float, end: float) -> list[Any] | None:
    """`--control-image` / `--control-scale` pairs as the pipeline's controls (None without images)."""
    from diffship.runtime.control import Control  # start-up time: numpy
    from diffship.runtime.tasks import read_image  # start-up time: numpy

    scales = list(scales or [])
    if scales and not images:
        raise DiffshipError("--control-scale scales a control image: give it with --control-image.")
    if len(scales) > len(images or []):
        raise DiffshipError(f"{len(scales)} --control-scale values for {len(images or [])} --control-image.")
    scales += [1.0] * (len(images or []) - len(scales))
    return [Control(read_image(p, "--control-image"), s, start, end) for p, s in zip(images or [], scales, strict=True)] or None
