"""Single-file checkpoints in the original (LDM / A1111) layout: detected from their tensors, converted offline
with diffusers' own loader against a shipped or given configuration, weights unchanged."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
import pytest
import torch
from ldm_checkpoint import write_ldm_checkpoint
from safetensors.torch import load_file
from typer.testing import CliRunner

from diffship.cli.main import app
from diffship.errors import DiffshipError
from diffship.models.builtin import builtin_folder
from diffship.models.single_file import detect_config, standard_config_names
from diffship.models.source import resolve


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, model_cache: Path):
    """checkpoint(name) -> built-in `name` written as one original-layout .safetensors file (once per module)."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            done[name] = write_ldm_checkpoint(builtin_folder(name), tmp_path_factory.mktemp("ckpt") / f"{name}.safetensors")
        return done[name]

    return get


def _tensors(folder: Path, component: str) -> dict[str, torch.Tensor]:
    return load_file(next((folder / component).glob("*.safetensors")))


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd-inpaint"])
def test_a_checkpoint_given_its_config_folder_converts_to_the_same_weights(checkpoint, name: str):
    source = resolve(str(checkpoint(name)), model_config=builtin_folder(name))
    assert source.kind == "single-file" and source.folder != builtin_folder(name)
    for component in ("unet", "vae", "text_encoder"):
        ours, theirs = _tensors(source.folder, component), _tensors(builtin_folder(name), component)
        assert ours.keys() == theirs.keys(), component
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), component
    # Converted once: the same file and configuration resolve to the same cached folder without converting again.
    said: list[str] = []
    again = resolve(str(checkpoint(name)), model_config=builtin_folder(name), say=said.append)
    assert again.folder == source.folder and not said


@pytest.mark.parametrize(("name", "config"), [("tiny-sd", "sd1"), ("tiny-sd-inpaint", "sd1-inpaint")])
def test_the_architecture_is_detected_from_the_tensors(checkpoint, name: str, config: str):
    assert detect_config(checkpoint(name)) == config
    assert {"sd1", "sd1-inpaint", "sd2-512", "sd2-768-v", "sd2-inpaint", "sdxl", "sdxl-refiner",
            "sdxl-inpaint"} <= set(standard_config_names())


def test_a_tiny_checkpoint_against_the_standard_config_fails_with_the_reason(checkpoint):
    """Detected as SD 1.x, but its shapes are not SD 1.5's: diffusers' loader refuses, and the error says so."""
    with pytest.raises(DiffshipError, match="could not convert .*sd1"):
        resolve(str(checkpoint("tiny-sd")))


def _initializer_digest(model: Path) -> dict[str, str]:
    graph = onnx.load(str(model)).graph
    return {i.name: hashlib.sha256(onnx.numpy_helper.to_array(i).tobytes()).hexdigest() for i in graph.initializer}


def test_exporting_a_checkpoint_gives_the_folders_onnx_weights(checkpoint, exported, tmp_path: Path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", "--model", str(checkpoint("tiny-sd")), "--model-config",
                                      str(builtin_folder("tiny-sd")), "--out", str(out), "-c", "unet"])
    assert result.exit_code == 0, result.output
    assert _initializer_digest(out / "unet" / "model.onnx") == _initializer_digest(exported("tiny-sd") / "unet" / "model.onnx")


@pytest.mark.parametrize(("args", "message"), [
    (["--model-config", "sd9"], "neither a shipped configuration"),
    (["--allow-pickle"], None),
])
def test_bad_single_file_options_exit_2(checkpoint, tmp_path: Path, args: list[str], message: str | None):
    if message is None:  # a .ckpt is read with --allow-pickle (torch's weights-only loader), then detected
        ckpt = tmp_path / "model.ckpt"
        torch.save({"state_dict": {"junk": torch.zeros(1)}}, ckpt)
        model, message = str(ckpt), "not a Stable Diffusion 1.x / 2.x / XL checkpoint"
    else:
        model = str(checkpoint("tiny-sd"))
    result = CliRunner().invoke(app, ["export", "--model", model, *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_a_checkpoint_builds_and_validates_end_to_end(checkpoint, fast_recipe: Path, tmp_path: Path):
    """`diffship build` of a single file with the suite's recipe (the default recipe's validation, latency on): the
    converted folder is the baseline and the source of every artifact, recorded as such."""
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["build", str(fast_recipe), "--model", str(checkpoint("tiny-sd")),
                                      "--model-config", str(builtin_folder("tiny-sd")), "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["passed"] and manifest["source"]["kind"] == "single-file"
    assert manifest["source"]["model"] == str(checkpoint("tiny-sd"))
    r = json.loads((out / "report" / "report.json").read_text())["sets"]["onnxruntime-fp32"]
    assert r["e2e"]["passed"] and r["latency"]["pipeline"]["target"]["total"]["p50_s"] > 0
