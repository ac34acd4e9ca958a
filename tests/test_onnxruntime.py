"""ONNX Runtime FP32 (prepared graph) and FP16: fusions, folding, FP16 conversion and its FP32 fallback, providers."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from diffship.cli.main import app
from diffship.errors import DiffshipError
from diffship.models.components import component_specs
from diffship.models.source import resolve
from diffship.targets import CompileContext, onnxruntime
from diffship.targets.onnx_graph import GRAPH_FILE
from diffship.targets.onnxruntime import OrtOptions
from diffship.validation.parity import compare

runner = CliRunner()


@pytest.fixture(scope="module")
def sd_build(tiny_build):
    return tiny_build("tiny-sd", [{"name": "onnxruntime", "precisions": ["fp32", "fp16"], "options": {"optimize": True}}])


@pytest.fixture(scope="module")
def sdxl_build(tiny_build):
    return tiny_build("tiny-sdxl", "onnxruntime:fp32+fp16")


@pytest.fixture(scope="module")
def sdxl_int8(tiny_build):
    return tiny_build("tiny-sdxl", "onnxruntime:fp32+fp16+int8")


def graph(folder: Path) -> dict:
    return json.loads((folder / GRAPH_FILE).read_text())


def initializer_types(path: Path) -> set[int]:
    return {t.data_type for t in onnx.load(str(path), load_external_data=False).graph.initializer}


def test_the_prepared_fp32_graph_is_fused_folded_and_still_exact(sd_build):
    unet = graph(sd_build.out / "onnxruntime-fp32" / "unet")
    assert unet["prepared_for"] == "cpu" and unet["folded_by"] == "polygraphy"
    assert unet["fused"].get("MultiHeadAttention", 0) > 0 and unet["fused"].get("SkipLayerNormalization", 0) > 0
    assert unet["nodes_after"] < unet["nodes_before"]
    ops = {n.op_type for n in onnx.load(str(sd_build.out / "onnxruntime-fp32" / "unet" / "model.onnx")).graph.node}
    assert {"MultiHeadAttention", "SkipLayerNormalization"} <= ops and "NhwcConv" not in ops  # CPU-safe fusions only
    assert graph(sd_build.out / "onnxruntime-fp32" / "text_encoder")["fused"]
    result = sd_build.report["sets"]["onnxruntime-fp32"]
    assert result["passed"] and result["parity"]["tolerance"]["min_cosine"] == 0.99999
    assert result["runtime"]["unet"]["graph"]["fused"] == unet["fused"]
    assert result["latency"]["components"]["unet"]["speedup"] > 0  # the CPU provider runs FP32 natively: timed


def test_fp16_halves_the_weights_keeps_fp32_io_and_passes_the_fp16_bar(sd_build):
    unet = sd_build.out / "onnxruntime-fp16" / "unet" / "model.onnx"
    assert onnx.TensorProto.FLOAT16 in initializer_types(unet)
    model = onnx.load(str(unet), load_external_data=False)
    assert {i.type.tensor_type.elem_type for i in model.graph.input} == {onnx.TensorProto.FLOAT}
    fp32_bytes = (sd_build.out / "onnxruntime-fp32" / "unet" / "model.onnx").stat().st_size
    assert unet.stat().st_size < 0.6 * fp32_bytes
    result = sd_build.report["sets"]["onnxruntime-fp16"]
    assert result["parity"]["tolerance"] == {"min_cosine": 0.999, "max_rel_l2": 0.05}
    assert result["passed"], result["parity"]
    assert result["parity"]["denoiser_steps"]["min_cosine"] > 0.999


def test_fp16_on_the_cpu_is_checked_for_parity_but_not_timed_and_the_report_says_why(sd_build):
    result = sd_build.report["sets"]["onnxruntime-fp16"]
    assert "latency" not in result and "no native FP16 kernels" in result["latency_skipped"]
    markdown = (sd_build.out / "report" / "report.md").read_text()
    assert "onnxruntime-fp16: latency not measured" in markdown
    assert "onnxruntime-fp32: how each component runs" in markdown and "MultiHeadAttention" in markdown


def test_tiny_sdxl_is_built_and_judged_in_fp32_and_fp16(sdxl_build):
    sets = sdxl_build.report["sets"]
    assert set(sets) == {"onnxruntime-fp32", "onnxruntime-fp16"}
    for key in ("onnxruntime-fp32", "onnxruntime-fp16"):
        assert sets[key]["passed"], (key, sets[key]["parity"])
        assert set(sets[key]["parity"]["components"]) >= {"text_encoder", "text_encoder_2", "unet", "vae_decoder"}


@pytest.mark.slow
def test_tiny_sdxl_int8_quantizes_both_text_encoders_and_is_judged(sdxl_int8):
    int8 = sdxl_int8.report["sets"]["onnxruntime-int8"]
    assert int8["parity"]["denoiser_steps"]["min_cosine"] > 0.98 and int8["e2e"]["min_psnr_db"] > 25
    assert int8["passed"] == (int8["parity"]["passed"] and int8["e2e"]["passed"])
    encoder_2 = onnx.load(str(sdxl_int8.out / "onnxruntime-int8" / "text_encoder_2" / "model.onnx"))
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in encoder_2.graph.node)


def test_sdxl_fp16_keeps_its_vae_in_fp32_and_says_why(sdxl_build):
    folder = sdxl_build.out / "onnxruntime-fp16"
    for vae in ("vae_decoder", "vae_encoder"):
        record = graph(folder / vae)
        assert record["kept"] == "fp32" and "SDXL's VAE overflows in FP16" in record["reason"]
        assert onnx.TensorProto.FLOAT16 not in initializer_types(folder / vae / "model.onnx")
    assert onnx.TensorProto.FLOAT16 in initializer_types(folder / "unet" / "model.onnx")
    runtime = sdxl_build.report["sets"]["onnxruntime-fp16"]["runtime"]
    assert runtime["vae_decoder"]["precision"] == "fp32 (kept)" and runtime["unet"]["precision"] == "fp16"


def test_an_fp16_overflow_falls_back_to_fp32_and_says_so(exported, tmp_path: Path):
    source = exported("tiny-sd") / "vae_decoder" / "model.onnx"
    model = onnx.load(str(source))
    weight = next(t for t in model.graph.initializer if "conv_in.weight" in t.name)
    scaled = onnx.numpy_helper.to_array(weight) * 1e5  # activations far past FP16's 65504
    weight.CopyFrom(onnx.numpy_helper.from_array(scaled.astype(np.float32), weight.name))
    (tmp_path / "big").mkdir()
    onnx.save(model, str(tmp_path / "big" / "model.onnx"))
    spec = next(s for s in component_specs(resolve("tiny-sd").folder) if s.name == "vae_decoder")
    artifact = onnxruntime.compile(tmp_path / "big" / "model.onnx", "fp16", OrtOptions(), tmp_path / "fp16",
                                   CompileContext(spec))
    record = graph(artifact.parent)
    assert record["kept"] == "fp32" and "not finite (NaN/Inf)" in record["reason"]
    assert onnx.TensorProto.FLOAT16 not in initializer_types(artifact)
    inputs = spec.sample_inputs(1, 64, 64)
    assert np.isfinite(onnxruntime.load(artifact).run(inputs)["sample"]).all()


def test_fp16_inputs_and_outputs_when_asked_and_the_runner_still_speaks_fp32(exported, tmp_path: Path):
    source = exported("tiny-sd") / "unet" / "model.onnx"
    spec = next(s for s in component_specs(resolve("tiny-sd").folder) if s.name == "unet")
    options = OrtOptions(fp16_keep_io_types=False)
    artifact = onnxruntime.compile(source, "fp16", options, tmp_path / "fp16", CompileContext(spec))
    model = onnx.load(str(artifact), load_external_data=False)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    inputs = spec.sample_inputs(2, 64, 64)
    out = onnxruntime.load(artifact, options, "fp16").run(inputs)["out_sample"]
    assert out.dtype == np.float32
    assert compare(onnxruntime.load(source).run(inputs)["out_sample"], out)["cosine"] > 0.999


def test_a_provider_that_is_not_installed_is_refused_not_silently_replaced(exported):
    with pytest.raises(DiffshipError, match="CUDAExecutionProvider are not available in this onnxruntime"):
        onnxruntime.load(exported("tiny-sd") / "unet" / "model.onnx", OrtOptions(providers=("CUDAExecutionProvider",)))


def test_cpu_sessions_record_the_provider_and_settings_they_ran_with(exported):
    options = OrtOptions(intra_op_threads=1, graph_optimization="basic", execution_mode="sequential")
    described = onnxruntime.load(exported("tiny-sd") / "unet" / "model.onnx", options).describe().record()
    assert described["providers"] == ["CPUExecutionProvider"] and described["graph_optimization"] == "basic"
    assert described["threads"] == {"intra_op": 1, "inter_op": 0}


@pytest.mark.parametrize(("options", "message"), [
    ("{ vae_precision = 'bf16' }", "Unknown ONNX Runtime vae_precision 'bf16'; choose auto, fp16 or fp32"),
    ("{ optimize = 'yes' }", "optimize must be true, false or 'auto'"),
    ("{ execution_mode = 'async' }", "Unknown ONNX Runtime execution_mode 'async'"),
    ("{ graph_optimization = 'max' }", "Unknown ONNX Runtime graph_optimization 'max'"),
])
def test_bad_onnxruntime_options_exit_2_before_any_work(tmp_path: Path, options: str, message: str):
    (tmp_path / "r.toml").write_text(f"[[targets]]\nname = 'onnxruntime'\nprecisions = ['fp16']\noptions = {options}\n")
    result = runner.invoke(app, ["build", str(tmp_path / "r.toml"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_preparation_with_weights_left_on_disk_writes_the_same_graph_and_no_dead_bytes(exported, tmp_path: Path,
                                                                                      monkeypatch):
    # A full-size UNet keeps its weights in model.onnx_data; preparation reads them one tensor at a time, from the
    # model's folder whatever the working directory. Here tiny-sd's UNet is saved that way too, and prepared both
    # ways: the graph and its outputs must be those of the preparation with every weight in memory.
    source = exported("tiny-sd") / "unet" / "model.onnx"
    split = tmp_path / "split" / "model.onnx"
    split.parent.mkdir()
    onnx.save_model(onnx.load(str(source)), str(split), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=64)
    export_bytes = (split.parent / "model.onnx_data").read_bytes()
    spec = next(s for s in component_specs(resolve("tiny-sd").folder) if s.name == "unet")
    monkeypatch.chdir(tmp_path)
    inline = onnxruntime.compile(source, "fp32", OrtOptions(optimize=True), tmp_path / "inline", CompileContext(spec))
    on_disk = onnxruntime.compile(split, "fp32", OrtOptions(optimize=True), tmp_path / "on-disk", CompileContext(spec))
    assert graph(tmp_path / "inline") == graph(tmp_path / "on-disk")
    assert (split.parent / "model.onnx_data").read_bytes() == export_bytes  # the export is left as it was
    prepared = onnx.load(str(on_disk), load_external_data=False)
    stored = [t for t in prepared.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert stored and {e.value for t in stored for e in t.external_data if e.key == "location"} == {"model.onnx_data"}
    lengths = sum(int(next(e.value for e in t.external_data if e.key == "length")) for t in stored)
    assert (on_disk.parent / "model.onnx_data").stat().st_size == lengths  # only the weights the graph uses
    feed = spec.sample_inputs(2, 64, 64, seed=5)
    expected = onnxruntime.load(inline).run(feed)["out_sample"]
    np.testing.assert_array_equal(onnxruntime.load(on_disk).run(feed)["out_sample"], expected)


def test_the_cpu_arena_option_reaches_the_session(exported):
    path = exported("tiny-sd") / "text_encoder" / "model.onnx"
    for arena in (True, False):
        options = onnxruntime.parse_options({"cpu_mem_arena": arena})
        assert onnxruntime.load(path, options).session.get_session_options().enable_cpu_mem_arena is arena
