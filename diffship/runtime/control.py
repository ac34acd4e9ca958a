"""ControlNets in the deployed pipeline, step by step as diffusers' ControlNet pipelines run them (guess mode off):
each ControlNet sees the guided latents, the text states and its control image, scaled by its conditioning scale
inside its control-guidance window and by zero outside it; the residuals of all of them are summed and handed to
the denoiser variant that takes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from diffship.errors import DiffshipError
from diffship.models.specs import TensorSpec
from diffship.targets.runner import Runner


@dataclass(frozen=True)
class Control:
    """One ControlNet's conditioning: its image (PIL or uint8 HWC), scale and the fraction of steps it acts in."""

    image: Any
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


def control_images(controls: list[Control], height: int, width: int, vae_scale: int, n: int,
                   guidance: bool) -> list[np.ndarray]:
    """Each control image as its ControlNet takes it: diffusers' control image processor (RGB, resized to the
    output size, [0, 1], not normalized), one per image generated, doubled for guidance."""
    from diffusers.image_processor import VaeImageProcessor  # start-up time: diffusers

    processor = VaeImageProcessor(vae_scale_factor=vae_scale, do_convert_rgb=True, do_normalize=False)
    prepared = []
    for control in controls:
        image = processor.preprocess(control.image, height=height, width=width).float()
        image = image.repeat_interleave(n if image.shape[0] == 1 else 1, dim=0)
        prepared.append(np.concatenate([image.numpy()] * 2) if guidance else image.numpy())
    return prepared


def keep(control: Control, step: int, steps: int) -> float:
    """1 inside the control's guidance window at `step` of `steps`, else 0 (diffusers' `controlnet_keep`)."""
    return 1.0 - float(step / steps < control.start or (step + 1) / steps > control.end)


class ControlledDenoiser:
    """The denoising call with ControlNets: their summed residuals, then the denoiser variant that takes them."""

    def __init__(self, nets: list[Runner], denoiser: Runner, controls: list[Control], images: list[np.ndarray],
                 residuals: tuple[TensorSpec, ...]):
        if len(controls) != len(nets):
            raise DiffshipError(f"{len(controls)} control image(s) for {len(nets)} ControlNet(s) in these artifacts; "
                                "give one --control-image per ControlNet, in the build's order.")
        for control in controls:
            if not 0.0 <= control.start < control.end <= 1.0:
                raise DiffshipError(f"Control guidance must satisfy 0 <= start < end <= 1, got {control.start} and "
                                    f"{control.end}.")
        self.nets, self.denoiser, self.controls, self.images = nets, denoiser, controls, images
        self.residuals = residuals  # what the denoiser's declaration says a ControlNet adds

    def run(self, feed: dict[str, np.ndarray], step: int, steps: int) -> np.ndarray:
        total: dict[str, np.ndarray] | None = None
        for net, control, image in zip(self.nets, self.controls, self.images, strict=True):
            scale = control.scale * keep(control, step, steps)
            if scale == 0.0:
                continue  # diffusers runs it and multiplies by 0: the same zeros, without the call
            given = {k: v for k, v in feed.items() if k in net.input_names}
            residuals = net.run(given | {"controlnet_cond": image, "conditioning_scale": np.asarray([scale], np.float32)})
            total = residuals if total is None else {k: total[k] + v for k, v in residuals.items()}
        if total is None:
            shapes = _residual_shapes(self.residuals, feed)
            total = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
        return self.denoiser.run(feed | total)["out_sample"]


def _residual_shapes(residuals: tuple[TensorSpec, ...], feed: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The residual inputs' shapes for this call, from their declared channels and the latents' size."""
    batch, _, height, width = feed["sample"].shape
    shapes = {}
    for spec in residuals:
        _, channels, h, _ = spec.shape
        factor = 1 if h == "height" else int(str(h).split("_")[1])
        shapes[spec.name] = (batch, channels, height // factor, width // factor)
    return shapes
