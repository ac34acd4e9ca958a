"""ONNX Runtime INT8: a static QDQ UNet calibrated on captured inputs, dynamic INT8 text encoders, FP32 VAE."""

import json
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from diffship.cli.main import app
from diffship.store.artifacts import sha256_file

runner = CliRunner()


@pytest.fixture(scope="module")
def int8_build(tiny_build):
    return tiny_build("tiny-sd", "onnxruntime:int8")


def ops(path: Path) -> list[onnx.NodeProto]:
    return list(onnx.load(str(path), load_external_data=False).graph.node)


def test_the_unet_is_static_qdq_from_the_prepared_graph_except_its_sensitive_layers(int8_build):
    nodes = ops(int8_build.out / "onnxruntime-int8" / "unet" / "model.onnx")
    assert sum(n.op_type == "QuantizeLinear" for n in nodes) > 10
    produced_by = {o: n for n in nodes for o in n.output}
    sensitive = [n for n in nodes if n.op_type == "Conv" and any(k in n.name for k in ("conv_in", "conv_out", "shortcut"))]
    assert len(sensitive) >= 3
    for conv in sensitive:
        weight_source = produced_by.get(conv.input[1])
        assert weight_source is None or weight_source.op_type != "DequantizeLinear", conv.name  # kept in float
    quantized_convs = [n for n in nodes if n.op_type == "Conv" and produced_by.get(n.input[1]) is not None
                       and produced_by[n.input[1]].op_type == "DequantizeLinear"]
    assert quantized_convs
    # quantized after graph preparation: attention runs in MultiHeadAttention, its projections are INT8 MatMuls
    assert any(n.op_type == "MultiHeadAttention" for n in nodes)
    graph = json.loads((int8_build.out / "onnxruntime-int8" / "unet" / "diffship-graph.json").read_text())
    assert graph["calibration_samples"] == 12 and graph["fused"]["MultiHeadAttention"] > 0
    assert (int8_build.out / "onnxruntime-int8" / "unet" / "calibration-ranges.json").is_file()


def test_text_encoders_are_dynamic_int8_and_the_vae_is_the_fp32_export(int8_build):
    encoder = ops(int8_build.out / "onnxruntime-int8" / "text_encoder" / "model.onnx")
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in encoder)
    for vae in ("vae_encoder", "vae_decoder"):
        assert sha256_file(int8_build.out / "onnxruntime-int8" / vae / "model.onnx") == sha256_file(
            int8_build.out / "onnx" / vae / "model.onnx")
    index = json.loads((int8_build.out / "onnxruntime-int8" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"  # diffusers' form, which optimum-onnx loads


def test_int8_passes_the_int8_bar_on_every_real_step_and_draws_a_close_image(int8_build):
    result = int8_build.report["sets"]["onnxruntime-int8"]
    assert result["parity"]["tolerance"] == {"min_cosine": 0.99, "max_rel_l2": 0.15}
    assert result["passed"], result["parity"]
    assert result["runtime"]["unet"]["summary"] == "ONNX Runtime CPU int8"
    assert result["e2e"]["min_psnr_db"] > 30
    assert result["parity"]["denoiser_steps"]["min_cosine"] > 0.995


def test_an_unknown_calibration_method_exits_2(tmp_path: Path):
    (tmp_path / "r.toml").write_text("[[targets]]\nname = 'onnxruntime'\nprecisions = ['int8']\n"
                                     "options = { calibration_method = 'kl' }\n")
    result = runner.invoke(app, ["build", str(tmp_path / "r.toml"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Unknown ONNX Runtime calibration_method 'kl'; choose minmax, entropy or" in result.output


@pytest.mark.slow
def test_calibrating_in_chunks_gives_the_ranges_of_one_pass(exported, tmp_path: Path):
    """calib_max_intermediate_outputs bounds what calibration holds, not what it sees: every chunk's minima and
    maxima count (onnxruntime's own option of that name kept only the last partial chunk's)."""
    import numpy as np

    from diffship.models.builtin import builtin_folder
    from diffship.models.components import component_specs
    from diffship.targets import CompileContext
    from diffship.targets.calibration import CalibrationData
    from diffship.targets.onnxruntime_quantize import quantize_unet

    spec = next(s for s in component_specs(builtin_folder("tiny-sd")) if s.name == "unet")
    rng = np.random.default_rng(0)
    # Five calls of two samples each, the fourth's latents 40x larger.
    calls = [{k: (v * (40.0 if i == 3 and k == "sample" else 1.0)).astype(v.dtype) for k, v in
              spec.sample_inputs(2, 64, 64).items()} for i in range(5)]
    for call in calls:
        call["sample"] = (call["sample"] + rng.standard_normal(call["sample"].shape)).astype(np.float32)
    context = CompileContext(spec, calibration=lambda: CalibrationData({"unet": calls}))
    source = exported("tiny-sd") / "unet" / "model.onnx"
    ranges = {}
    for k in (0, 3):
        out = tmp_path / f"k{k}" / "model.onnx"
        out.parent.mkdir()
        quantize_unet(source, out, context, "minmax", k, False, ranges=tmp_path / f"ranges-{k}.json")
        ranges[k] = json.loads((tmp_path / f"ranges-{k}.json").read_text())
    assert ranges[0] == ranges[3]
    # The check can fail: chunks of 3 dropped unreduced (onnxruntime's way) leave only sample 10, so the 40x call
    # (samples 7 and 8) is lost; ranges from the last call alone differ from the one-pass ranges.
    quantize_unet(source, tmp_path / "k0" / "model.onnx", CompileContext(spec, calibration=lambda: CalibrationData(
        {"unet": calls[4:]})), "minmax", 0, False, ranges=tmp_path / "last.json")
    assert json.loads((tmp_path / "last.json").read_text()) != ranges[0]
