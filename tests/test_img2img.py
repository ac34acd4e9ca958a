"""img2img through the deployed pipeline: the exported VAE encoder, the strength's timesteps and diffusers' random
draws in diffusers' order, so ONNX Runtime at FP32 reproduces diffusers' Img2Img pipelines for the same seed."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from diffship.errors import DiffshipError
from diffship.models.source import resolve
from diffship.runtime.pipeline import DeployedPipeline
from diffship.validation.baseline import load_baseline
from diffship.validation.e2e import compare_images


def _image(seed: int, size: int = 64) -> np.ndarray:
    """A smooth colour field in [0, 1], HWC: something a VAE encodes to structured latents."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, size=(4, 4, 3))
    return np.kron(coarse, np.ones((size // 4, size // 4, 1))).astype(np.float32)


def _diffusers(name: str, image: np.ndarray, strength: float, seed: int, output: str) -> np.ndarray:
    pipe = load_baseline(resolve(name).folder, device="cpu", dtype=torch.float32, task="img2img")
    out = pipe("a lighthouse at dusk", image=image[None], strength=strength, num_inference_steps=4,
               guidance_scale=6.0, generator=torch.Generator("cpu").manual_seed(seed), output_type=output).images
    return out.numpy() if output == "latent" else (out * 255).round().astype(np.uint8)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl", "tiny-sdxl-refiner"])
def test_img2img_reproduces_diffusers_final_latents_for_the_same_seed(exported, name: str):
    """Compared on the final latents: a random-weight VAE decodes any latents to nearly the same image (a changed
    init image moves these images by only 40-50 dB PSNR), while the latents show the init image's effect."""
    deployed = DeployedPipeline.load(exported(name))
    ours = deployed("a lighthouse at dusk", steps=4, guidance_scale=6.0, seed=5, image=_image(1), strength=0.75)
    theirs = _diffusers(name, _image(1), 0.75, 5, "latent")
    assert _relative(theirs, ours.latents) < 1e-4  # measured 1e-6
    # The check can fail: another init image, same seed and prompt, moves the latents 1-3 %, far outside it.
    other = deployed("a lighthouse at dusk", steps=4, guidance_scale=6.0, seed=5, image=_image(2), strength=0.75)
    assert _relative(theirs, other.latents) > 1e-2
    # Strength 0.75 of 4 steps skips the first timestep (PNDM's list has one warm-up step more than Euler's).
    assert len(ours.timings["steps"]) == len(deployed.scheduler.timesteps) - 1


def test_img2img_on_the_trained_model_reproduces_diffusers_images(exported):
    """digits-sd's trained VAE makes the init image visible in pixels: another init image is 16 dB away."""
    deployed = DeployedPipeline.load(exported("digits-sd"))
    ours = deployed("a lighthouse at dusk", steps=4, guidance_scale=6.0, seed=5, image=_image(1, 32), strength=0.5)
    theirs = _diffusers("digits-sd", _image(1, 32), 0.5, 5, "np")
    metrics = compare_images(theirs[0], ours.images[0])
    assert metrics["identical"] or metrics["psnr_db"] >= 35, metrics
    other = deployed("a lighthouse at dusk", steps=4, guidance_scale=6.0, seed=5, image=_image(2, 32), strength=0.5)
    assert compare_images(theirs[0], other.images[0])["psnr_db"] < 25


def test_the_refiner_refuses_text_to_image_and_strength_out_of_range(exported):
    deployed = DeployedPipeline.load(exported("tiny-sdxl-refiner"))
    with pytest.raises(DiffshipError, match="init image"):
        deployed("a cat", steps=2)
    with pytest.raises(DiffshipError, match=r"Strength must be in \(0, 1\]"):
        deployed("a cat", steps=2, image=_image(1), strength=0.0)


def test_generate_with_an_init_image_writes_an_image_of_its_size(exported, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from diffship.cli.main import app

    init = tmp_path / "init.png"
    Image.fromarray((_image(3, 128)[:64] * 255).astype(np.uint8)).save(init)  # 128 wide, 64 high
    out = tmp_path / "out.png"
    result = CliRunner().invoke(app, ["generate", str(exported("tiny-sd")), "-p", "a cat", "--steps", "2",
                                      "--image", str(init), "--strength", "0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (128, 64) and "128" in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--image", "missing.png"], "does not exist"),
    (["--image", "not-an-image.png"], "not an image"),
    (["--strength", "0.5"], "--strength applies to img2img"),
    (["--image", "init.png", "--strength", "1.5"], r"Strength must be in \(0, 1\]"),
    (["--image", "init.png", "--height", "128"], "generates at the image's size"),
])
def test_generate_refuses_bad_img2img_requests(exported, tmp_path, monkeypatch, args, message):
    from PIL import Image
    from typer.testing import CliRunner

    from diffship.cli.main import app

    monkeypatch.chdir(tmp_path)
    Image.fromarray((_image(3) * 255).astype(np.uint8)).save("init.png")
    (tmp_path / "not-an-image.png").write_bytes(b"text, not a PNG")
    result = CliRunner().invoke(app, ["generate", str(exported("tiny-sd")), "-p", "a cat", "--steps", "2", *args])
    assert result.exit_code == 2, result.output
    assert re.search(message, " ".join(result.output.split())), result.output
    assert not (tmp_path / "image.png").exists()
