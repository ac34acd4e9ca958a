"""Samplers users pick (`generate --scheduler`, `[validation] scheduler`): built from the folder's config as diffusers
does, each reproducing diffusers' pipeline with the same scheduler for the same seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffship.cli.main import app
from diffship.errors import DiffshipError
from diffship.models.source import resolve
from diffship.runtime.pipeline import DeployedPipeline, initial_latents
from diffship.runtime.schedulers import NAMES, make_scheduler, parse_scheduler
from diffship.validation.baseline import load_baseline


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.fixture(scope="module")
def pair(exported):
    """The deployed tiny-sd and its diffusers baseline, loaded once."""
    return DeployedPipeline.load(exported("tiny-sd")), load_baseline(resolve("tiny-sd").folder)


def _both(pair, name: str, overrides: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    deployed, baseline = pair
    folder_scheduler = baseline.scheduler
    deployed.use_scheduler(name, overrides)
    baseline.scheduler = make_scheduler(folder_scheduler, name, overrides)
    latents = initial_latents(3, 1, 4, 8, 8)
    try:
        ours = deployed("a lighthouse at dusk", None, 64, 64, steps=5, guidance_scale=6.0, seed=3, latents=latents)
        with torch.inference_mode():
            theirs = baseline("a lighthouse at dusk", height=64, width=64, num_inference_steps=5, guidance_scale=6.0,
                              generator=torch.Generator("cpu").manual_seed(3), latents=latents,
                              output_type="latent").images.numpy()
    finally:
        baseline.scheduler = folder_scheduler
        deployed.scheduler = folder_scheduler
        deployed.step_takes = deployed._step_takes()
    return ours.latents, theirs


@pytest.mark.parametrize("name", ["euler", "euler-a", "dpm++2m", "dpm++2m-karras", "ddim", "lcm", "unipc",
                                  "HeunDiscreteScheduler"])
def test_each_scheduler_reproduces_diffusers_for_the_same_seed(pair, name: str):
    ours, theirs = _both(pair, name)
    assert _relative(theirs, ours) < 1e-4, name
    # The check can fail: the folder's own sampler (PNDM) from the same latents ends 1 % or more away.
    default, _ = _both(pair, None)
    assert _relative(theirs, default) > 1e-2, name


def test_overrides_apply_and_the_ancestral_sampler_uses_the_seed(pair):
    plain, _ = _both(pair, "dpm++2m")
    karras, theirs = _both(pair, "dpm++2m", {"use_karras_sigmas": True})
    assert _relative(theirs, karras) < 1e-4 and _relative(plain, karras) > 1e-3
    assert parse_scheduler("dpm++2m:use_karras_sigmas=true,solver_order=2") == (
        "dpm++2m", {"use_karras_sigmas": True, "solver_order": 2})
    assert set(NAMES) >= {"euler", "euler-a", "dpm++2m", "dpm++2m-karras", "ddim", "lcm"}


def test_unknown_schedulers_and_settings_are_refused(pair, exported, tmp_path):
    deployed, _ = pair
    with pytest.raises(DiffshipError, match="Unknown scheduler 'k-lms-ultra'"):
        make_scheduler(deployed.scheduler, "k-lms-ultra")
    with pytest.raises(DiffshipError, match="EulerDiscreteScheduler has no setting bogus"):
        make_scheduler(deployed.scheduler, "euler", {"bogus": 1})
    result = CliRunner().invoke(app, ["generate", str(exported("tiny-sd")), "-p", "a cat", "--steps", "2",
                                      "--scheduler", "euler-a", "--out", str(tmp_path / "a.png")])
    assert result.exit_code == 0 and "EulerAncestralDiscreteScheduler" in result.output, result.output
    result = CliRunner().invoke(app, ["generate", str(exported("tiny-sd")), "-p", "a cat", "--scheduler", "nope",
                                      "--out", str(tmp_path / "b.png")])
    assert result.exit_code == 2 and "Unknown scheduler 'nope'" in result.output


def test_an_override_of_a_setting_the_folder_left_out_is_kept():
    from diffusers import UniPCMultistepScheduler

    # A folder's config written without use_karras_sigmas: diffusers marks it a default value and from_config would
    # drop it if it were merged into the config rather than passed as a keyword.
    folder = UniPCMultistepScheduler.from_config({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                                  "beta_start": 0.00085, "beta_end": 0.012})
    assert "use_karras_sigmas" in folder.config["_use_default_values"]
    assert make_scheduler(folder, "dpm++2m-karras").config.use_karras_sigmas is True
    assert make_scheduler(folder, "dpm++2m", {"use_karras_sigmas": True}).config.use_karras_sigmas is True
    assert make_scheduler(folder, "dpm++2m").config.use_karras_sigmas is False
