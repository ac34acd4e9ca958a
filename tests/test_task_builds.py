"""Builds validate the task a model is for: the SDXL refiner by img2img, an inpainting model by inpainting, each
against diffusers' pipeline of that task, at FP32 on ONNX Runtime and as OpenVINO int8-hybrid (calibrated on its own
task's UNet inputs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from diffship.cli.main import app

VALIDATION = {"prompts": ["a lighthouse at dusk"], "seeds": [0], "steps": 4, "guidance_scale": 6.0,
              "latency": {"enabled": True, "warmup": 1, "runs": 2, "pipeline_runs": 1}}
# The refiner's build also samples with an ancestral scheduler: its noise is drawn from the seed on both sides.
SCHEDULER = {"tiny-sdxl-refiner": {"scheduler": "euler-a"}, "tiny-sd-inpaint": {}}
CALIBRATION = {"prompts": ["a red bicycle", "a bowl of fruit", "a lighthouse"], "samples": 8, "steps": 4}
# ONNX Runtime FP32 in `make test`; OpenVINO int8-hybrid beside it (calibrated on the task's own UNet inputs) in
# `make test-all`.
TARGETS = ["onnxruntime:fp32", pytest.param("onnxruntime:fp32,openvino:int8-hybrid", marks=pytest.mark.slow)]


@pytest.mark.parametrize("targets", TARGETS)
@pytest.mark.parametrize(("name", "task", "channels"), [("tiny-sdxl-refiner", "img2img", 4),
                                                         ("tiny-sd-inpaint", "inpaint", 9)])
def test_a_build_validates_the_task_the_model_is_for(tiny_build, name: str, task: str, channels: int, targets: str):
    result = tiny_build(name, targets, validation=VALIDATION | SCHEDULER[name], calibration=CALIBRATION)
    assert result.passed, {k: r["passed"] for k, r in result.report["sets"].items()}
    for key, r in result.report["sets"].items():
        e2e = r["e2e"]
        assert list(e2e["tasks"]) == [task] and all(s["task"] == task for s in e2e["samples"])
        # The UNet's real steps come from the task's own run: strength 0.75 of 4 steps is 3 calls (PNDM adds one
        # more for a full text-to-image run), and an inpainting UNet's sample has the mask and masked latents beside it.
        steps = r["parity"]["denoiser_steps"]["steps"]
        assert len(steps) == 3 if task == "img2img" else len(steps) >= 3
        assert r["latency"]["pipeline"]["task"] == task and r["latency"]["pipeline"]["target"]["total"]["p50_s"] > 0
        grid = result.out / "report" / "images" / f"grid-{key}.png"
        assert grid.stat().st_size > 1000
    expected = "EulerAncestralDiscreteScheduler" if name == "tiny-sdxl-refiner" else "PNDMScheduler"
    assert {r["scheduler"]["class"] for r in result.report["sets"].values()} == {expected}
    assert f"scheduler {expected}" in (result.out / "report" / "report.md").read_text()
    fp32 = result.report["sets"]["onnxruntime-fp32"]["e2e"]
    assert fp32["min_psnr_db"] is None or fp32["min_psnr_db"] >= 35
    assert channels == json.loads((result.out / "onnx" / "unet" / "config.json").read_text())["in_channels"]


def test_the_recipe_names_the_init_image_and_mask_relative_to_itself(tmp_path: Path):
    from diffship.recipe import load_recipe
    from diffship.runtime.tasks import task_inputs

    Image.fromarray(np.full((32, 48, 3), 200, np.uint8)).save(tmp_path / "init.png")
    Image.fromarray(np.full((32, 48), 255, np.uint8)).save(tmp_path / "mask.png")
    (tmp_path / "r.toml").write_text('[validation]\nimage = "init.png"\nmask = "mask.png"\nstrength = 0.5\n')
    recipe = load_recipe(tmp_path / "r.toml")
    assert recipe.validation.image == tmp_path / "init.png"
    inputs = task_inputs(64, 64, recipe.validation.image, recipe.validation.mask, recipe.validation.strength)
    assert inputs.image.size == (64, 64) and np.asarray(inputs.image).min() == 200  # resized to the validation size
    assert np.asarray(inputs.mask).min() == 255 and inputs.strength == 0.5
    assert inputs.deployed_kwargs("inpaint").keys() == {"image", "mask", "strength"}
    assert inputs.diffusers_kwargs("inpaint").keys() == {"image", "mask_image", "strength"}
    assert inputs.diffusers_kwargs("text2img") == {}


@pytest.mark.parametrize(("line", "message"), [
    ('image = "missing.png"', "[validation] image"),
    ('mask = "notes.txt"', "is not an image diffship can read"),
    ("strength = 1.5", "validation.strength"),
])
def test_a_bad_validation_image_mask_or_strength_exits_2_before_any_work(tmp_path: Path, line: str, message: str):
    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "r.toml").write_text(f'model = "tiny-sd"\n[validation]\n{line}\n')
    result = CliRunner().invoke(app, ["build", str(tmp_path / "r.toml"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "exporting" not in result.output
    assert not (tmp_path / "out").exists()


def test_compress_refuses_a_model_that_does_not_draw_from_text(tmp_path: Path, model_cache: Path):
    result = CliRunner().invoke(app, ["compress", "--model", "tiny-sdxl-refiner", "--step", "prune-channels:ratio=0.3",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "compress measures and distills on text-to-image generations" in result.output
    assert "img2img and inpaint" in result.output
