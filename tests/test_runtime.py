"""The deployed pipeline: prompt -> image through ONNX Runtime runners, reproducing diffusers' PyTorch pipeline."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffship.cli.main import app
from diffship.errors import DiffshipError
from diffship.models.source import resolve
from diffship.runtime.pipeline import DeployedPipeline, initial_latents
from diffship.validation.baseline import load_baseline, run_baseline
from diffship.validation.e2e import compare_images

runner = CliRunner()


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd2", "tiny-sdxl"])
@pytest.mark.parametrize("negative", [None, "blurry, low quality"])
def test_onnxruntime_pipeline_reproduces_diffusers_given_the_same_latents(exported, name: str, negative: str | None):
    deployed = DeployedPipeline.load(exported(name))
    baseline = load_baseline(resolve(name).folder)
    latents = initial_latents(7, 1, 4, 8, 8)
    ours = deployed("a lighthouse at dusk", negative, 64, 64, steps=4, guidance_scale=6.0, seed=7, latents=latents)
    theirs = run_baseline(baseline, "a lighthouse at dusk", negative, 64, 64, 4, 6.0, 7, latents)
    metrics = compare_images(theirs.images[0], ours.images[0])
    assert metrics["identical"] or metrics["psnr_db"] >= 40, metrics
    assert metrics["max_abs_diff"] <= 2, metrics


def test_a_seed_draws_the_same_latents_as_diffusers_and_batches_repeat_each_prompt(exported):
    deployed = DeployedPipeline.load(exported("tiny-sd"))
    baseline = load_baseline(resolve("tiny-sd").folder)
    seeded = deployed(["a cat", "a dog"], height=64, width=128, steps=2, seed=3, batch=2)
    assert seeded.images.shape == (4, 64, 128, 3)
    explicit = deployed(["a cat", "a dog"], height=64, width=128, steps=2, seed=3, batch=2,
                        latents=initial_latents(3, 4, 4, 8, 16))
    assert np.array_equal(seeded.images, explicit.images)
    theirs = baseline(["a cat", "a dog"], height=64, width=128, num_inference_steps=2, num_images_per_prompt=2,
                      generator=torch.Generator().manual_seed(3), output_type="np").images
    assert np.abs((theirs * 255).round().astype(np.int16) - seeded.images).max() <= 2
    # PNDM (PLMS) runs one extra warm-up step: as many UNet steps as the scheduler's timesteps
    assert len(seeded.timings["steps"]) == len(deployed.scheduler.timesteps) and seeded.timings["total"] > 0


def test_without_guidance_the_unet_runs_on_the_prompt_alone(exported):
    deployed = DeployedPipeline.load(exported("tiny-sd"))
    baseline = load_baseline(resolve("tiny-sd").folder)
    latents = initial_latents(1, 1, 4, 8, 8)
    ours = deployed("a cat", steps=3, guidance_scale=1.0, seed=1, latents=latents)
    theirs = run_baseline(baseline, "a cat", None, 64, 64, 3, 1.0, 1, latents)
    assert compare_images(theirs.images[0], ours.images[0])["max_abs_diff"] <= 2


def test_generate_writes_a_png_and_reports_its_speed(built, tmp_path: Path):
    folder = built("tiny-sd").out
    out = tmp_path / "cat.png"
    result = runner.invoke(app, ["generate", str(folder), "--prompt", "a cat", "--steps", "3", "--out", str(out),
                                 "--backend", "onnxruntime", "--height", "128", "--width", "64"])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (64, 128)
    assert "ms per step" in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--height", "256"], "height 256 is outside the range"),
    (["--batch", "3"], "batch 3 is outside the range"),
    (["--width", "96"], "multiples of 64"),
    (["--backend", "openvino"], "has no openvino"),
    (["--out", "image.jpg"], "must be a .png"),
])
def test_generate_refuses_what_the_artifacts_were_not_built_for(built, tmp_path: Path, args: list[str], message: str):
    result = runner.invoke(app, ["generate", str(built("tiny-sd").out), "-p", "a cat", "--steps", "1",
                                 "--out", str(tmp_path / "x.png"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "x.png").exists()


def test_generate_refuses_artifacts_that_do_not_match_the_manifest(built, tmp_path: Path):
    folder = tmp_path / "copy"
    shutil.copytree(built("tiny-sd").out, folder)
    unet = folder / "onnx" / "unet" / "model.onnx"
    data = bytearray(unet.read_bytes())
    data[-1] ^= 0xFF
    unet.unlink()  # the build hard-links from the cache: replace the file, never write through the link
    unet.write_bytes(bytes(data))
    result = runner.invoke(app, ["generate", str(folder), "-p", "a cat", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert "does not match the sha256" in result.output and "unet/model.onnx" in result.output
    unet.unlink()
    shutil.copy2(built("tiny-sd").out / "onnx" / "unet" / "model.onnx", unet)
    (folder / "onnx" / "tokenizer" / "vocab.json").unlink()
    with pytest.raises(DiffshipError, match="vocab.json is listed in .* but missing"):
        DeployedPipeline.load(folder)


def test_an_export_folder_runs_too_and_its_manifest_is_checked(exported):
    folder = exported("tiny-sd")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert DeployedPipeline.load(folder).artifacts.shapes is None
    assert manifest["components"]["unet"]["files"]


def test_validate_accepts_a_build_folder(built):
    result = runner.invoke(app, ["validate", str(built("tiny-sd").out), "-c", "unet"])
    assert result.exit_code == 0, result.output
    assert "parity passed" in result.stdout
