"""Inpainting in the deployed pipeline, as diffusers' Inpaint pipelines do it for the same seed: the image and mask
resized to the output size, the image's latents (noised to the strength's timestep), the mask at latent size and the
masked image's latents; a 9-channel denoiser takes the last two beside the latents, a 4-channel one has the
unmasked region blended back after every step.

Random draws come from one `torch.Generator("cpu")` in diffusers' order: the image's latent sample, the noise, the
masked image's latent sample. Preprocessing is diffusers' `VaeImageProcessor`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffship.errors import DiffshipError
from diffship.targets.runner import Runner


@dataclass
class Inpainting:
    """What the denoising loop needs besides the latents."""

    mask: torch.Tensor  # at latent size, one per image (both halves under guidance)
    masked_latents: torch.Tensor  # the masked image's latents, likewise
    image_latents: torch.Tensor  # the init image's latents, for a 4-channel denoiser's blending
    noise: torch.Tensor
    concatenated: bool  # a 9-channel denoiser takes mask and masked image latents as input channels

    def denoiser_input(self, model_input: torch.Tensor) -> torch.Tensor:
        rows = model_input.shape[0]  # the text half alone where guidance was truncated: the halves' rows are equal
        return torch.cat([model_input, self.mask[-rows:], self.masked_latents[-rows:]], dim=1) \
            if self.concatenated else model_input

    def after_step(self, latents: torch.Tensor, i: int, timesteps: torch.Tensor, scheduler: Any) -> torch.Tensor:
        """A 4-channel denoiser: the region outside the mask is the init image, noised to the next timestep."""
        if self.concatenated:
            return latents
        proper = self.image_latents
        if i < len(timesteps) - 1:
            proper = scheduler.add_noise(proper, self.noise, torch.tensor([timesteps[i + 1]]))
        keep = self.mask[: latents.shape[0]]
        return (1 - keep) * proper + keep * latents


def check_sizes(image: Any, mask: Any) -> None:
    """The mask must cover the image pixel for pixel."""
    sizes = [getattr(x, "size", None) if hasattr(x, "mode") else tuple(x.shape[:2])[::-1] for x in (image, mask)]
    if sizes[0] != sizes[1]:
        raise DiffshipError(f"The mask is {sizes[1][0]}x{sizes[1][1]} pixels but the image is {sizes[0][0]}x"
                            f"{sizes[0][1]}: give a mask of the image's size (white = repaint).")


def prepare(encoder: Runner, image: Any, mask: Any, height: int, width: int, count: int, guided: bool,
            vae_scale: int, vae_config: dict[str, Any], scheduler: Any, timesteps: torch.Tensor, strength: float,
            denoiser_channels: int, generator: torch.Generator) -> tuple[torch.Tensor, Inpainting]:
    """The initial latents and the inpainting inputs, following diffusers' `prepare_latents` and
    `prepare_mask_latents`."""
    from diffusers.image_processor import VaeImageProcessor  # start-up time: diffusers
    from diffusers.utils.torch_utils import randn_tensor  # start-up time: diffusers

    check_sizes(image, mask)
    pixels = VaeImageProcessor(vae_scale_factor=vae_scale).preprocess(image, height=height, width=width)
    pixels = pixels.to(torch.float32)
    mask_pixels = VaeImageProcessor(vae_scale_factor=vae_scale, do_normalize=False, do_binarize=True,
                                    do_convert_grayscale=True).preprocess(mask, height=height, width=width)
    scaling = vae_config.get("scaling_factor", 0.18215)
    channels = vae_config.get("latent_channels", 4)
    concatenated = denoiser_channels == 2 * channels + 1
    if not concatenated and denoiser_channels != channels:
        raise DiffshipError(f"A denoiser with {denoiser_channels} input channels cannot inpaint: diffusers' pipelines "
                            f"take {channels} (blending) or {2 * channels + 1} (an inpainting model).")
    full = strength == 1.0
    image_latents = None
    if not concatenated or not full:
        image_latents = _encode(encoder, pixels, generator, scaling)
        image_latents = image_latents.repeat(count // image_latents.shape[0], 1, 1, 1)
    shape = (count, channels, height // vae_scale, width // vae_scale)
    noise = randn_tensor(shape, generator=generator, dtype=torch.float32)
    if full:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(count))
    small = torch.nn.functional.interpolate(mask_pixels, size=(height // vae_scale, width // vae_scale))
    masked = _encode(encoder, pixels * (mask_pixels < 0.5), generator, scaling)
    small, masked = small.repeat(count // small.shape[0], 1, 1, 1), masked.repeat(count // masked.shape[0], 1, 1, 1)
    if guided:
        small, masked = torch.cat([small] * 2), torch.cat([masked] * 2)
    return latents, Inpainting(small, masked, image_latents if image_latents is not None else latents, noise,
                               concatenated)


def _encode(encoder: Runner, pixels: torch.Tensor, generator: torch.Generator, scaling: float) -> torch.Tensor:
    """diffusers' `_encode_vae_image`: a sample of the encoder's distribution, times the scaling factor."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # start-up time: diffusers

    parameters = torch.from_numpy(encoder.run({"sample": pixels.numpy()})["latent_parameters"])
    return scaling * DiagonalGaussianDistribution(parameters).sample(generator)
