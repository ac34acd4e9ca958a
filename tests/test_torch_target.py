"""The PyTorch target: real builds of tiny-sd and tiny-sdxl in eager, autocast, torch.compile and AOTInductor sets,
each validated end to end against the baseline; packages loaded in a fresh process; the options' refusals."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_recipe
from safetensors import safe_open
from typer.testing import CliRunner

from diffship.cli.main import app
from diffship.errors import DiffshipError, DiskFull
from diffship.models.builtin import builtin_folder
from diffship.models.components import component_specs, run_torch, wrap
from diffship.models.loading import load_component
from diffship.stages.build import build
from diffship.targets import CompileContext
from diffship.targets import pytorch as target
from diffship.targets import pytorch_options as torch_options
from diffship.validation.parity import compare, validate_folder

runner = CliRunner()
SHAPES = {"batch": [1, 2], "height": [64, 128], "width": [64, 128]}
NO_GPU = "offload moves weights between CPU memory and a GPU; this machine has no CUDA GPU"
# One eager set and one AOTInductor set (a package per component) run in `make test`; the other number formats, the
# torch.compile options and tiny-sdxl in `make test-all`. The eager number formats share the AOTInductor set's
# cache entries, so the slow tier adds only what it adds.
EAGER_FORMATS = "fp16+bf16+fp16-autocast+bf16-autocast"
TUNED = {"attention": "slicing", "attention_slice": "max", "channels_last": True, "vae_slicing": True,
         "vae_tiling": True, "compile_mode": "reduce-overhead", "compile_components": ["unet"]}


@pytest.fixture(scope="module")
def plain(tiny_build):
    """tiny-sd eager in FP32 (diffusers' SDPA attention), and in BF16 with one AOTInductor package: the VAE decoder
    (the cheapest C++ build; the rest of that set runs eager)."""
    return tiny_build("tiny-sd", [{"name": "torch", "precisions": ["fp32", "bf16-aoti"],
                                   "options": {"aoti_components": ["vae_decoder"]}}])


@pytest.fixture(scope="module")
def packaged(tiny_build):
    """tiny-sd as BF16 AOTInductor packages, every component (the default)."""
    return tiny_build("tiny-sd", "torch:bf16-aoti")


@pytest.fixture(scope="module")
def formats(tiny_build):
    """tiny-sd eager in every number format."""
    return tiny_build("tiny-sd", f"torch:fp32+{EAGER_FORMATS}")


@pytest.fixture(scope="module")
def tuned(tiny_build):
    """tiny-sd with every other option: sliced attention, channels_last, VAE slicing and tiling, torch.compile of
    the UNet. The VAE decoder's compilation is tested per mode below (compiled, every on / off switch of slicing or
    tiling recompiles it)."""
    return tiny_build("tiny-sd", [{"name": "torch", "precisions": ["fp32", "bf16-autocast-compile"], "options": TUNED}])


@pytest.fixture(scope="module")
def sdxl(tiny_build):
    """tiny-sdxl eager in FP16 (its VAE kept FP32) and autocast BF16, and compiled in FP32."""
    return tiny_build("tiny-sdxl", [{"name": "torch", "precisions": ["fp16", "bf16-autocast", "fp32-compile"],
                                     "options": {"compile_components": ["unet"]}}])


def _sets(result) -> dict:
    return {k: r for k, r in result.report["sets"].items() if k.startswith("torch-")}


@pytest.mark.parametrize("build_name", ["plain", pytest.param("packaged", marks=pytest.mark.slow),
                                        pytest.param("formats", marks=pytest.mark.slow),
                                        pytest.param("tuned", marks=pytest.mark.slow),
                                        pytest.param("sdxl", marks=pytest.mark.slow)])
def test_every_set_passes_parity_images_and_is_timed_against_the_baseline(build_name: str, request):
    result = request.getfixturevalue(build_name)
    assert result.passed, {k: (r["parity"]["passed"], r["e2e"]["passed"]) for k, r in _sets(result).items()}
    for key, r in _sets(result).items():
        assert r["parity"]["denoiser_steps"]["passed"], key
        assert r["e2e"]["passed"] and r["e2e"]["images"] >= 1, key
        assert set(r["latency"]["components"]) >= {"unet", "vae_decoder"}, key
        assert r["latency"]["pipeline"]["target"]["total"]["p50_s"] > 0, key
        assert result.manifest["artifacts"][key]["status"] == "passed"
    # FP32 eager runs the baseline's own computation: images identical, outputs equal to rounding.
    fp32 = result.report["sets"].get("torch-fp32")
    if fp32 is not None and build_name == "plain":
        assert fp32["e2e"]["identical"]
        assert fp32["parity"]["denoiser_steps"]["min_cosine"] > 0.999999


@pytest.mark.slow
def test_a_compiled_set_is_checked_at_the_batch_the_pipeline_calls_it_at_so_each_shape_compiles_once(tuned):
    """Parity at batch 1 and the images at batch 2 compiled the UNet twice; parity now runs at the pipeline's batch."""
    compiled = tuned.report["sets"]["torch-bf16-autocast-compile"]
    cases = compiled["parity"]["components"]["unet"]["cases"]
    assert cases and {c["batch"] for c in cases} == {2}  # guided: the UNet sees both halves at once
    assert list(compiled["runtime"]["unet"]["compile_seconds"]) == ["2x4x8x8"]
    eager = tuned.report["sets"]["torch-fp32"]["parity"]["components"]["unet"]["cases"]
    assert {c["batch"] for c in eager} == {1, 2}  # eager sets keep every case


@pytest.mark.parametrize("precision, dtype", [("fp32", "F32"), *[pytest.param(p, d, marks=pytest.mark.slow) for p, d in (
    ("fp16", "F16"), ("bf16", "BF16"), ("fp16-autocast", "F32"), ("bf16-autocast", "F32"))]])
def test_weights_are_shipped_in_the_sets_type(precision: str, dtype: str, request):
    result = request.getfixturevalue("plain" if precision == "fp32" else "formats")
    entry = result.manifest["artifacts"][f"torch-{precision}"]["components"]["unet"]
    assert entry["path"].endswith("unet/weights")
    files = {Path(f["path"]).name: f for f in entry["files"]}
    assert {"torch.json", "config.json", "diffusion_pytorch_model.safetensors"} <= set(files)
    with safe_open(result.out / entry["path"] / "diffusion_pytorch_model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert dtypes == {dtype}, (precision, dtypes)


def test_a_package_is_shipped_hashed_in_the_manifest_and_described_in_the_report(plain):
    components = plain.manifest["artifacts"]["torch-bf16-aoti"]["components"]
    package = components["vae_decoder"]
    assert package["path"].endswith("vae_decoder/model.pt2")
    assert any(f["path"].endswith("model.pt2") and len(f["sha256"]) == 64 for f in package["files"])
    runtime = plain.report["sets"]["torch-bf16-aoti"]["runtime"]
    aoti = runtime["vae_decoder"]
    assert "AOTInductor package" in aoti["summary"] and "AOTInductor" in aoti["graph"]["conversion"]
    # Left out of aoti_components: shipped as BF16 weights and run eager.
    assert components["unet"]["path"].endswith("unet/weights")
    assert runtime["unet"]["mode"] == "eager" and "eager, BF16" in runtime["unet"]["summary"]


@pytest.mark.slow
def test_an_aoti_set_packages_every_component_by_default(packaged):
    components = packaged.manifest["artifacts"]["torch-bf16-aoti"]["components"]
    assert set(components) == {"text_encoder", "unet", "vae_encoder", "vae_decoder"}
    assert all(c["path"].endswith("/model.pt2") for c in components.values())


@pytest.mark.slow
def test_the_report_says_how_each_set_runs(formats, tuned):
    runtime = formats.report["sets"]["torch-bf16-autocast"]["runtime"]["unet"]
    assert "autocast BF16" in runtime["summary"] and runtime["mode"] == "eager"
    compiled = tuned.report["sets"]["torch-bf16-autocast-compile"]["runtime"]
    # Compile time is reported per shape the component was first called at, apart from the timed runs.
    assert compiled["unet"]["compiled"] and compiled["unet"]["compile_seconds"]
    assert all(s > 0 for s in compiled["unet"]["compile_seconds"].values())
    assert "torch.compile mode reduce-overhead, frozen weights" in compiled["unet"]["graph"]["conversion"]
    assert not compiled["text_encoder"]["compiled"]  # not in compile_components
    assert compiled["unet"]["applied"] == {"attention": "sliced (max)", "channels_last": True}
    assert compiled["vae_decoder"]["applied"] == {"channels_last": True, "vae_slicing": True, "vae_tiling": True}
    assert not compiled["vae_decoder"]["compiled"]
    markdown = (tuned.out / "report" / "report.md").read_text(encoding="utf-8")
    assert "torch.compile mode reduce-overhead, frozen weights, first call per shape" in markdown


@pytest.mark.slow
def test_memory_options_are_measured_on_and_off_in_the_report(tuned):
    for key in ("torch-fp32", "torch-bf16-autocast-compile"):
        effects = {e["option"]: e for e in tuned.report["sets"][key]["option_effects"]}
        assert set(effects) == {"vae_slicing", "vae_tiling"}
        for e in effects.values():
            assert e["on"]["p50_s"] > 0 and e["off"]["p50_s"] > 0
            assert e["peak_on_bytes"] is not None and e["peak_off_bytes"] is not None
        # Slicing decodes one image at a time: the same numbers to rounding. Tiling, at the largest size the set serves (128 px,
        # above the tiny VAE's 64 px tiles), decodes overlapping tiles and blends them: different numbers (far apart
        # for this random-weight VAE, whose tiles do not agree at their edges).
        assert effects["vae_slicing"]["call"] == "vae_decoder, batch 2, 64x64"
        assert effects["vae_slicing"]["cosine_on_vs_off"] > 0.9999  # per image the same math; kernels differ by batch
        assert effects["vae_tiling"]["call"] == "vae_decoder, batch 1, 128x128 (tiles 64x64 px)"
        assert effects["vae_tiling"]["cosine_on_vs_off"] < 0.99999
    markdown = (tuned.out / "report" / "report.md").read_text(encoding="utf-8")
    assert "memory options, each measured on and off" in markdown


@pytest.mark.slow
def test_sdxl_vae_stays_fp32_in_fp16_sets_and_the_report_says_why(sdxl):
    runtime = sdxl.report["sets"]["torch-fp16"]["runtime"]
    assert runtime["vae_decoder"]["precision"] == "fp32 (kept)"
    assert "SDXL's VAE overflows in FP16" in runtime["vae_decoder"]["graph"]["reason"]
    assert runtime["unet"]["precision"] == "fp16"
    entry = sdxl.manifest["artifacts"]["torch-fp16"]["components"]["text_encoder_2"]
    with safe_open(sdxl.out / entry["path"] / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118


def test_a_package_that_cannot_be_unzipped_into_a_full_temp_folder_is_a_full_disk(plain, tmpfs,
                                                                                   monkeypatch: pytest.MonkeyPatch):
    package = plain.out / plain.manifest["artifacts"]["torch-bf16-aoti"]["components"]["vae_decoder"]["path"]
    small = tmpfs("tmp", "1m")  # AOTInductor unzips a package into the temp folder before loading it
    monkeypatch.setenv("TMPDIR", str(small))
    monkeypatch.setattr(tempfile, "tempdir", str(small))
    with pytest.raises(DiskFull, match=rf"while writing {small} \(1.0 MiB free there; it needed"):
        target.load(package)


@pytest.mark.parametrize(("build_name", "component"), [("plain", "vae_decoder"),
                                                       pytest.param("packaged", "unet", marks=pytest.mark.slow)])
def test_an_aoti_package_loads_in_a_fresh_process_without_the_models_code_and_matches(build_name: str, component: str,
                                                                                       request, tmp_path: Path):
    built = request.getfixturevalue(build_name)
    package = built.out / built.manifest["artifacts"]["torch-bf16-aoti"]["components"][component]["path"]
    spec = next(s for s in component_specs(builtin_folder("tiny-sd")) if s.name == component)
    inputs = spec.sample_inputs(2, 128, 64, seed=3)  # a shape inside the exported ranges, not the example's
    np.savez(tmp_path / "inputs.npz", **inputs)
    code = (
        "import sys, numpy as np, torch, torch._inductor\n"
        "m = torch._inductor.aoti_load_package(sys.argv[1])\n"
        "d = np.load(sys.argv[2])\n"
        f"out = m(*[torch.from_numpy(d[k]) for k in {[t.name for t in spec.inputs]!r}])\n"
        "np.save(sys.argv[3], out[0].numpy())\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers', 'diffship')))\n")
    done = subprocess.run([sys.executable, "-c", code, str(package), str(tmp_path / "inputs.npz"),
                           str(tmp_path / "out.npy")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"  # nothing of the model's Python code was imported
    fresh = np.load(tmp_path / "out.npy")
    output = spec.outputs[0].name
    here = target.load(package).run(inputs)[output]
    np.testing.assert_array_equal(fresh, here)
    module = load_component(builtin_folder("tiny-sd"), spec.module)
    assert compare(run_torch(wrap(spec, module), spec, inputs)[output], fresh)["cosine"] > 0.995  # the bf16 bar


def test_validate_checks_a_package_at_the_shapes_it_takes(plain):
    report = validate_folder(plain.out, "torch", ["unet", "vae_decoder"], precision="bf16-aoti")
    assert report["passed"]
    package = report["components"]["vae_decoder"]["cases"]  # the default cases outside its exported ranges left out
    assert package and all(1 <= c["batch"] <= 4 and 64 <= c["height"] <= 128 and 64 <= c["width"] <= 128
                           for c in package)
    eager = report["components"]["unet"]["cases"]  # eager weights take every default case
    assert any(c["width"] > 128 for c in eager)


def test_generate_runs_a_torch_set(plain, tmp_path: Path):
    image = tmp_path / "image.png"
    done = runner.invoke(app, ["generate", str(plain.out), "--backend", "torch", "--precision", "bf16-aoti", "-p",
                               "a cat", "--steps", "2", "--out", str(image)])
    assert done.exit_code == 0, done.output
    assert image.is_file() and "torch bf16-aoti" in done.output


@pytest.mark.parametrize("mode", [torch_options.COMPILE_MODES[0], *[pytest.param(m, marks=pytest.mark.slow)
                                                               for m in torch_options.COMPILE_MODES[1:]]])
def test_every_compile_mode_compiles_and_matches_eager(mode: str, tmp_path: Path, model_cache: Path):
    folder = builtin_folder("tiny-sd")
    spec = next(s for s in component_specs(folder) if s.name == "vae_decoder")
    context = CompileContext(spec, model_folder=folder)
    options = target.parse_options({"compile_mode": mode})
    artifact = target.compile(tmp_path / "none.onnx", "fp32-compile", options, tmp_path / "vae_decoder", context)
    compiled = target.load(artifact, options)
    inputs = spec.sample_inputs(1, 64, 64)
    reference = run_torch(wrap(spec, load_component(folder, "vae")), spec, inputs)["sample"]
    assert compare(reference, compiled.run(inputs)["sample"])["cosine"] > 0.99999
    assert compiled.describe().details["compile_seconds"] and f"mode {mode}" in compiled.describe().graph["conversion"]


def test_dynamic_compilation_serves_new_batch_sizes(tmp_path: Path, model_cache: Path):
    folder = builtin_folder("tiny-sd")
    spec = next(s for s in component_specs(folder) if s.name == "text_encoder")
    context = CompileContext(spec, model_folder=folder)
    options = target.parse_options({"compile_dynamic": True, "compile_components": ["text_encoder"]})
    compiled = target.load(target.compile(tmp_path / "none.onnx", "fp32-compile", options, tmp_path / "te", context),
                           options)
    reference = wrap(spec, load_component(folder, "text_encoder"))
    for batch in (2, 3, 4):
        inputs = spec.sample_inputs(batch, 64, 64, seed=batch)
        expected = run_torch(reference, spec, inputs)
        got = compiled.run(inputs)
        assert all(compare(expected[k], got[k])["cosine"] > 0.99999 for k in expected)
    assert set(compiled.describe().details["compile_seconds"]) == {"2x77", "3x77", "4x77"}


@pytest.mark.slow
def test_an_sdxl_unet_exports_as_a_package_with_dynamic_shapes(tmp_path: Path, model_cache: Path):
    folder = builtin_folder("tiny-sdxl")
    spec = next(s for s in component_specs(folder) if s.name == "unet")
    context = CompileContext(spec, model_folder=folder, shape_ranges=SHAPES, guided=True)
    package = target.compile(tmp_path / "none.onnx", "fp32-aoti", target.TorchOptions(), tmp_path / "unet", context)
    info = target.read_info(package)
    assert info["shape_ranges"] == {"batch": [1, 4], "height": [64, 128], "width": [64, 128]}
    assert set(info["dynamic"]) == {t.name for t in spec.inputs}
    reference = wrap(spec, load_component(folder, "unet"))
    loaded = target.load(package)
    for batch, height, width in ((1, 64, 64), (4, 128, 64)):
        inputs = spec.sample_inputs(batch, height, width)
        metrics = compare(run_torch(reference, spec, inputs)["out_sample"], loaded.run(inputs)["out_sample"])
        assert metrics["cosine"] > 0.99999, (batch, height, width, metrics)


# --- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"compile_mode": "fastest"}, "Unknown PyTorch compile_mode 'fastest'; choose default, reduce-overhead, max-autotune"),
    ({"attention": "flash"}, "Unknown PyTorch attention 'flash'; choose sdpa or slicing"),
    ({"offload": "disk"}, "Unknown PyTorch offload 'disk'; choose none, model or sequential"),
    ({"device": "tpu"}, "Unknown PyTorch device 'tpu'; choose auto, cpu or cuda"),
    ({"attention_slice": 0}, "attention_slice must be 'auto', 'max' or a positive number"),
    ({"compile_components": ["vae"]}, "compile_components 'vae' unknown"),
    ({"aoti_components": ["unet", "vae"]}, "aoti_components 'vae' unknown; choose from text_encoder"),
    ({"channels_last": "yes"}, "channels_last must be true or false"),
    ({"threads": 4}, "Unknown PyTorch option(s) threads"),
])
def test_bad_options_are_refused_naming_the_choices(options: dict, message: str):
    with pytest.raises(DiffshipError, match=message.replace("(", r"\(").replace(")", r"\)")):
        target.parse_options(options)


def test_an_unknown_compile_mode_fails_the_build_before_any_work(tmp_path: Path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('model = "tiny-sd"\n[[targets]]\nname = "torch"\nprecisions = ["fp32-compile"]\n'
                      'options = { compile_mode = "turbo" }\n')
    done = runner.invoke(app, ["build", str(recipe), "-o", str(tmp_path / "out")])
    assert done.exit_code == 2
    assert "Unknown PyTorch compile_mode 'turbo'; choose default, reduce-overhead, max-autotune" in done.output
    assert not (tmp_path / "out").exists()


def test_an_unknown_precision_names_the_ones_offered(tmp_path: Path):
    done = runner.invoke(app, ["build", "-m", "tiny-sd", "-t", "torch:int8", "-o", str(tmp_path / "out")])
    assert done.exit_code == 2
    assert "Target 'torch' cannot build int8 yet; it offers fp32, fp16, bf16, fp16-autocast" in done.output


def test_bf16_on_hardware_without_it_is_refused_with_the_reason(monkeypatch):
    expected = None if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no BF16 instructions"
    reason = torch_options.bf16_unsupported("cpu")
    assert reason is None if expected is None else expected in reason  # what this machine really has
    monkeypatch.setattr(torch_options, "bf16_unsupported", lambda device: "this CPU has no BF16 instructions (AVX-512 BF16 "
                                                                   "or AMX), so PyTorch would emulate BF16")
    with pytest.raises(DiffshipError, match=r"BF16 requested \(bf16, bf16-autocast-compile\) but this CPU has no BF16"):
        target.preflight(["fp32", "bf16", "bf16-autocast-compile"], target.TorchOptions(device="cpu"))
    target.preflight(["fp32", "fp16"], target.TorchOptions(device="cpu"))  # the others still build


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_without_a_gpu_is_refused_before_any_work(offload: str, tmp_path: Path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'model = "tiny-sd"\n[[targets]]\nname = "torch"\noptions = {{ offload = "{offload}" }}\n')
    done = runner.invoke(app, ["build", str(recipe), "-o", str(tmp_path / "out")])
    assert done.exit_code == 2
    assert f"offload = '{offload}' moves weights between CPU memory and a GPU; there is no CUDA GPU here" in done.output
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(DiffshipError, match="device = 'cuda' but PyTorch sees no CUDA GPU here"):
        target.preflight(["fp32"], target.TorchOptions(device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_on_a_gpu_runs_end_to_end_and_its_effect_is_measured(offload: str, tmp_path: Path, model_cache: Path):
    recipe = tiny_recipe("tiny-sd", [{"name": "torch", "precisions": ["fp16"], "options": {"offload": offload}}])
    result = build(recipe, tmp_path / "out")
    assert result.passed
    effects = result.report["sets"]["torch-fp16"]["option_effects"]
    assert [e["option"] for e in effects] == [f"{offload} offload"]
    assert effects[0]["peak_on_bytes"] < effects[0]["peak_off_bytes"]


def test_offload_cannot_be_combined_with_compiled_sets(monkeypatch):
    monkeypatch.setattr(torch_options, "resolve_device", lambda options: "cuda")  # the check after the GPU check
    with pytest.raises(DiffshipError, match="cannot be combined with fp16-compile, fp16-aoti"):
        target.preflight(["fp16", "fp16-compile", "fp16-aoti"], target.TorchOptions(offload="model"))


def test_compiled_sets_without_a_cxx_compiler_are_refused(monkeypatch):
    monkeypatch.setattr(torch_options, "_cxx_compiler", lambda: None)
    with pytest.raises(DiffshipError, match="need a C\\+\\+ compiler"):
        target.preflight(["fp32", "fp32-aoti"], target.TorchOptions(device="cpu"))
    target.preflight(["fp32", "bf16-autocast"], target.TorchOptions(device="cpu"))  # eager needs none


def test_vae_slicing_in_a_package_for_a_range_of_shapes_is_refused_and_nothing_is_written(tmp_path: Path,
                                                                                           model_cache: Path):
    folder = builtin_folder("tiny-sd")
    spec = next(s for s in component_specs(folder) if s.name == "vae_decoder")
    context = CompileContext(spec, model_folder=folder, shape_ranges=SHAPES)
    with pytest.raises(DiffshipError, match="VAE slicing and tiling branch on the input's batch and size"):
        target.compile(tmp_path / "none.onnx", "fp32-aoti", target.TorchOptions(vae_slicing=True), tmp_path / "vae",
                       context)
    assert not (tmp_path / "vae").exists() or not any((tmp_path / "vae").iterdir())


def test_the_same_set_twice_in_a_recipe_is_refused(tmp_path: Path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('model = "tiny-sd"\n[[targets]]\nname = "torch"\nprecisions = ["fp32", "bf16"]\n'
                      '[[targets]]\nname = "torch"\nprecisions = ["bf16"]\noptions = { channels_last = true }\n')
    done = runner.invoke(app, ["build", str(recipe), "-o", str(tmp_path / "out")])
    assert done.exit_code == 2 and "builds torch-bf16 more than once" in done.output


def test_an_artifact_without_its_record_is_refused(tmp_path: Path):
    with pytest.raises(DiffshipError, match="No PyTorch artifact at"):
        target.load(tmp_path / "weights")
    (tmp_path / "weights").mkdir()
    with pytest.raises(DiffshipError, match="has no torch.json beside it"):
        target.load(tmp_path / "weights")


def test_precision_names_parse_into_type_autocast_and_mode():
    assert target.variant("bf16-autocast-compile") == torch_options.Variant("bf16", True, "compile")
    assert target.variant("fp16-aoti") == torch_options.Variant("fp16", False, "aoti")
    assert target.variant("fp32") == torch_options.Variant("fp32", False, "eager")
    with pytest.raises(DiffshipError, match="PyTorch precision 'fp32-autocast' is unknown"):
        target.variant("fp32-autocast")
    assert json.loads(json.dumps(list(target.PRECISIONS))) == list(target.PRECISIONS)  # plain strings, for the manifest
