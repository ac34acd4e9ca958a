"""The components' real inputs, captured from the PyTorch pipeline: INT8 calibration data, the denoiser's trajectory
that real-step parity replays, and the teacher's calls that compression distills from."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from diffship.models.families import denoiser_of
from diffship.runtime.diffusers_loop import decoder_latents, denoiser_call
from diffship.runtime.tasks import accepted_by
from diffship.targets.calibration import CalibrationData, check_calibration


def capture(pipe: Any, prompts: list[str], samples: int | None, steps: int, height: int, width: int,
            guidance_scale: float = 7.5, seed: int = 0, with_vae: bool = True,
            task_kwargs: dict[str, Any] | None = None) -> CalibrationData:
    """Run enough generations (`steps` each, prompts in turn) to capture `samples` denoiser calls, spread evenly.

    `samples=None` keeps every denoiser call of one generation per prompt (a denoising trajectory). `task_kwargs`
    (an init image, a mask, a strength) are what `pipe`'s task takes beyond the prompt: the refiner's img2img and an
    inpainting model's denoiser see the inputs of their own task. Under a strength below 1, a generation makes
    fewer denoiser calls than `steps`.
    """
    if samples is not None:
        check_calibration(prompts, samples)
    task_kwargs = dict(task_kwargs or {})
    calls_per_generation = steps
    if "strength" in task_kwargs:
        calls_per_generation = max(1, min(int(steps * task_kwargs["strength"]), steps))
    generations = len(prompts) if samples is None else math.ceil(samples / calls_per_generation)
    task_kwargs |= accepted_by(pipe, {"height": height, "width": width})
    denoiser_calls: list[dict[str, np.ndarray]] = []

    denoiser, controlled = denoiser_of(pipe), []

    def record(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Under ControlNets the denoiser also takes their residuals: its controlled variant is calibrated on them.
        inputs, residuals = denoiser_call(denoiser, args, kwargs)
        controlled.append(bool(residuals))
        call = inputs | residuals
        denoiser_calls.append({k: v.detach().float().cpu().numpy().copy() for k, v in call.items()})

    handle = getattr(pipe, denoiser.component).register_forward_pre_hook(record, with_kwargs=True)
    decoder, encoder, ids = [], [], {}
    try:
        for g in range(generations):
            prompt = prompts[g % len(prompts)]
            with torch.inference_mode():
                latents = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                               generator=torch.Generator("cpu").manual_seed(seed + g), output_type="latent",
                               **task_kwargs).images
                unscaled = decoder_latents(pipe, latents, height, width)
                decoder.append({"latent_sample": unscaled.float().cpu().numpy()})
                if with_vae:
                    image = pipe.vae.decode(unscaled, return_dict=False)[0]
                    encoder.append({"sample": image.float().clamp(-1, 1).cpu().numpy()})
            for name in [c for c in pipe.components if c.startswith("tokenizer")]:  # each text encoder's
                tokenizer = getattr(pipe, name, None)
                if tokenizer is not None:
                    encoded = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                                        truncation=True, return_tensors="np").input_ids.astype(np.int32)
                    ids.setdefault(name.replace("tokenizer", "text_encoder"), []).append({"input_ids": encoded})
    finally:
        handle.remove()
    calls = len(denoiser_calls)
    keep = np.arange(calls) if samples is None else np.linspace(0, calls - 1, samples).round().astype(int)
    name = denoiser.controlled if controlled[0] else denoiser.component
    data = CalibrationData({name: [denoiser_calls[i] for i in keep], "vae_decoder": decoder, "vae_encoder": encoder, **ids},
                           {"prompts": prompts, "samples": samples, "steps": steps, "generations": generations,
                            "height": height, "width": width, "guidance_scale": guidance_scale, "seed": seed,
                            "timesteps": [float(denoiser_calls[i]["timestep"][0]) for i in keep]})
    return data
