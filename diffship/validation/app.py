"""Validation's run of a set's own app (the web target's page): from the first end-to-end sample's initial latents,
its image against the Python runtime's, for the set's result and the report's grids."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from diffship.runtime.pipeline import DeployedPipeline
from diffship.store.manifest import ArtifactSet
from diffship.targets.base import Target
from diffship.validation.e2e import Sample, compare_images, sample_latents


def app_check(backend: Target, artifacts: ArtifactSet, deployed: DeployedPipeline, sample: Sample,
              python: np.ndarray, min_psnr: float, options: Any,
              say: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    """The set's app result (None: the set has no app) and, when the app drew an image, the pair (Python runtime |
    app) for the report's grids. The app passes at `min_psnr` against the runtime's `python` image."""
    latents = sample_latents(sample, deployed).numpy()
    ran = backend.app_run(artifacts, sample, latents, options, say)
    if ran is None:
        return None
    result, image = ran
    if image is None:
        return result, None
    metrics = compare_images(python, image)
    result |= {**metrics, "min_psnr_db": min_psnr,
               "passed": metrics["identical"] or (metrics["psnr_db"] or 0) >= min_psnr}
    label = f"[{artifacts.target} {artifacts.precision}]"
    say(f"{label} in-browser check: {'pass' if result['passed'] else 'FAIL'}, "
        + ("identical" if metrics["identical"] else f"PSNR {metrics['psnr_db']:.1f} dB")
        + f" against the Python runtime, {result['mean_step_ms']:.0f} ms per step on {result['execution_provider']}")
    pair = {"baseline": python, "target": image, "task": "browser", "prompt": sample.prompt, "seed": sample.seed,
            "baseline_name": "diffship runtime (ONNX Runtime CPU)", **metrics, "passed": result["passed"]}
    return result, pair
