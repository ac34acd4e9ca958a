import json
from pathlib import Path

import numpy as np
import pytest

from diffship.models.builtin import BUILTINS, builtin_folder, write_builtin
from diffship.models.families import detect_family
from diffship.store.artifacts import sha256_file


@pytest.mark.parametrize(("name", "family"), [("tiny-sd", "sd1"), ("tiny-sd2", "sd2"), ("tiny-sdxl", "sdxl"),
                                              ("tiny-sdxl-refiner", "sdxl-refiner")])
def test_tiny_builtins_are_small_and_detected_as_their_family(name: str, family: str):
    folder = builtin_folder(name)
    assert detect_family(folder).name == family
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 40 * 2**20


def test_builtin_weights_are_deterministic(tmp_path: Path):
    write_builtin(BUILTINS["tiny-sd"], tmp_path)
    cached = builtin_folder("tiny-sd")
    for rel in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert sha256_file(tmp_path / rel) == sha256_file(cached / rel)


def test_sd2_builtin_predicts_v_and_sdxl_builtin_has_added_conditioning():
    sd2 = json.loads((builtin_folder("tiny-sd2") / "scheduler/scheduler_config.json").read_text())
    assert sd2["prediction_type"] == "v_prediction"
    unet = json.loads((builtin_folder("tiny-sdxl") / "unet/config.json").read_text())
    assert unet["addition_embed_type"] == "text_time"


def test_full_size_builtins_have_the_real_shapes():
    # Checked from the declarations (building them takes GBs: benchmarks/ does that).
    assert BUILTINS["sd15-arch"].denoiser["block_out_channels"] == [320, 640, 1280, 1280]
    assert BUILTINS["sd15-arch"].text_encoders[0]["hidden_size"] == 768
    xl = BUILTINS["sdxl-arch"]
    assert xl.denoiser["transformer_layers_per_block"] == [1, 2, 10]
    assert xl.denoiser["projection_class_embeddings_input_dim"] == 6 * 256 + 1280
    assert xl.text_encoders[1]["num_hidden_layers"] == 32


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_diffusers_loads_builtin_as_a_pipeline_and_generates(name: str):
    import diffusers

    cls = diffusers.StableDiffusionXLPipeline if name == "tiny-sdxl" else diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(builtin_folder(name))
    image = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd2", "tiny-sdxl", "tiny-sdxl-refiner"])
def test_declared_family_of_each_builtin_is_what_detection_finds(name: str):
    assert BUILTINS[name].family == detect_family(builtin_folder(name)).name
