"""ControlNets: exported as their own components beside a UNet that takes their residuals, validated end to end
against diffusers' ControlNet pipeline, and run by `generate` with control images, several at once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from controlnet_files import tiny_controlnet
from typer.testing import CliRunner

from diffship.cli.main import app
from diffship.models.builtin import builtin_folder
from diffship.runtime.control import Control
from diffship.runtime.pipeline import DeployedPipeline, initial_latents
from diffship.runtime.tasks import default_image
from diffship.validation.e2e import compare_images


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> list[Path]:
    out = tmp_path_factory.mktemp("controlnets")
    return [tiny_controlnet(builtin_folder("tiny-sd"), out / f"net{i}", seed=i, strength=2.0) for i in range(2)]


def _build(nets: list[Path], root: Path, targets: str) -> tuple[object, Path]:
    out = root / "out"
    recipe = root / "fast.toml"
    # Latency as the default recipe measures it: every component, the ControlNets' included, against PyTorch.
    recipe.write_text('[validation]\nprompts = ["a lighthouse"]\nsteps = 3\nguidance_scale = 6.0\ncontrol_scale = 0.8\n'
                      'control_start = 0.1\ncontrol_end = 0.9\n')
    result = CliRunner().invoke(app, ["build", str(recipe), "--model", "tiny-sd", "--controlnet", str(nets[0]),
                                      "--controlnet", str(nets[1]), "--targets", targets, "--out", str(out)])
    return result, out


@pytest.fixture(scope="module")
def built(nets, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    """tiny-sd with both ControlNets on ONNX Runtime FP32 and INT8, through the command line."""
    return _build(nets, tmp_path_factory.mktemp("controlnet-build"), "onnxruntime:fp32+int8")


@pytest.fixture(scope="module")
def built_openvino(nets, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    """The same on OpenVINO FP32."""
    return _build(nets, tmp_path_factory.mktemp("controlnet-build"), "openvino:fp32")


@pytest.mark.parametrize(("which", "key"), [("built", "onnxruntime-fp32"),
                                            pytest.param("built_openvino", "openvino-fp32", marks=pytest.mark.slow)])
def test_a_controlnet_build_draws_diffusers_controlnet_pipelines_image(which: str, key: str, request):
    result, out = request.getfixturevalue(which)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["source"]["controlnets"]) == 2
    report = json.loads((out / "report" / "report.json").read_text())
    assert {"controlnet", "controlnet_1", "controlled_unet"} <= set(manifest["artifacts"][key]["components"])
    r = report["sets"][key]
    assert {"controlnet", "controlnet_1", "controlled_unet"} <= set(r["parity"]["components"])
    controlled = r["e2e"]["tasks"]["controlnet"]
    assert controlled["passed"] and controlled["images"] == 1
    assert controlled["min_psnr_db"] is None or controlled["min_psnr_db"] >= 35, controlled
    # The default recipe's latency step times the ControlNets against their PyTorch modules (it crashed here once:
    # the baseline pipeline of the main task holds no ControlNet).
    timed = r["latency"]["components"]
    assert {"controlnet", "controlnet_1", "controlled_unet", "unet"} <= set(timed), sorted(timed)
    assert all(timed[c]["baseline"]["p50_s"] > 0 and timed[c]["target"]["p50_s"] > 0 for c in timed)
    assert r["latency"]["pipeline"]["baseline"]["total"]["p50_s"] > 0


def test_int8_calibrates_the_controlled_unet_on_the_controlnets_real_residuals(built):
    """The UNet variant is quantized statically from calls captured under the ControlNets (its residual inputs
    included), and the INT8 set's controlled images still match diffusers'."""
    result, out = built
    assert result.exit_code == 0, result.output
    graph = json.loads((out / "onnxruntime-int8" / "controlled_unet" / "diffship-graph.json").read_text())
    assert "static QDQ" in graph["quantization"] and graph["calibration_samples"] > 0
    import onnx

    model = onnx.load(str(out / "onnxruntime-int8" / "controlled_unet" / "model.onnx"))
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) > 0
    residual_inputs = [i.name for i in model.graph.input if i.name.startswith(("down_block_", "mid_block"))]
    assert len(residual_inputs) == 7  # tiny-sd: conv_in, three blocks of one layer, two downsamplers, the mid block
    e2e = json.loads((out / "report" / "report.json").read_text())["sets"]["onnxruntime-int8"]["e2e"]
    assert e2e["tasks"]["controlnet"]["passed"], e2e["tasks"]


def test_the_control_images_change_the_image_so_the_check_can_fail(built):
    """Two ControlNets at 0.8 move the image far (well under the 35 dB bar) from the same seed without them."""
    _, out = built
    pipe = DeployedPipeline.load(out, "onnxruntime", "fp32")
    latents = initial_latents(0, 1, 4, 8, 8)
    plain = pipe("a lighthouse", None, 64, 64, 3, 6.0, 0, latents=latents).images[0]
    controls = [Control(default_image(64, 64, seed=3), 0.8, 0.1, 0.9)] * 2
    controlled = pipe("a lighthouse", None, 64, 64, 3, 6.0, 0, latents=latents, controls=controls).images[0]
    assert compare_images(plain, controlled)["psnr_db"] < 30


def test_generate_with_two_control_images_reproduces_diffusers_multi_controlnet(built, nets, tmp_path: Path):
    """Per-net scales and a control-guidance window, through the command line, against diffusers' own pipeline."""
    import diffusers
    from PIL import Image

    from diffship.validation.baseline import load_baseline

    _, out = built
    first, second = default_image(64, 64, seed=5), default_image(64, 64, seed=6)
    first.save(tmp_path / "a.png")
    second.save(tmp_path / "b.png")
    said = CliRunner().invoke(app, ["generate", str(out), "-p", "a lighthouse", "--steps", "4", "-g", "5",
                                    "--control-image", str(tmp_path / "a.png"), "--control-image", str(tmp_path / "b.png"),
                                    "--control-scale", "1.2", "--control-scale", "0.6", "--control-start", "0.25",
                                    "--control-end", "0.75", "--out", str(tmp_path / "out.png")])
    assert said.exit_code == 0, said.output
    mine = np.asarray(Image.open(tmp_path / "out.png").convert("RGB"))
    folder = Path(json.loads((out / "manifest.json").read_text())["source"]["folder"])
    pipe = load_baseline(folder, device="cpu", dtype=torch.float32)
    multi = diffusers.MultiControlNetModel([diffusers.ControlNetModel.from_pretrained(n) for n in nets])
    theirs = diffusers.StableDiffusionControlNetPipeline.from_pipe(pipe, controlnet=multi)(
        "a lighthouse", image=[first, second], controlnet_conditioning_scale=[1.2, 0.6], control_guidance_start=0.25,
        control_guidance_end=0.75, num_inference_steps=4, guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    theirs = (theirs * 255).round().astype(np.uint8)
    metrics = compare_images(theirs, mine)
    assert metrics["identical"] or metrics["psnr_db"] >= 35, metrics


def test_control_images_the_build_cannot_take_are_refused(built, tmp_path: Path):
    _, out = built
    default_image(64, 64).save(tmp_path / "a.png")
    said = CliRunner().invoke(app, ["generate", str(out), "-p", "x", "--control-image", str(tmp_path / "a.png"),
                                    "--out", str(tmp_path / "o.png")])
    assert said.exit_code == 2 and "1 control image(s) for 2 ControlNet(s)" in said.output, said.output
    said = CliRunner().invoke(app, ["generate", str(out), "-p", "x", "--control-scale", "0.5", "--out", str(tmp_path / "o.png")])
    assert said.exit_code == 2 and "give it with --control-image" in said.output, said.output


def test_a_folder_that_is_not_a_fitting_controlnet_is_refused(tmp_path: Path, model_cache: Path):
    said = CliRunner().invoke(app, ["export", "--model", "tiny-sd", "--controlnet", str(builtin_folder("tiny-sd") / "unet"),
                                    "--out", str(tmp_path / "o")])
    assert said.exit_code == 2 and "not a ControlNetModel" in said.output, said.output
    wrong = tiny_controlnet(builtin_folder("tiny-sd"), tmp_path / "net")
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps(config | {"cross_attention_dim": 48}))
    said = CliRunner().invoke(app, ["export", "--model", "tiny-sd", "--controlnet", str(wrong), "--out", str(tmp_path / "o")])
    assert said.exit_code == 2 and "its cross_attention_dim is 48" in said.output, said.output
    assert not (tmp_path / "o").exists()
