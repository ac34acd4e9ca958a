"""What each task is given besides the prompt: the init image, the mask and the strength, as both diffusers'
pipelines and the deployed pipeline take them (`image=`, `mask_image=` / `mask=`, `strength=`).

Validation and calibration run every task a model is for with these; when the recipe names no image or mask,
a deterministic one is made here, so a build needs nothing but the model.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffship.errors import DiffshipError
from diffship.runtime.control import Control

DEFAULT_STRENGTH = 0.75  # diffusers' defaults differ per pipeline (0.8 SD img2img, 0.3 SDXL's, 0.9999 inpaint)


@dataclass(frozen=True)
class TaskInputs:
    """The init image and the mask (PIL images, white = repaint) and the strength that img2img and inpaint use; the
    control image, its scale and guidance window that the "controlnet" task gives each of `controlnets` nets."""

    image: Any
    mask: Any
    strength: float = DEFAULT_STRENGTH
    control: Any = None
    control_scale: float = 1.0
    control_window: tuple[float, float] = (0.0, 1.0)
    controlnets: int = 0

    def diffusers_kwargs(self, task: str) -> dict[str, Any]:
        """The arguments diffusers' pipeline for `task` takes for them (none for text2img)."""
        if task == "text2img":
            return {}
        if task == "controlnet":  # one value for a single ControlNet, a list per net for several
            k = self.controlnets

            def each(value: Any) -> Any:
                return value if k == 1 else [value] * k

            return {"image": each(self.control), "controlnet_conditioning_scale": each(self.control_scale),
                    "control_guidance_start": each(self.control_window[0]),
                    "control_guidance_end": each(self.control_window[1])}
        return {"image": self.image, "strength": self.strength} | ({"mask_image": self.mask} if task == "inpaint" else {})

    def deployed_kwargs(self, task: str) -> dict[str, Any]:
        """The same, as `DeployedPipeline.__call__` takes them."""
        if task == "controlnet":
            return {"controls": [Control(self.control, self.control_scale, *self.control_window)] * self.controlnets}
        kwargs = self.diffusers_kwargs(task)
        if "mask_image" in kwargs:
            kwargs["mask"] = kwargs.pop("mask_image")
        return kwargs


def accepted_by(pipe: Any, arguments: dict[str, Any]) -> dict[str, Any]:
    """The `arguments` diffusers' `pipe` takes (SD / SDXL img2img pipelines take no height / width: the image sets
    them)."""
    accepted = inspect.signature(pipe.__call__).parameters
    return {k: v for k, v in arguments.items() if k in accepted}


def validated_tasks(tasks: tuple[str, ...], every: bool = False) -> tuple[str, ...]:
    """The tasks a build checks: text2img and img2img where the model does them; inpaint for a model that only
    inpaints (any model with a 4-channel denoiser can blend-inpaint, which is img2img's arithmetic plus a mask in
    diffship's loop). `every`: all of them, for a family whose loop is diffusers' own pipeline class per task."""
    if tasks == ("inpaint",) or every:
        return tasks
    return tuple(t for t in tasks if t != "inpaint")


def default_image(height: int, width: int, seed: int = 0) -> Any:
    """A smooth colour field with a few hard edges: structured enough that a VAE encodes it to real latents, and
    the same on every machine."""
    from PIL import Image  # start-up time: PIL

    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
    colours = rng.uniform(0, 1, size=(3, 3))
    field = np.stack([colours[c, 0] * ys + colours[c, 1] * xs + colours[c, 2] * (1 - xs) for c in range(3)], axis=-1)
    field[height // 4: height // 2, width // 4: 3 * width // 4] = rng.uniform(0, 1, size=3)  # a flat block
    return Image.fromarray((np.clip(field, 0, 1) * 255).round().astype(np.uint8))


def default_mask(height: int, width: int) -> Any:
    """White (repaint) over the centre half of the image in each direction."""
    from PIL import Image  # start-up time: PIL

    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
    return Image.fromarray(mask)


def read_image(path: Path, option: str) -> Any:
    """An RGB PIL image from `path`, or a clear error naming the option and the file."""
    from PIL import Image, UnidentifiedImageError  # start-up time: PIL

    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except FileNotFoundError:
        raise DiffshipError(f"{option} {path} does not exist.") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DiffshipError(f"{option} {path} is not an image diffship can read ({exc}).") from None


def task_inputs(height: int, width: int, image: Path | None = None, mask: Path | None = None,
                strength: float = DEFAULT_STRENGTH, option: str = "[validation]", control: Path | None = None,
                control_scale: float = 1.0, control_window: tuple[float, float] = (0.0, 1.0),
                controlnets: int = 0) -> TaskInputs:
    """The recipe's image, mask and control image (read, resized to the validation size as the pipelines would) or
    the defaults."""
    from PIL import Image  # start-up time: PIL

    picture = read_image(image, f"{option} image") if image else default_image(height, width)
    cover = read_image(mask, f"{option} mask").convert("L") if mask else default_mask(height, width)
    if picture.size != (width, height):
        picture = picture.resize((width, height), Image.Resampling.LANCZOS)
    if cover.size != (width, height):
        cover = cover.resize((width, height), Image.Resampling.NEAREST)
    guide = (read_image(control, f"{option} control_image") if control else default_image(height, width, seed=3)) \
        if controlnets else None
    return TaskInputs(picture, cover, strength, guide, control_scale, control_window, controlnets)


def inputs_digest(inputs: TaskInputs) -> str:
    """A content hash of the image and mask, for cache keys (a recipe path can hold another file tomorrow)."""
    digest = hashlib.sha256()
    for picture in (inputs.image, inputs.mask, *([inputs.control] if inputs.control is not None else [])):
        digest.update(np.asarray(picture).tobytes())
    digest.update(repr((inputs.strength, inputs.control_scale, inputs.control_window, inputs.controlnets)).encode())
    return digest.hexdigest()
