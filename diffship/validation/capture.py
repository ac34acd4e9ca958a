"""The components' real inputs, captured from the PyTorch pipeline: INT8 calibration data, the UNet's trajectory
that real-step parity replays, and the teacher's calls that compression distills from."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from diffship.runtime.tasks import accepted_by
from diffship.targets.calibration import CalibrationData, check_calibration


def capture(pipe: Any, prompts: list[str], samples: int | None, steps: int, height: int, width: int,
            guidance_scale: float = 7.5, seed: int = 0, with_vae: bool = True,
            task_kwargs: dict[str, Any] | None = None) -> CalibrationData:
    """Run enough generations (`steps` each, prompts in turn) to capture `samples` UNet calls, spread evenly.

    `samples=None` keeps every UNet call of one generation per prompt (a denoising trajectory). `task_kwargs`
    (an init image, a mask, a strength) are what `pipe`'s task takes beyond the prompt: the refiner's img2img and an
    inpainting model's denoiser see the inputs of their own task. Under a strength below 1, a generation makes
    fewer UNet calls than `steps`.
    """
    if samples is not None:
        check_calibration(prompts, samples)
    task_kwargs = dict(task_kwargs or {})
    calls_per_generation = steps
    if "strength" in task_kwargs:
        calls_per_generation = max(1, min(int(steps * task_kwargs["strength"]), steps))
    generations = len(prompts) if samples is None else math.ceil(samples / calls_per_generation)
    task_kwargs |= accepted_by(pipe, {"height": height, "width": width})
    unet_calls: list[dict[str, np.ndarray]] = []

    def record(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        call = {"sample": sample, "timestep": torch.as_tensor(timestep).float().reshape(-1).expand(sample.shape[0]),
                "encoder_hidden_states": kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)}
        added = kwargs.get("added_cond_kwargs") or {}
        call |= {k: added[k] for k in ("text_embeds", "time_ids") if k in added}
        # Under ControlNets the UNet also takes their residuals: the controlled UNet is calibrated on them.
        residuals = [*(kwargs.get("down_block_additional_residuals") or []), kwargs.get("mid_block_additional_residual")]
        if residuals[-1] is not None:
            call |= {("mid_block" if i == len(residuals) - 1 else f"down_block_{i}"): r for i, r in enumerate(residuals)}
        unet_calls.append({k: v.detach().float().cpu().numpy().copy() for k, v in call.items()})

    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    decoder, encoder, ids = [], [], {}
    scaling = pipe.vae.config.scaling_factor
    try:
        for g in range(generations):
            prompt = prompts[g % len(prompts)]
            with torch.inference_mode():
                latents = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                               generator=torch.Generator("cpu").manual_seed(seed + g), output_type="latent",
                               **task_kwargs).images
                unscaled = latents / scaling
                decoder.append({"latent_sample": unscaled.float().cpu().numpy()})
                if with_vae:
                    image = pipe.vae.decode(unscaled, return_dict=False)[0]
                    encoder.append({"sample": image.float().clamp(-1, 1).cpu().numpy()})
            for name in ("tokenizer", "tokenizer_2"):
                tokenizer = getattr(pipe, name, None)
                if tokenizer is not None:
                    encoded = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                                        truncation=True, return_tensors="np").input_ids.astype(np.int32)
                    ids.setdefault(name.replace("tokenizer", "text_encoder"), []).append({"input_ids": encoded})
    finally:
        handle.remove()
    keep = np.arange(len(unet_calls)) if samples is None else np.linspace(0, len(unet_calls) - 1, samples).round().astype(int)
    unet = "controlled_unet" if "mid_block" in unet_calls[0] else "unet"
    data = CalibrationData({unet: [unet_calls[i] for i in keep], "vae_decoder": decoder, "vae_encoder": encoder, **ids},
                           {"prompts": prompts, "samples": samples, "steps": steps, "generations": generations,
                            "height": height, "width": width, "guidance_scale": guidance_scale, "seed": seed,
                            "timesteps": [float(unet_calls[i]["timestep"][0]) for i in keep]})
    return data
