"""Compression passes on tiny-sd's UNet: shapes, parameter counts, parity through export, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from diffship.cli.main import app
from diffship.compress import prune
from diffship.compress.distill import distill
from diffship.errors import DiffshipError
from diffship.exporters.onnx import export_component
from diffship.models.components import component_specs, run_torch, wrap
from diffship.models.families.unet import UNET
from diffship.models.loading import load_component
from diffship.models.source import resolve
from diffship.stages import compress_measure as measure

runner = CliRunner()


@pytest.fixture
def tiny(model_cache: Path):
    """(spec, fresh UNet, captured-style calls) for tiny-sd: random inputs shaped as the UNet's real ones."""
    folder = resolve("tiny-sd").folder
    spec = next(s for s in component_specs(folder) if s.name == "unet")
    calls = [spec.sample_inputs(2, 64, 64, seed=i) for i in range(6)]
    return spec, load_component(folder, "unet"), calls


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


def _onnx_matches_torch(spec, unet, tmp: Path, min_cosine: float = 0.9999) -> onnx.ModelProto:
    """Export `unet`, run it in ONNX Runtime, and check it against the same module in PyTorch."""
    wrapper = wrap(spec, unet)
    path = export_component(spec, wrapper, tmp)
    feed = spec.sample_inputs(2, 64, 64, seed=42)
    expected = run_torch(wrapper, spec, feed)["out_sample"]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert _cosine(got, expected) >= min_cosine
    return onnx.load(str(path))


def test_magnitude_pruning_zeroes_the_asked_share_and_reports_true_non_zero_counts(tiny):
    _, unet, _ = tiny
    before = measure.weight_stats(unet)
    info = prune.prune_magnitude(unet, 0.5, "global")
    after = measure.weight_stats(unet)
    assert abs(info["sparsity"] - 0.5) < 0.01
    assert after["params"] == before["params"]  # unstructured: same tensors, zeros inside
    assert before["nonzero"] - after["nonzero"] == pytest.approx(info["zeroed"], rel=0.01)
    assert not any(hasattr(m, "weight_orig") for m in unet.modules())  # made permanent, no masks left


def test_per_layer_magnitude_pruning_prunes_every_layer_alike(tiny):
    _, unet, _ = tiny
    prune.prune_magnitude(unet, 0.3, "layer")
    for _, layer in prune.weight_layers(unet):
        assert abs(float((layer.weight == 0).float().mean()) - 0.3) < 0.05


def test_channel_pruning_removes_channels_and_the_smaller_unet_exports_exactly(tiny, tmp_path: Path):
    spec, unet, calls = tiny
    before = measure.weight_stats(unet)["params"]
    info = prune.prune_channels(unet, 0.3, calls[0])
    after = measure.weight_stats(unet)["params"]
    assert 0.3 < after / before < 0.75 and info["layers_changed"] > 10
    assert unet.conv_out.out_channels == 4 and unet.conv_in.in_channels == 4
    resnet = unet.down_blocks[0].resnets[0]
    assert resnet.conv1.out_channels < 32 and resnet.norm1.num_channels == resnet.conv1.in_channels
    out = unet(*prune.example_inputs(calls[0])[:3]).sample
    assert out.shape == (2, 4, 8, 8)
    _onnx_matches_torch(spec, unet, tmp_path / "pruned")


def test_head_pruning_removes_whole_heads_and_updates_the_head_count(tiny, tmp_path: Path):
    from diffusers.models.attention_processor import Attention

    spec, unet, _ = tiny
    attn = next(m for m in unet.modules() if isinstance(m, Attention))
    heads, width = attn.heads, attn.to_q.out_features
    info = prune.prune_heads(unet, 1)
    assert attn.heads == heads - 1 and attn.to_q.out_features == width - width // heads
    assert attn.to_out[0].in_features == attn.to_v.out_features
    assert len(info["removed"]) == info["layers"]
    _onnx_matches_torch(spec, unet, tmp_path / "heads")


def test_pruning_more_heads_than_a_layer_has_is_refused(tiny):
    _, unet, _ = tiny
    with pytest.raises(DiffshipError, match="has 4 heads; at most 3"):
        prune.prune_heads(unet, 4)


@pytest.mark.parametrize("value", [0.0, 1.0, 1.5, -0.2])
def test_sparsity_and_ratio_outside_zero_one_are_refused(tiny, value: float):
    _, unet, calls = tiny
    with pytest.raises(DiffshipError, match="between 0 and 1"):
        prune.prune_magnitude(unet, value)
    with pytest.raises(DiffshipError, match="between 0 and 1"):
        prune.prune_channels(unet, value, calls[0])


def test_distillation_brings_a_pruned_student_toward_its_teacher_and_resumes(tiny, tmp_path: Path):
    import copy

    from diffship.compress.distill import sample_set
    from diffship.validation.baseline import load_baseline
    from diffship.validation.capture import capture

    _, unet, calls = tiny
    pipe = load_baseline(resolve("tiny-sd").folder, device="cpu", dtype=torch.float32)
    captured = capture(pipe, ["a red bicycle", "a blue car"], 4 * 3, 3, 64, 64, 7.5, with_vae=False)
    data = sample_set(captured, "unet", 3, pipe.vae.config.scaling_factor, pipe.scheduler.alphas_cumprod, 7.5)
    assert data.latents.shape == (4, 4, 8, 8) and data.conditioning["encoder_hidden_states"].shape[:2] == (4, 2)
    assert data.paired  # unconditional and conditional rows kept together, so the guided direction is learned
    teacher = copy.deepcopy(unet)
    prune.prune_channels(unet, 0.3, calls[0])
    first = distill(unet, teacher, data, steps=6, batch=4, lr=1e-3, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert first["resumed_from"] == 0 and (tmp_path / "distill-checkpoint.pt").is_file()
    # A longer run with the same student and folder picks up at the checkpoint instead of starting over.
    second = distill(unet, teacher, data, steps=30, batch=4, lr=1e-3, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert second["resumed_from"] == 6
    assert second["loss_last"] < first["loss_first"]
    assert not any(p.requires_grad for p in unet.parameters()) and not unet.training


def test_qat_int8_exports_qdq_that_onnx_runtime_and_openvino_run(tiny, tmp_path: Path):
    import openvino as ov

    from diffship.compress.qat import quantize_int8

    spec, unet, calls = tiny
    info = quantize_int8(unet, calls, UNET.sensitive.trained_float)
    assert info["enabled"] > 0
    model = _onnx_matches_torch(spec, unet, tmp_path / "qat", min_cosine=0.999)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 20 and ops.count("DequantizeLinear") >= 20
    conv_out = [n for n in model.graph.node if n.op_type == "Conv" and "conv_out" in n.name]
    assert conv_out and not any("DequantizeLinear" in i for i in conv_out[0].input)  # kept in float
    feed = spec.sample_inputs(2, 64, 64, seed=1)
    expected = ort.InferenceSession(str(tmp_path / "qat" / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = ov.Core().compile_model(str(tmp_path / "qat" / "model.onnx"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(feed)[0]
    assert _cosine(got, expected) > 0.999


def test_qat_trains_through_the_fake_quantizers(tiny, tmp_path: Path):
    import copy

    from diffship.compress.distill import SampleSet
    from diffship.compress.qat import quantize_int8

    _, unet, calls = tiny
    teacher = copy.deepcopy(unet)
    quantize_int8(unet, calls, UNET.sensitive.trained_float)
    generator = torch.Generator().manual_seed(0)
    data = SampleSet(torch.randn(4, 4, 8, 8, generator=generator),
                     {"encoder_hidden_states": torch.randn(4, 2, 77, 32, generator=generator)},
                     torch.linspace(0.999, 0.01, 1000), 7.5)
    before = {n: p.clone() for n, p in unet.named_parameters()}
    info = distill(unet, teacher, data, steps=3, batch=2, lr=1e-3, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert info["loss"] == "MSE + guidance-direction MSE"
    moved = [n for n, p in unet.named_parameters() if not torch.equal(p, before[n])]
    assert any("attn1.to_q" in n for n in moved) and any("conv1" in n for n in moved)


def test_quanto_int8_weights_and_calibrated_activations_shrink_the_unet(tiny):
    from diffship.compress.quantize import quanto

    _, unet, calls = tiny
    args = prune.example_inputs(calls[0])[:3]
    expected = unet(*args).sample
    before = measure.weight_stats(unet)["bytes"]
    info = quanto(unet, "int8", "int8", calls, UNET.sensitive.trained_float)
    assert info["layers"] > 10 and info["calibration_calls"] == len(calls)
    assert measure.weight_stats(unet)["bytes"] < 0.5 * before
    got = unet(*args).sample
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.99


def test_a_pruned_pipeline_folder_round_trips_and_guards_its_pickle(tiny, tmp_path: Path):
    from diffship.models.compressed import write_pipeline

    spec, unet, calls = tiny
    prune.prune_channels(unet, 0.3, calls[0])
    folder = tmp_path / "pruned"
    write_pipeline(resolve("tiny-sd").folder, folder, "unet", unet, None, None, {"reshaped": True, "steps": []})
    with pytest.raises(DiffshipError, match="--allow-pickle"):
        load_component(folder, "unet")
    loaded = load_component(folder, "unet", allow_pickle=True)
    feed = spec.sample_inputs(2, 64, 64, seed=3)
    np.testing.assert_allclose(run_torch(wrap(spec, loaded), spec, feed)["out_sample"],
                               run_torch(wrap(spec, unet), spec, feed)["out_sample"], atol=1e-6)


def test_a_magnitude_pruned_unet_is_saved_as_plain_diffusers_weights(tiny, tmp_path: Path):
    from diffship.models.compressed import write_pipeline

    spec, unet, _ = tiny
    prune.prune_magnitude(unet, 0.5)
    folder = tmp_path / "sparse"
    write_pipeline(resolve("tiny-sd").folder, folder, "unet", unet, None, None, {"steps": []})
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_component(folder, "unet")  # no pickle: shapes are diffusers' own
    assert measure.weight_stats(loaded)["nonzero"] == measure.weight_stats(unet)["nonzero"]
    feed = spec.sample_inputs(2, 64, 64, seed=3)
    np.testing.assert_allclose(run_torch(wrap(spec, loaded), spec, feed)["out_sample"],
                               run_torch(wrap(spec, unet), spec, feed)["out_sample"], atol=1e-6)


def test_a_qat_unet_round_trips_through_model_optimizer_state(tiny, tmp_path: Path):
    from diffship.compress.qat import quantize_int8
    from diffship.models.compressed import write_pipeline

    spec, unet, calls = tiny
    quantize_int8(unet, calls, UNET.sensitive.trained_float)
    folder = tmp_path / "qat"
    write_pipeline(resolve("tiny-sd").folder, folder, "unet", unet, None, "modelopt", {"steps": []})
    assert not (folder / "unet" / "diffship_unet.pt").exists()  # no pickle needed: the structure is diffusers'
    loaded = load_component(folder, "unet")
    feed = spec.sample_inputs(2, 64, 64, seed=3)
    np.testing.assert_allclose(run_torch(wrap(spec, loaded), spec, feed)["out_sample"],
                               run_torch(wrap(spec, unet), spec, feed)["out_sample"], atol=1e-5)


@pytest.mark.slow
def test_a_quanto_unet_round_trips_through_its_quantization_map(tiny, tmp_path: Path):
    from diffship.compress.quantize import quanto
    from diffship.models.compressed import write_pipeline

    spec, unet, calls = tiny
    quanto(unet, "int4", "none", calls, UNET.sensitive.trained_float)
    folder = tmp_path / "quanto"
    write_pipeline(resolve("tiny-sd").folder, folder, "unet", unet, None, "quanto", {"steps": []})
    loaded = load_component(folder, "unet")
    assert any("QLinear" in type(m).__name__ for m in loaded.modules())
    args = prune.example_inputs(spec.sample_inputs(2, 64, 64, seed=3))[:3]
    with torch.no_grad():  # quanto's int4 kernels refuse inference-mode tensors
        torch.testing.assert_close(loaded(*args).sample, unet(*args).sample)


def test_precision_casts_components_and_keeps_the_sdxl_vae_in_fp32_under_fp16(model_cache: Path):
    from diffship.compress.precision import cast_pipeline
    from diffship.models.families import family_named
    from diffship.validation.baseline import load_baseline

    pipe = load_baseline(resolve("tiny-sdxl").folder, device="cpu", dtype=torch.float32)
    info = cast_pipeline(pipe, "fp16", "auto", family_named("sdxl"))
    assert pipe.unet.dtype == torch.float16 and pipe.text_encoder_2.dtype == torch.float16
    assert pipe.vae.dtype == torch.float32 and "overflows" in info["kept_fp32"]["vae"]
    pipe = load_baseline(resolve("tiny-sd").folder, device="cpu", dtype=torch.float32)
    cast_pipeline(pipe, "bf16", "auto", family_named("sd1"))
    assert pipe.vae.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes 8-bit and NF4 kernels need a CUDA GPU")
def test_bitsandbytes_loads_the_unet_in_nf4_on_cuda(model_cache: Path):
    from diffship.compress.quantize import bitsandbytes_denoiser

    folder = resolve("tiny-sd").folder
    unet, info = bitsandbytes_denoiser(folder, "unet", "nf4")
    assert info["weights"] == "nf4"
    assert any("Linear4bit" in type(m).__name__ for m in unet.modules())


def test_bitsandbytes_without_cuda_is_refused_with_the_alternative(model_cache: Path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for CPU-only machines")
    from diffship.compress.quantize import bitsandbytes_denoiser

    with pytest.raises(DiffshipError, match="needs a CUDA GPU.*quanto"):
        bitsandbytes_denoiser(resolve("tiny-sd").folder, "unet", "int8")


@pytest.mark.parametrize(("step", "message"), [
    ("shrink:ratio=0.3", "does not match any of the expected tags"),
    ("prune-magnitude:sparsity=1.2", "less than 1"),
    ("prune-channels:ratio=0", "greater than 0"),
    ("prune-magnitude:sparsity", "expected key=value"),
])
def test_compress_cli_refuses_bad_steps_with_exit_2(step: str, message: str, tmp_path: Path):
    result = runner.invoke(app, ["compress", "-m", "tiny-sd", "--step", step, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_compress_cli_refuses_too_many_heads_without_writing_output(tmp_path: Path, model_cache: Path):
    result = runner.invoke(app, ["compress", "-m", "tiny-sd", "--step", "prune-heads:heads=9", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "at most 3 can be removed" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(("steps", "message"), [
    (["quantize:weights='int8'", "prune-magnitude:sparsity=0.5"], "comes after quantization; quantize last"),
    (["prune-magnitude:sparsity=0.5", "quantize:library='bitsandbytes'"], "must be the only step"),
])
def test_compress_cli_refuses_steps_in_an_order_it_cannot_honour(steps: list[str], message: str, tmp_path: Path,
                                                                  model_cache: Path):
    args = [a for step in steps for a in ("--step", step)]
    result = runner.invoke(app, ["compress", "-m", "tiny-sd", *args, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_pruned_then_quanto_quantized_unet_round_trips(tmp_path: Path, model_cache: Path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["compress", "-m", "tiny-sd", "--step", "prune-channels:ratio=0.25",
                                 "--step", "quantize:weights='int8'", "-o", str(out)])
    assert result.exit_code == 0, result.output
    unet = load_component(out / "model", "unet", allow_pickle=True)
    assert any("QLinear" in type(m).__name__ for m in unet.modules())
    assert unet.down_blocks[0].resnets[0].conv1.out_channels < 32


def test_compress_cli_writes_the_pipeline_and_a_stage_table(tmp_path: Path, model_cache: Path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["compress", "-m", "tiny-sd", "--step", "prune-magnitude:sparsity=0.5",
                                 "--step", "prune-channels:ratio=0.25", "-o", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "compress.json").read_text())
    original, magnitude, channels = record["stages"]
    assert magnitude["params"] == original["params"] and magnitude["nonzero"] < 0.55 * original["params"]
    assert channels["params"] < original["params"]
    assert (out / "model" / "unet" / "diffship_compressed.json").is_file()
    assert (out / "compression.png").stat().st_size > 5000 and "prune-channels" in (out / "compress.md").read_text()


def test_a_build_exports_and_validates_the_compressed_unet(tmp_path: Path, model_cache: Path):
    from conftest import tiny_recipe

    from diffship.stages.build import build

    recipe = tiny_recipe("tiny-sd", compress=[{"step": "prune-channels", "ratio": 0.3},
                                              {"step": "distill", "steps": 4, "batch": 4, "images": 4}],
                         calibration={"prompts": ["a red bicycle"], "steps": 3})
    result = build(recipe, tmp_path / "out")
    assert result.passed and result.report["sets"]["onnxruntime-fp32"]["latency"]["components"]["unet"]["speedup"] > 0
    stages = result.report["compress"]["stages"]
    assert [s["stage"].split(" ")[0] for s in stages] == ["original", "prune-channels", "distill"]
    assert result.report["sets"]["onnxruntime-fp32"]["parity"]["passed"]  # the export matches the compressed UNet
    exported = onnx.load(str(tmp_path / "out" / "onnx" / "unet" / "model.onnx"))
    params = sum(int(np.prod(t.dims)) for t in exported.graph.initializer)
    assert params < 0.8 * stages[0]["params"]
    assert "compression stages" in (tmp_path / "out" / "report" / "report.md").read_text()
    assert (tmp_path / "out" / "report" / "images" / "compression.png").is_file()


def test_a_build_refuses_to_quantize_a_qat_unet_again(tmp_path: Path, model_cache: Path):
    from diffship.recipe import parse_recipe
    from diffship.stages.build import build

    recipe = parse_recipe({"model": "tiny-sd", "compress": [{"step": "qat", "steps": 0}],
                           "targets": [{"name": "onnxruntime", "precisions": ["fp32", "int8"]}]})
    with pytest.raises(DiffshipError, match="onnxruntime:int8 would quantize it again"):
        build(recipe, tmp_path / "out")


def test_a_build_refuses_torch_only_steps_before_any_work(tmp_path: Path, model_cache: Path):
    from diffship.recipe import parse_recipe
    from diffship.stages.build import build

    recipe = parse_recipe({"model": "tiny-sd", "compress": [{"step": "quantize", "weights": "int4"}]})
    with pytest.raises(DiffshipError, match="PyTorch-only"):
        build(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
