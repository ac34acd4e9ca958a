"""Image-to-image in the deployed pipeline: the init image through the exported VAE encoder, noised to the
strength's timestep, as diffusers' Img2Img pipelines do it (same random draws, in the same order, from one
`torch.Generator("cpu")`), so the same seed gives diffusers' image.

The latent distribution and image preprocessing are diffusers' own classes (`DiagonalGaussianDistribution`,
`VaeImageProcessor`); only the order of the steps is written here, because diffusers ties them to its modules.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from diffship.errors import DiffshipError
from diffship.models.loading import quiet_libraries
from diffship.targets.runner import Runner


def call_default(pipeline_class: str, argument: str) -> Any:
    """What diffusers' pipeline defaults `argument` to: `strength` is 0.8 for SD img2img and 0.3 for SDXL's; the
    refiner's `aesthetic_score` 6.0 and `negative_aesthetic_score` 2.5."""
    import diffusers  # start-up time: diffusers

    quiet_libraries()  # a pipeline class imports transformers' image processors, which warn without torchvision
    return inspect.signature(getattr(diffusers, pipeline_class).__call__).parameters[argument].default


def preprocess(image: Any, vae_scale: int) -> torch.Tensor:
    """A PIL image or an HWC / NHWC array in [0, 1] as the VAE takes it: NCHW in [-1, 1], resized down to a multiple
    of the VAE's scale exactly as diffusers' image processor does."""
    from diffusers.image_processor import VaeImageProcessor  # start-up time: diffusers

    try:
        return VaeImageProcessor(vae_scale_factor=vae_scale).preprocess(image).to(torch.float32)
    except (ValueError, TypeError) as exc:
        raise DiffshipError(f"The init image cannot be used: {exc}") from None


def strength_timesteps(scheduler: Any, steps: int, strength: float) -> torch.Tensor:
    """The scheduler's timesteps from the strength's point on (diffusers' `get_timesteps`); `set_timesteps` first."""
    if not 0.0 < strength <= 1.0:
        raise DiffshipError(f"Strength must be in (0, 1], got {strength}.")
    start = max(steps - min(int(steps * strength), steps), 0)
    timesteps = scheduler.timesteps[start * scheduler.order:]
    if len(timesteps) == 0:
        raise DiffshipError(f"Strength {strength} with {steps} steps leaves no denoising step; raise either.")
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    return timesteps


def init_latents(encoder: Runner, image: torch.Tensor, count: int, vae_config: dict[str, Any], scheduler: Any,
                 timestep: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The init image's latents, sampled from the encoder's distribution, scaled, repeated for `count` images and
    noised to `timestep`: the latent draw first, then the noise, as diffusers' `prepare_latents`."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # start-up time: diffusers
    from diffusers.utils.torch_utils import randn_tensor  # start-up time: diffusers

    parameters = torch.from_numpy(encoder.run({"sample": image.numpy()})["latent_parameters"])
    latents = DiagonalGaussianDistribution(parameters).sample(generator)
    scaling = vae_config.get("scaling_factor", 0.18215)
    if vae_config.get("latents_mean") is not None and vae_config.get("latents_std") is not None:
        mean = torch.tensor(vae_config["latents_mean"]).view(1, -1, 1, 1)
        std = torch.tensor(vae_config["latents_std"]).view(1, -1, 1, 1)
        latents = (latents - mean) * scaling / std
    else:
        latents = scaling * latents
    if count % latents.shape[0]:
        raise DiffshipError(f"{latents.shape[0]} init images for {count} images to generate.")
    latents = torch.cat([latents] * (count // latents.shape[0]))
    noise = randn_tensor(tuple(latents.shape), generator=generator, dtype=torch.float32)
    return scheduler.add_noise(latents, noise, timestep.repeat(count))


def as_array(image: Any) -> np.ndarray | Any:
    """PIL images pass through; arrays are float in [0, 1] (uint8 arrays are scaled)."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return image
