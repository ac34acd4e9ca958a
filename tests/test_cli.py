"""The command line: exit codes 0 ok, 1 parity failed, 2 bad input; output a person reads."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from typer.testing import CliRunner

from diffship.cli.main import app

runner = CliRunner()


def test_models_lists_the_builtins():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    for name in ("tiny-sd", "tiny-sdxl", "sd15-arch", "sdxl-arch"):
        assert name in result.stdout


def test_models_describes_a_folder(model_copy):
    result = runner.invoke(app, ["models", str(model_copy("tiny-sdxl"))])
    assert result.exit_code == 0, result.output
    assert "Stable Diffusion XL" in result.stdout and "text_encoder_2" in result.stdout and "time_ids" in result.stdout


def test_export_then_validate_passes_with_a_step_line_per_component(tmp_path: Path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", "--model", "tiny-sd", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for i, name in enumerate(["text_encoder", "unet", "vae_encoder", "vae_decoder"], start=1):
        assert f"[{i}/4] export {name}" in result.output
    result = runner.invoke(app, ["validate", str(out)])
    assert result.exit_code == 0, result.output
    assert "parity passed" in result.stdout
    assert json.loads((out / "parity.json").read_text())["passed"] is True


def test_export_of_selected_components(tmp_path: Path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", "-m", "tiny-sdxl", "-o", str(out), "-c", "unet,vae_decoder"])
    assert result.exit_code == 0, result.output
    assert sorted(json.loads((out / "manifest.json").read_text())["components"]) == ["unet", "vae_decoder"]


def test_validate_exits_1_and_still_writes_the_report_when_parity_fails(exported, tmp_path: Path):
    folder = tmp_path / "tampered"
    shutil.copytree(exported("tiny-sd"), folder)
    (folder / "parity.json").unlink(missing_ok=True)
    path = folder / "vae_decoder" / "model.onnx"
    model = onnx.load(str(path))
    weight = next(t for t in model.graph.initializer if t.name.endswith("conv_out.weight"))
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * np.float32(0.9), weight.name))
    onnx.save(model, str(path))
    result = runner.invoke(app, ["validate", str(folder)])
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.stdout
    report = json.loads((folder / "parity.json").read_text())
    assert report["passed"] is False and report["components"]["unet"]["passed"] is True


def test_bad_inputs_exit_2_with_a_specific_message(tmp_path: Path):
    cases = [
        (["export", "-m", "no-such-model", "-o", str(tmp_path / "a")], "Unknown model"),
        (["export", "-m", str(tmp_path), "-o", str(tmp_path / "b")], "no model_index.json"),
        (["export", "-m", "tiny-sd", "-o", str(tmp_path / "c"), "-c", "controlnet"], "Unknown component"),
        (["export", "-m", "tiny-sd", "-o", str(tmp_path / "d"), "--opset", "9"], "Opset 9"),
        (["export", "-m", "tiny-sd", "-o", "/proc/diffship-out"], "not writable"),
        (["validate", str(tmp_path)], "not a diffship output folder"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_existing_output_with_other_content_exits_2_and_is_left_untouched(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["export", "-m", "tiny-sd", "-o", str(out), "--overwrite"])
    assert result.exit_code == 2 and "did not write" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_overwrite_replaces_an_earlier_diffship_output(tmp_path: Path):
    out = tmp_path / "out"
    assert runner.invoke(app, ["export", "-m", "tiny-sd", "-o", str(out), "-c", "vae_decoder"]).exit_code == 0
    assert runner.invoke(app, ["export", "-m", "tiny-sd", "-o", str(out), "-c", "unet"]).exit_code == 2
    result = runner.invoke(app, ["export", "-m", "tiny-sd", "-o", str(out), "-c", "unet", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert sorted(json.loads((out / "manifest.json").read_text())["components"]) == ["unet"]
    assert not (out / "vae_decoder").exists()
