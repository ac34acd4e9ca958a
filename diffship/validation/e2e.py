"""End-to-end image parity: the same prompts, seeds and initial latents through the baseline and the artifacts.

Per image: PSNR and SSIM (scikit-image) and the largest absolute pixel difference, on the uint8 images a
user would save. Identical images have no finite PSNR; they are recorded as `identical` with PSNR None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from diffship.runtime.pipeline import DeployedPipeline, Generation, initial_latents
from diffship.runtime.tasks import TaskInputs
from diffship.store.artifacts import read_json


@dataclass(frozen=True)
class Sample:
    """One end-to-end case: the prompt, the seed its initial latents come from, and the generation settings."""

    prompt: str
    seed: int
    negative_prompt: str | None
    height: int
    width: int
    steps: int
    guidance_scale: float
    task: str = "text2img"  # img2img and inpaint take the run's TaskInputs, and draw everything from the seed


@dataclass(frozen=True)
class LatentSpace:
    """What initial latents are drawn in: the VAE's config (latent channels) and its downscaling factor. A
    DeployedPipeline has both; a model folder gives them before any artifact is loaded (staged validation)."""

    vae_config: dict[str, Any]
    vae_scale: int

    @classmethod
    def of_folder(cls, folder: Path) -> LatentSpace:
        config = read_json(folder / "vae" / "config.json")
        return cls(config, 2 ** (len(config.get("block_out_channels", [0] * 4)) - 1))


def compare_images(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """PSNR (dB), SSIM and max / mean absolute difference of two uint8 HxWx3 images."""
    diff = np.abs(reference.astype(np.int16) - candidate.astype(np.int16))
    identical = not diff.any()
    # SSIM's default 7-pixel window needs images at least that large; tiny test models can be smaller.
    side = min(7, *reference.shape[:2])
    window = side if side % 2 else side - 1
    return {
        "psnr_db": None if identical else float(peak_signal_noise_ratio(reference, candidate, data_range=255)),
        "ssim": float(structural_similarity(reference, candidate, channel_axis=-1, data_range=255, win_size=window)),
        "max_abs_diff": int(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "identical": identical,
    }


def passes(metrics: dict[str, Any], min_psnr: float, min_ssim: float) -> bool:
    """Whether an image clears the thresholds (identical images always do)."""
    if metrics["identical"]:
        return True
    return metrics["psnr_db"] >= min_psnr and metrics["ssim"] >= min_ssim


def run_e2e(samples: list[Sample], baseline: Callable[[Sample, Any], Generation], deployed: DeployedPipeline,
            min_psnr: float, min_ssim: float,
            on_sample: Callable[[int, int, dict[str, Any]], None] | None = None,
            inputs: TaskInputs | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run every sample through both pipelines (text2img from identical latents, the other tasks from `inputs` and
    the seed); return the results, overall and per task, and the image pairs."""
    results, pairs = [], []
    for i, s in enumerate(samples):
        latents, task_kwargs = sample_arguments(s, deployed, inputs)
        reference = baseline(s, latents)
        candidate = deployed(s.prompt, s.negative_prompt, s.height, s.width, s.steps, s.guidance_scale, s.seed,
                             latents=latents, **task_kwargs)
        metrics = compare_images(reference.images[0], candidate.images[0])
        result = {"task": s.task, "prompt": s.prompt, "seed": s.seed, **metrics,
                  "passed": passes(metrics, min_psnr, min_ssim)}
        results.append(result)
        pairs.append({"baseline": reference.images[0], "target": candidate.images[0], **result})
        if on_sample:
            on_sample(i + 1, len(samples), result)
    summary = {**_summarize(results), "threshold": {"min_psnr_db": min_psnr, "min_ssim": min_ssim},
               "tasks": {t: _summarize([r for r in results if r["task"] == t]) for t in dict.fromkeys(
                   r["task"] for r in results)},
               "samples": results}
    return summary, pairs


def sample_arguments(s: Sample, deployed: DeployedPipeline | LatentSpace,
                     inputs: TaskInputs | None) -> tuple[Any, dict[str, Any]]:
    """What both pipelines start a sample from: text2img's seeded initial latents, or the task's image, mask and
    strength (everything else drawn from the seed on both sides)."""
    if s.task not in ("text2img", "controlnet"):
        return None, inputs.deployed_kwargs(s.task) if inputs is not None else {}
    return sample_latents(s, deployed), inputs.deployed_kwargs(s.task) if inputs is not None and s.task == "controlnet" else {}


def sample_latents(s: Sample, deployed: DeployedPipeline | LatentSpace) -> Any:
    """The initial latents diffusers draws for the sample's seed and size (torch, before init_noise_sigma)."""
    channels = deployed.vae_config.get("latent_channels", 4)
    return initial_latents(s.seed, 1, channels, s.height // deployed.vae_scale, s.width // deployed.vae_scale)


def _summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    psnrs = [r["psnr_db"] for r in results if r["psnr_db"] is not None]
    return {"images": len(results), "min_psnr_db": min(psnrs) if psnrs else None,
            "min_ssim": min(r["ssim"] for r in results), "max_abs_diff": max(r["max_abs_diff"] for r in results),
            "identical": sum(r["identical"] for r in results), "passed": all(r["passed"] for r in results)}
