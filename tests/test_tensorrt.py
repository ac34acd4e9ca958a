"""TensorRT target: everything around the engine on any machine, the engines themselves on an NVIDIA GPU.

Without TensorRT and a GPU (this project's CI, most developer machines) the engine build and run tests skip with
the reason; profile derivation, ONNX preparation, Model Optimizer's QDQ UNet, the compatibility and capability
checks, option parsing and the refusals run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from diffship.errors import DiffshipError
from diffship.models.components import component_specs, run_torch, wrap
from diffship.models.families.unet import UNET
from diffship.models.loading import load_component
from diffship.models.source import resolve
from diffship.recipe import parse_recipe
from diffship.stages.build import build
from diffship.stages.compile import static_shapes
from diffship.targets import CompileContext, check_available, qdq_unet, tensorrt
from diffship.targets.tensorrt import TrtOptions

KEEP = UNET.sensitive.trained_float

RANGES = {"batch": [1, 4], "height": [64, 128], "width": [64, 128]}
ENV = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt": "10.13.3", "cuda": "12.8"}


def _has_tensorrt() -> str | None:
    """Why engine tests cannot run here, or None when they can."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install 'diffship[tensorrt]' needs NVIDIA's index and a GPU)"
    if not torch.cuda.is_available():
        return "no CUDA GPU: TensorRT engines build and run on NVIDIA GPUs only"
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"TensorRT is installed but does not load: {exc}"
    return None


NO_TENSORRT = _has_tensorrt()
gpu = pytest.mark.skipif(NO_TENSORRT is not None, reason=NO_TENSORRT or "")


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.astype(np.float64) * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def sd(model_cache: Path):
    folder = resolve("tiny-sd").folder
    return folder, {s.name: s for s in component_specs(folder)}


# --- profiles -----------------------------------------------------------------------------------------------


def test_dynamic_profiles_span_the_recipe_ranges_and_double_the_guided_unet_batch(sd):
    _, specs = sd
    unet = tensorrt.profile_shapes(specs["unet"], RANGES, (64, 64), guided=True)
    low, opt, high = unet["sample"]
    assert low == (1, 4, 8, 8) and high == (8, 4, 16, 16) and opt == (2, 4, 8, 8)
    assert unet["timestep"][0] == (1,) and unet["timestep"][2] == (8,)  # the timestep is batched like the sample
    assert unet["encoder_hidden_states"][2][:2] == (8, 77)
    text = tensorrt.profile_shapes(specs["text_encoder"], RANGES, (64, 64), guided=True)
    assert text["input_ids"] == ((1, 77), (1, 77), (4, 77))  # text encoders see the unguided batch
    vae = tensorrt.profile_shapes(specs["vae_decoder"], RANGES, (128, 64), guided=True, opt_batch=2)
    assert vae["latent_sample"] == ((1, 4, 8, 8), (2, 4, 16, 8), (4, 4, 16, 16))


def test_unguided_recipes_tune_the_unet_for_the_plain_batch(sd):
    _, specs = sd
    unet = tensorrt.profile_shapes(specs["unet"], RANGES, (64, 64), guided=False)
    assert unet["sample"][1] == (1, 4, 8, 8)
    assert unet["sample"][2][0] == 8  # still able to serve a guided call


def test_fixed_recipe_shapes_give_a_static_profile(sd):
    _, specs = sd
    fixed = {"batch": [2, 2], "height": [64, 64], "width": [64, 64]}
    static = static_shapes(specs["unet"], fixed, guidance=True)
    profile = tensorrt.profile_shapes(specs["unet"], fixed, (64, 64), True, static=static)
    assert profile["sample"] == ((4, 4, 8, 8),) * 3
    assert all(low == opt == high for low, opt, high in profile.values())


def test_opt_batch_outside_the_range_is_refused(sd):
    _, specs = sd
    with pytest.raises(DiffshipError, match=r"opt_batch 9 is outside shapes.batch \[1, 4\]"):
        tensorrt.profile_shapes(specs["unet"], RANGES, (64, 64), True, opt_batch=9)


def test_a_shape_outside_the_profile_is_refused_with_the_range():
    profile = ((1, 4, 8, 8), (2, 4, 8, 8), (8, 4, 16, 16))
    tensorrt.check_shape("sample", (8, 4, 16, 8), profile)
    with pytest.raises(DiffshipError, match=r"\(2, 4, 24, 24\), outside the profile .*max \(8, 4, 16, 16\)"):
        tensorrt.check_shape("sample", (2, 4, 24, 24), profile)
    with pytest.raises(DiffshipError, match="outside the profile"):
        tensorrt.check_shape("sample", (2, 4, 8), profile)  # wrong rank


# --- compatibility, capability, options, install ------------------------------------------------------------


def test_an_engine_from_another_gpu_or_tensorrt_version_is_refused_naming_both():
    tensorrt.check_compatible(ENV, dict(ENV))
    other = {**ENV, "gpu": "NVIDIA A10G", "compute_capability": "8.6"}
    with pytest.raises(DiffshipError, match=r"gpu 'NVIDIA H100 80GB HBM3' \(here 'NVIDIA A10G'\).*8\.6.*rebuild"):
        tensorrt.check_compatible(ENV, other, "unet/model.plan")
    with pytest.raises(DiffshipError, match=r"tensorrt '10.13.3' \(here '11.0.0'\)"):
        tensorrt.check_compatible(ENV, {**ENV, "tensorrt": "11.0.0"})


def test_fp8_is_refused_below_compute_capability_8_9():
    for ok in ("8.9", "9.0", "10.0", "12.0"):
        tensorrt.check_fp8(ok)
    with pytest.raises(DiffshipError, match="FP8 needs an Ada or Hopper.*NVIDIA A100.*8.0"):
        tensorrt.check_fp8("8.0", "NVIDIA A100")


def test_bad_options_are_named():
    with pytest.raises(DiffshipError, match="Unknown TensorRT option.*workspace"):
        tensorrt.parse_options({"workspace": 4})
    with pytest.raises(DiffshipError, match=r"optimization_level must be within \[0, 5\], got 7"):
        tensorrt.parse_options({"optimization_level": 7})
    with pytest.raises(DiffshipError, match="vae_precision"):
        tensorrt.parse_options({"vae_precision": "int8"})
    for bad, message in (({"workspace_gib": 0}, "workspace_gib must be positive"),
                         ({"opt_batch": 0}, "opt_batch must be at least 1"),
                         ({"smoothquant_alpha": 1.2}, r"smoothquant_alpha must be within \[0, 1\]"),
                         ({"conv_percentile": 0}, r"conv_percentile must be within \(0, 100\]")):
        with pytest.raises(DiffshipError, match=message):
            tensorrt.parse_options(bad)
    assert tensorrt.parse_options({"workspace_gib": 8, "cuda_graph": False}).workspace_gib == 8


def test_compile_refuses_bad_requests_before_touching_tensorrt(sd, exported, tmp_path: Path):
    _, specs = sd
    source = exported("tiny-sd") / "unet" / "model.onnx"
    context = CompileContext(specs["unet"], None, None, (64, 64), RANGES, (64, 64), True)
    with pytest.raises(DiffshipError, match="TensorRT precision 'int4' is unknown"):
        tensorrt.compile(source, "int4", TrtOptions(), tmp_path, context)
    with pytest.raises(DiffshipError, match="needs an output folder, the component, and the recipe's shape ranges"):
        tensorrt.compile(source, "fp16", TrtOptions(), tmp_path, CompileContext(specs["unet"]))
    with pytest.raises(DiffshipError, match="No ONNX model at"):
        tensorrt.compile(tmp_path / "missing.onnx", "fp16", TrtOptions(), tmp_path, context)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_no_cuda_device_is_named():
    with pytest.raises(DiffshipError, match="PyTorch sees no CUDA device"):
        tensorrt.cuda_device(0)


def test_an_engine_tensor_type_diffship_cannot_feed_is_named():
    from types import SimpleNamespace

    assert tensorrt._torch_dtype(SimpleNamespace(name="HALF")) is torch.float16
    with pytest.raises(DiffshipError, match="TensorRT type FP4"):
        tensorrt._torch_dtype(SimpleNamespace(name="FP4"))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_a_missing_tensorrt_names_the_extra_and_a_build_stops_before_any_work(tmp_path: Path, model_cache: Path):
    with pytest.raises(DiffshipError, match=r"pip install 'diffship\[tensorrt\]'"):
        check_available("tensorrt")
    with pytest.raises(DiffshipError, match="on a machine with an NVIDIA GPU"):
        tensorrt.environment()
    recipe = parse_recipe({"model": "tiny-sd", "targets": [{"name": "tensorrt", "precisions": ["fp16"]}]})
    with pytest.raises(DiffshipError, match=r"diffship\[tensorrt\]"):
        build(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_int8_without_calibration_prompts_is_refused():
    with pytest.raises(DiffshipError, match="calibration.prompts"):
        parse_recipe({"targets": [{"name": "tensorrt", "precisions": ["int8"]}], "calibration": {"prompts": []}})


def test_what_each_component_computes_in(sd):
    _, specs = sd
    xl = {s.name: s for s in component_specs(resolve("tiny-sdxl").folder)}
    opts = TrtOptions()
    assert tensorrt.computes_in(specs["unet"], "int8", opts) == ("int8", None)
    lowered, reason = tensorrt.computes_in(specs["text_encoder"], "int8", opts)
    assert lowered == "fp16" and "quantizes the denoiser" in reason
    assert tensorrt.computes_in(specs["vae_decoder"], "fp16", opts) == ("fp16", None)
    assert tensorrt.computes_in(xl["vae_decoder"], "fp16", opts)[0] == "fp32"  # overflows in FP16
    assert tensorrt.computes_in(xl["vae_decoder"], "int8", TrtOptions(vae_precision="fp16"))[0] == "fp16"
    assert tensorrt.computes_in(specs["vae_decoder"], "fp16", TrtOptions(vae_precision="fp32"))[0] == "fp32"
    assert tensorrt.computes_in(specs["unet"], "tf32", opts) == ("tf32", None)


def test_an_engine_without_its_record_is_refused(tmp_path: Path):
    plan = tmp_path / "model.plan"
    with pytest.raises(DiffshipError, match="No TensorRT engine"):
        tensorrt.read_engine_info(plan)
    plan.write_bytes(b"engine")
    with pytest.raises(DiffshipError, match="no engine.json beside it"):
        tensorrt.read_engine_info(plan)


def test_timing_caches_are_kept_per_gpu_and_version(tmp_path: Path):
    one = tensorrt.timing_cache_path(TrtOptions(), ENV)
    assert one is not None and one != tensorrt.timing_cache_path(TrtOptions(), {**ENV, "tensorrt": "10.14.0"})
    assert "/" not in one.name and one.suffix == ".cache"
    assert tensorrt.timing_cache_path(TrtOptions(timing_cache=""), ENV) is None
    assert tensorrt.timing_cache_path(TrtOptions(timing_cache=str(tmp_path / "t.cache")), ENV) == tmp_path / "t.cache"


# --- ONNX preparation ---------------------------------------------------------------------------------------


def test_prepared_fp32_and_fp16_graphs_compute_what_the_export_does(sd, exported, tmp_path: Path):
    _, specs = sd
    source = exported("tiny-sd") / "unet" / "model.onnx"
    feed = specs["unet"].sample_inputs(2, 64, 64, seed=3)
    expected = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    for compute, min_cosine in (("fp32", 0.999999), ("fp16", 0.999)):
        out = tmp_path / compute / "model.onnx"
        record = tensorrt.prepare_onnx(source, out, compute)
        assert record["folded"] == "polygraphy" and record["nodes_after"] < record["nodes_before"]
        model = onnx.load(str(out))
        weights = Counter(onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name for t in model.graph.initializer)
        assert (weights["float16"] > weights["float32"]) == (compute == "fp16")
        assert {i.type.tensor_type.elem_type for i in model.graph.output} == {onnx.TensorProto.FLOAT}  # FP32 I/O
        got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        assert _cosine(got, expected) >= min_cosine


# --- Model Optimizer QDQ UNet -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet_int8(sd, tmp_path_factory: pytest.TempPathFactory):
    """tiny-sd's UNet quantized INT8 by Model Optimizer on sampled calls, its float twin, and its QDQ export."""
    folder, specs = sd
    spec = specs["unet"]
    calls = [spec.sample_inputs(2, 64, 64, seed=i) for i in range(6)]
    float_unet, unet = load_component(folder, "unet"), load_component(folder, "unet")
    info = qdq_unet.quantize_unet(unet, calls, "int8", alpha=0.8, percentile=99.9, keep_float=KEEP)
    path = qdq_unet.export_qdq(unet, spec, tmp_path_factory.mktemp("qdq"))
    return spec, float_unet, unet, calls, info, path


def test_int8_unet_is_smoothquant_and_percentile_calibrated_with_sensitive_layers_in_float(unet_int8):
    spec, float_unet, unet, calls, info, _path = unet_int8
    assert info["linear"] == "SmoothQuant alpha 0.8" and info["conv_inputs"] == "percentile 99.9"
    assert info["quantizers_enabled"] > 50
    assert any(getattr(m.input_quantizer, "_pre_quant_scale", None) is not None
               for m in unet.modules() if isinstance(m, torch.nn.Linear) and hasattr(m, "input_quantizer"))
    assert not unet.conv_in.input_quantizer.is_enabled and not unet.conv_out.weight_quantizer.is_enabled
    conv = unet.down_blocks[0].resnets[0].conv1
    observed = max(float(np.abs(c["sample"]).max()) for c in calls)  # conv1 sees normalised activations, not raw
    assert 0 < float(conv.input_quantizer.amax) < observed * 10
    reference = run_torch(wrap(spec, float_unet), spec, calls[0])["out_sample"]
    fake = run_torch(wrap(spec, unet), spec, calls[0])["out_sample"]
    assert 0.99 < _cosine(fake, reference) < 1.0  # quantized: close, and not identical


def test_percentile_ranges_clip_below_the_max_ranges(sd, unet_int8):
    folder, _specs = sd
    _, _, unet, calls, _, _ = unet_int8
    max_unet = load_component(folder, "unet")
    # 100: keep the max ranges
    qdq_unet.quantize_unet(max_unet, calls, "int8", alpha=0.8, percentile=100.0, keep_float=KEEP)
    pairs = [(float(a.input_quantizer.amax), float(b.input_quantizer.amax))
             for a, b in zip(unet.modules(), max_unet.modules(), strict=True)
             if isinstance(a, torch.nn.Conv2d) and hasattr(a, "input_quantizer") and a.input_quantizer.is_enabled]
    assert pairs and all(p <= m * 1.0001 for p, m in pairs) and any(p < m * 0.999 for p, m in pairs)


def test_qdq_unet_prepared_in_fp16_keeps_its_quantizers_and_matches_pytorch(unet_int8, tmp_path: Path):
    spec, _, unet, calls, _, path = unet_int8
    exported = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    record = tensorrt.prepare_onnx(path, tmp_path / "model.onnx", "int8")
    assert record["folded"].startswith("no")
    prepared = onnx.load(str(tmp_path / "model.onnx"))
    ops = Counter(n.op_type for n in prepared.graph.node)
    assert ops["QuantizeLinear"] == exported["QuantizeLinear"] >= 50  # weight pairs survive preparation
    conv_out = next(n for n in prepared.graph.node if n.op_type == "Conv" and "conv_out" in n.name)
    assert not any("DequantizeLinear" in i for i in conv_out.input)
    fake = run_torch(wrap(spec, unet), spec, calls[1])["out_sample"]
    got = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, calls[1])[0]
    assert _cosine(got, fake) > 0.995


def test_quantizing_scopes_the_attention_unregistration(unet_int8):
    from diffusers.models.attention_processor import Attention
    from modelopt.torch.quantization.nn import QuantModuleRegistry

    assert Attention in QuantModuleRegistry  # registered again once quantization finished


def test_fp8_unet_exports_tensorrt_fp8_quantizers(sd, tmp_path: Path):
    folder, specs = sd
    spec = specs["unet"]
    unet = load_component(folder, "unet")
    info = qdq_unet.quantize_unet(unet, [spec.sample_inputs(2, 64, 64, seed=i) for i in range(3)], "fp8",
                                  keep_float=KEEP)
    assert info["mode"] == "fp8"
    path = qdq_unet.export_qdq(unet, spec, tmp_path / "fp8")
    tensorrt.prepare_onnx(path, tmp_path / "prepared" / "model.onnx", "fp8")
    nodes = onnx.load(str(tmp_path / "prepared" / "model.onnx")).graph.node
    fp8 = [n for n in nodes if n.op_type == "TRT_FP8QuantizeLinear"]
    assert len(fp8) > 50 and {n.domain for n in fp8} == {"trt"}


def test_quantizing_without_calls_or_with_bad_settings_is_refused(sd):
    folder, _ = sd
    unet = load_component(folder, "unet")
    with pytest.raises(DiffshipError, match="needs calibration calls"):
        qdq_unet.quantize_unet(unet, [], "int8", keep_float=KEEP)
    with pytest.raises(DiffshipError, match="percentile"):
        qdq_unet.quantize_unet(unet, [{}], "int8", percentile=0, keep_float=KEEP)
    with pytest.raises(DiffshipError, match="alpha"):
        qdq_unet.quant_config("int8", 1.5)
    with pytest.raises(DiffshipError, match="Unknown QDQ mode"):
        qdq_unet.quant_config("int4", 0.5)


# --- engines (NVIDIA GPU with TensorRT) ---------------------------------------------------------------------


def _context(spec, shapes=RANGES, static=None, **kw) -> CompileContext:
    return CompileContext(spec, static, None, (64, 64), shapes, (64, 64), True, **kw)


@gpu
def test_fp16_engine_matches_pytorch_and_refuses_shapes_outside_its_profile(sd, exported, tmp_path: Path):
    folder, specs = sd
    spec = specs["unet"]
    plan = tensorrt.compile(exported("tiny-sd") / "unet" / "model.onnx", "fp16", TrtOptions(), tmp_path, _context(spec))
    info = json.loads((tmp_path / tensorrt.ENGINE_INFO).read_text())
    assert info["environment"] == tensorrt.environment() and info["computes_in"] == "fp16"
    runner = tensorrt.load(plan, precision="fp16")
    reference = wrap(spec, load_component(folder, "unet"))
    for batch, size in ((1, 64), (8, 128)):
        feed = spec.sample_inputs(batch, size, size, seed=batch)
        assert _cosine(runner.run(feed)["out_sample"], run_torch(reference, spec, feed)["out_sample"]) > 0.999
    with pytest.raises(DiffshipError, match="outside the profile"):
        runner.run(spec.sample_inputs(9, 64, 64))
    assert Path(info["timing_cache"]).is_file()


@gpu
def test_static_engine_replays_a_cuda_graph_with_the_same_results(sd, exported, tmp_path: Path):
    _, specs = sd
    spec = specs["unet"]
    fixed = {"batch": [1, 1], "height": [64, 64], "width": [64, 64]}
    static = static_shapes(spec, fixed, guidance=True)
    plan = tensorrt.compile(exported("tiny-sd") / "unet" / "model.onnx", "fp16", TrtOptions(), tmp_path,
                            _context(spec, fixed, static))
    graphed, plain = tensorrt.load(plan), tensorrt.load(plan, TrtOptions(cuda_graph=False))
    for seed in (0, 1):  # the second call replays the captured graph on new inputs
        feed = spec.sample_inputs(2, 64, 64, seed=seed)
        np.testing.assert_allclose(graphed.run(feed)["out_sample"], plain.run(feed)["out_sample"], rtol=0, atol=1e-3)
    assert graphed.describe().details["cuda_graph"] == "on" and plain.describe().details["cuda_graph"].startswith("off")


@gpu
def test_an_engine_moved_to_another_gpu_is_refused_before_tensorrt_reads_it(sd, exported, tmp_path: Path):
    _, specs = sd
    plan = tensorrt.compile(exported("tiny-sd") / "text_encoder" / "model.onnx", "fp16", TrtOptions(), tmp_path,
                            _context(specs["text_encoder"]))
    info = json.loads((tmp_path / tensorrt.ENGINE_INFO).read_text())
    (tmp_path / tensorrt.ENGINE_INFO).write_text(json.dumps({**info, "environment": {**info["environment"],
                                                                                      "gpu": "NVIDIA A10G"}}))
    with pytest.raises(DiffshipError, match="built for another machine"):
        tensorrt.load(plan)


def test_lora_apply_refuses_an_engine_built_without_refit_naming_the_way_out(tmp_path: Path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / tensorrt.ENGINE).write_bytes(b"not refittable")
    with pytest.raises(DiffshipError, match=r"was not built refittable \(no weights.onnx beside it\).*refit = true"):
        tensorrt.patch_weights(tmp_path / "unet" / tensorrt.ENGINE, tmp_path / "new" / tensorrt.ENGINE, [])
    assert not (tmp_path / "new").exists()


@gpu
def test_a_refit_engine_computes_what_an_engine_built_with_the_lora_computes(sd, exported, tmp_path: Path):
    """`lora apply` on a refittable FP16 engine: TensorRT's Refitter takes the merged weights, and the engine then
    matches one built from the LoRA-merged export, and no longer the base engine (the check can fail)."""
    from lora_files import kohya_lora

    from diffship.exporters.pipeline import export_pipeline
    from diffship.models.lora import LoraSpec
    from diffship.stages.lora_apply import weight_changes

    folder, specs = sd
    spec = specs["unet"]
    lora = [LoraSpec(kohya_lora(folder, tmp_path / "kohya.safetensors"), 0.8)]
    merged = resolve("tiny-sd", loras=lora)
    export_pipeline(merged, tmp_path / "merged-onnx", ["unet"])
    options = TrtOptions(refit=True)
    base = tensorrt.compile(exported("tiny-sd") / "unet" / "model.onnx", "fp16", options, tmp_path / "base",
                            _context(spec))
    rebuilt = tensorrt.compile(tmp_path / "merged-onnx" / "unet" / "model.onnx", "fp16", options, tmp_path / "rebuilt",
                               _context(spec))
    changes, _ = weight_changes(folder, merged.folder, lora, ["unet"], False)
    refit = tmp_path / "refit" / tensorrt.ENGINE
    refit.parent.mkdir()
    tensorrt.patch_weights(base, refit, changes["unet"])
    feed = spec.sample_inputs(2, 64, 64, seed=5)
    expected = tensorrt.load(rebuilt, precision="fp16").run(feed)["out_sample"]
    assert _cosine(tensorrt.load(refit, precision="fp16").run(feed)["out_sample"], expected) > 0.999
    assert _cosine(tensorrt.load(base, precision="fp16").run(feed)["out_sample"], expected) < 0.99


@gpu
def test_tensorrt_build_of_tiny_sd_fp16_and_int8_passes_validation(tmp_path: Path, model_cache: Path):
    recipe = parse_recipe({
        "model": "tiny-sd", "shapes": {"batch": [1, 2], "height": [64, 128], "width": [64, 128]},
        "targets": [{"name": "tensorrt", "precisions": ["fp16", "int8"]}],
        "validation": {"prompts": ["a red bicycle"], "seeds": [0], "steps": 2,
                       "latency": {"enabled": True, "warmup": 1, "runs": 2, "pipeline_runs": 1}},
        "calibration": {"samples": 4, "steps": 2}})
    result = build(recipe, tmp_path / "out")
    sets = result.manifest["artifacts"]
    assert set(sets) == {"tensorrt-fp16", "tensorrt-int8"}
    assert sets["tensorrt-int8"]["environment"] == tensorrt.environment()
    assert result.passed, json.dumps(result.report, default=str)[:2000]


# --- int8-auto: the search over Model Optimizer's quantizers, on the CPU ------------------------------------


@pytest.fixture(scope="module")
def auto_unet(sd, tmp_path_factory: pytest.TempPathFactory):
    """tiny-sd's UNet through int8-auto's search on captured 20-step calls; a held-out trajectory; its QDQ export."""
    from diffusers import DiffusionPipeline

    from diffship.targets.accuracy_gate import Gate, probe_inputs
    from diffship.targets.tensorrt_auto import search_unet
    from diffship.validation.capture import capture

    folder, specs = sd
    spec = specs["unet"]
    pipe = DiffusionPipeline.from_pretrained(folder)
    calls = capture(pipe, ["a cat on a sofa", "a mountain lake"], 16, 20, 64, 64, with_vae=False).inputs["unet"]
    held_out = capture(pipe, ["a red bicycle"], None, 20, 64, 64, seed=1, with_vae=False).inputs["unet"]
    gate = Gate(0.99, 0.15, probes=((2, 64, 64),))
    unet = load_component(folder, "unet")
    lines: list[str] = []
    info = search_unet(unet, calls, probe_inputs(spec, gate), gate,
                       lambda u: qdq_unet.quantize_unet(u, calls, "int8", 0.8, 99.99, keep_float=()),
                       lines.append, UNET.sensitive.searched_first)
    path = qdq_unet.export_qdq(unet, spec, tmp_path_factory.mktemp("qdq-auto"))
    return spec, folder, unet, held_out, gate, info, lines, path


@pytest.mark.slow
def test_int8_auto_for_tensorrt_keeps_the_fewest_layers_in_float_that_meet_the_gate(auto_unet):
    spec, folder, unet, held_out, gate, info, lines, _path = auto_unet
    search = info["search"]
    first, chosen = search["candidates"][0], search["chosen_score"]
    assert first["label"] == "full INT8" and first["score"] < gate.target  # the search was needed
    assert search["fell_back"] is None and chosen >= gate.target and info["kept_float"]
    assert len(info["kept_float"]) < search["quantized_activations"]
    assert all(not dict(unet.named_modules())[name].input_quantizer.is_enabled for name in info["kept_float"])
    assert any("int8-auto full INT8" in line for line in lines)
    float_unet = load_component(folder, "unet")
    worst = min(_cosine(run_torch(wrap(spec, unet), spec, c)["out_sample"],
                        run_torch(wrap(spec, float_unet), spec, c)["out_sample"]) for c in held_out)
    assert worst >= gate.min_cosine  # on a trajectory the search never saw


@pytest.mark.slow
def test_the_searched_qdq_export_runs_what_the_search_chose(auto_unet):
    spec, _folder, unet, held_out, _gate, _info, _lines, path = auto_unet
    feed = held_out[3]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert _cosine(got, run_torch(wrap(spec, unet), spec, feed)["out_sample"]) >= 0.999


def test_int8_auto_is_a_tensorrt_precision_computed_in_int8(sd):
    _, specs = sd
    assert "int8-auto" in tensorrt.PRECISIONS and tensorrt.needs_calibration("int8-auto")
    assert tensorrt.computes_in(specs["unet"], "int8-auto", TrtOptions()) == ("int8", None)
    assert tensorrt.computes_in(specs["text_encoder"], "int8-auto", TrtOptions())[0] == "fp16"
