"""The browser app's scheduler ports (diffship/targets/webapp/app/schedulers/*.js) against diffusers: the same fake denoising
loop in both, for each scheduler and a matrix of folder configs and step counts, must give the same timesteps, initial
noise scale and samples at every step. All JS runs in one `node` invocation (tests/web/scheduler_harness.mjs)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffship.runtime.schedulers import NAMES

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node (Node.js) is not on PATH: it runs the JS ports")

HARNESS = Path(__file__).parent / "web" / "scheduler_harness.mjs"
TOLERANCE = 1e-4  # max |js - diffusers| / max |diffusers|: float32 torch against float64 JS step arithmetic
PORTED = ("ddim", "euler", "dpm++2m", "dpm++2m-karras", "pndm")

SD15 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading", "set_alpha_to_one": False,
        "prediction_type": "epsilon", "clip_sample": False, "skip_prk_steps": True, "trained_betas": None}
CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": SD15,
    "vpred": {**SD15, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"},
    "trailing": {**SD15, "timestep_spacing": "trailing"},
    "linspace": {**SD15, "timestep_spacing": "linspace"},
    # SDXL base ships Euler with "leading" spacing: init_noise_sigma is sqrt(sigma_max^2 + 1)
    "sdxl": {**SD15, "_class_name": "EulerDiscreteScheduler", "interpolation_type": "linear", "use_karras_sigmas": False},
    # an SD 1.x folder written before timestep_spacing existed: each class takes its own default, as from_config does
    # (Euler and DPM-Solver "linspace", DDIM and PNDM "leading"), not the folder class's
    "sd15-old": {k: v for k, v in SD15.items() if k != "timestep_spacing"},
    # DDPM-style defaults: linear betas, clip_sample and set_alpha_to_one on, no offset
    "linear": {"_class_name": "DDIMScheduler", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
               "skip_prk_steps": True},
    "cosine": {**SD15, "beta_schedule": "squaredcos_cap_v2"},
    # sigma_max 4096 for Euler: its 4-step trajectory is the closest to the tolerance (~6e-5), float32 rounding noise
    # in diffusers' step at that scale plus a 1-ulp difference in torch's sqrt of sigma_max
    "zero-snr": {**SD15, "_class_name": "DDIMScheduler", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                 "prediction_type": "v_prediction"},
    # a UniPC folder: DPM-Solver++ maps its solver_type "bh2" to "midpoint"
    "unipc": {**SD15, "_class_name": "UniPCMultistepScheduler", "solver_type": "bh2", "solver_order": 2,
              "timestep_spacing": "linspace", "steps_offset": 0},
}
RUNS = [(config, name, steps) for config in ("sd15", "vpred", "trailing", "linspace") for name in PORTED
        for steps in (1, 3, 4, 20)]
RUNS += [("sdxl", None, steps) for steps in (1, 4, 20)]
RUNS += [(config, name, steps) for config in ("sdxl", "sd15-old", "linear") for name in PORTED for steps in (4, 20)]
# not dpm++2m-karras: on squaredcos_cap_v2 its timesteps repeat and diffusers' step index runs off the end (IndexError)
RUNS += [("cosine", name, steps) for name in ("ddim", "euler", "dpm++2m", "pndm") for steps in (4, 20)]
RUNS += [("zero-snr", name, steps) for name in ("ddim", "euler", "dpm++2m", "dpm++2m-karras") for steps in (4, 20)]
RUNS += [("unipc", name, steps) for name in ("dpm++2m", "dpm++2m-karras") for steps in (4, 25)]


def _case_id(config: str, name: str | None, steps: int) -> str:
    return f"{config}-{name or 'own'}-{steps}"


def _noise() -> np.ndarray:
    return np.random.RandomState(0).standard_normal((2, 4, 8, 8)).astype(np.float32)


def _scheduler(config: dict[str, Any], name: str | None) -> Any:
    """diffusers' scheduler for `name` on a folder with `config`: `from_config` with the name's overrides as keywords.

    Not diffship's make_scheduler: it merges overrides into the config dict, where diffusers drops those the folder's
    class had only as defaults (`_use_default_values`), e.g. use_karras_sigmas for a UniPC folder's dpm++2m-karras."""
    import diffusers

    class_name, overrides = NAMES[name] if name else (config["_class_name"], {})
    return getattr(diffusers, class_name).from_config(config, **overrides)


def diffusers_run(config: dict[str, Any], name: str | None, steps: int) -> dict[str, Any]:
    """The fake denoising loop in diffusers, float32 as the pipelines run it: model output = 0.3 x + sin(0.01 t)."""
    scheduler = _scheduler(config, name)
    scheduler.set_timesteps(steps)
    sigma = float(scheduler.init_noise_sigma)
    latents = torch.from_numpy(_noise()) * scheduler.init_noise_sigma
    samples = []
    for t in scheduler.timesteps:
        eps = 0.3 * scheduler.scale_model_input(latents, t) + torch.sin(0.01 * t)
        latents = scheduler.step(eps, t, latents).prev_sample
        samples.append(latents.numpy().ravel())
    return {"timesteps": [float(t) for t in scheduler.timesteps], "initNoiseSigma": sigma, "samples": samples}


def relative_error(ours: Any, theirs: np.ndarray) -> float:
    """max |ours - theirs| relative to max |theirs|: the pass criterion for one step's sample."""
    return float(np.abs(np.asarray(ours, dtype=np.float64) - theirs).max() / np.abs(theirs).max())


def _node(cases: list[dict[str, Any]]) -> dict[str, Any]:
    request = {"noise": _noise().ravel().tolist(), "cases": cases}
    done = subprocess.run(["node", str(HARNESS)], input=json.dumps(request), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


WRONG = {**SD15, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}  # differs from sd15 on purpose
SCHEDULE_STEPS = list(range(1, 52))
UNSUPPORTED = {
    "unknown-class": ({**SD15, "_class_name": "LMSDiscreteScheduler"}, None, "DDIMScheduler"),
    "unknown-name": (SD15, "euler-a", "dpm++2m-karras"),
    "euler-karras": ({**SD15, "use_karras_sigmas": True}, "euler", "use_karras_sigmas"),
    "sde-dpm": ({**SD15, "algorithm_type": "sde-dpmsolver++"}, "dpm++2m", "dpmsolver++"),
    "dpm-order-3": ({**SD15, "solver_order": 3}, "dpm++2m", "solver_order 1 or 2"),
    "pndm-prk": ({**SD15, "skip_prk_steps": False}, "pndm", "skip_prk_steps"),
    "ddim-thresholding": ({**SD15, "thresholding": True}, "ddim", "thresholding"),
    "spacing": ({**SD15, "timestep_spacing": "karras"}, "ddim", "leading, trailing or linspace"),
}


@pytest.fixture(scope="module")
def js() -> dict[str, Any]:
    """Every JS result the tests compare, from one node run."""
    cases: list[dict[str, Any]] = [
        {"id": _case_id(*run), "mode": "run", "config": CONFIGS[run[0]], "name": run[1], "steps": run[2]} for run in RUNS]
    cases.append({"id": "wrong-prediction", "mode": "run", "config": WRONG, "name": "ddim", "steps": 20})
    cases.append({"id": "first-order", "mode": "run", "config": {**SD15, "solver_order": 1}, "name": "dpm++2m", "steps": 20})
    for config in ("sd15", "trailing", "linspace", "sd15-old", "cosine"):
        for name in PORTED:
            cases.append({"id": f"schedule-{config}-{name}", "mode": "schedule", "config": CONFIGS[config], "name": name,
                          "steps": SCHEDULE_STEPS})
    for key in ("sd15", "linear", "cosine", "zero-snr"):
        cases.append({"id": f"alphas-{key}", "mode": "alphas", "config": CONFIGS[key]})
    for key, (config, name, _) in UNSUPPORTED.items():
        cases.append({"id": f"error-{key}", "mode": "error", "config": config, "name": name})
    return _node(cases)


@pytest.mark.parametrize(("config", "name", "steps"), RUNS, ids=[_case_id(*run) for run in RUNS])
def test_trajectory_matches_diffusers(js: dict[str, Any], config: str, name: str | None, steps: int) -> None:
    ours, theirs = js[_case_id(config, name, steps)], diffusers_run(CONFIGS[config], name, steps)
    assert "failed" not in ours, ours.get("failed")
    assert ours["timesteps"] == theirs["timesteps"]
    assert ours["initNoiseSigma"] == pytest.approx(theirs["initNoiseSigma"], rel=1e-6)
    assert len(ours["samples"]) == len(theirs["samples"])
    for i, (a, b) in enumerate(zip(ours["samples"], theirs["samples"], strict=True)):
        assert relative_error(a, b) <= TOLERANCE, f"step {i} (t = {theirs['timesteps'][i]})"


def test_comparison_is_not_vacuous(js: dict[str, Any]) -> None:
    """A wrong prediction type, or a DPM-Solver without its second-order term, fails the same comparison."""
    theirs = diffusers_run(SD15, "ddim", 20)["samples"][-1]
    assert relative_error(js["wrong-prediction"]["samples"][-1], theirs) > 100 * TOLERANCE
    theirs = diffusers_run(SD15, "dpm++2m", 20)["samples"][-1]
    assert relative_error(js["first-order"]["samples"][-1], theirs) > 10 * TOLERANCE


@pytest.mark.parametrize("config", ["sd15", "trailing", "linspace", "sd15-old", "cosine"])
def test_schedules_match_for_any_step_count(js: dict[str, Any], config: str) -> None:
    """Timesteps, sigmas and init_noise_sigma for 1..51 steps: rounding (numpy's half-to-even) and spacing edge cases."""
    for name in PORTED:
        scheduler = _scheduler(CONFIGS[config], name)
        for ours in js[f"schedule-{config}-{name}"]:
            scheduler.set_timesteps(ours["steps"])
            where = f"{name}, {ours['steps']} steps"
            assert ours["timesteps"] == [float(t) for t in scheduler.timesteps], where
            assert ours["initNoiseSigma"] == pytest.approx(float(scheduler.init_noise_sigma), rel=1e-6), where
            if hasattr(scheduler, "sigmas"):
                np.testing.assert_allclose(ours["sigmas"], scheduler.sigmas.numpy(), rtol=1e-6, err_msg=where)


@pytest.mark.parametrize("config", ["sd15", "linear", "cosine", "zero-snr"])
def test_alphas_cumprod_match(js: dict[str, Any], config: str) -> None:
    """The training schedule in float32 as torch computes it (a float32 running product would be ~6e-5 off).

    Zero-SNR rescaling goes through torch.sqrt, whose vectorized float32 kernel (AVX-512 here) is not always correctly
    rounded: 1-ulp differences there grow to a few 1e-6 through the rescaled cumulative product."""
    import diffusers

    theirs = diffusers.DDIMScheduler.from_config(CONFIGS[config]).alphas_cumprod.numpy()
    rtol = 1e-5 if config == "zero-snr" else 1e-6
    np.testing.assert_allclose(js[f"alphas-{config}"], theirs, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_options_throw(js: dict[str, Any], case: str) -> None:
    """Unknown schedulers and options the ports leave out throw an Error that says what is supported."""
    message = js[f"error-{case}"]
    assert message is not None, f"{case}: nothing thrown"
    assert UNSUPPORTED[case][2] in message


def test_names_follow_the_python_runtime() -> None:
    """The ported names are the Python runtime's, with the same classes."""
    source = (Path(__file__).parents[1] / "diffship" / "targets" / "webapp" / "app" / "schedulers" / "index.js").read_text()
    for name in PORTED:
        assert f'"{name}": ["{NAMES[name][0]}"' in source or f'{name}: ["{NAMES[name][0]}"' in source
