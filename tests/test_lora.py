"""LoRA files merged before export: kohya, PEFT and LoCon layouts, transformers 4 names on transformers 5 modules,
every key accounted for, and builds whose images are the merged PyTorch pipeline's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_files import kohya_lora, peft_lora
from safetensors.torch import save_file
from typer.testing import CliRunner

from diffship.cli.main import app
from diffship.errors import DiffshipError
from diffship.models.builtin import builtin_folder
from diffship.models.loading import load_component
from diffship.models.lora import LoraSpec, merge
from diffship.models.source import resolve


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> dict[str, Path]:
    folder, out = builtin_folder("tiny-sd"), tmp_path_factory.mktemp("lora")
    return {"kohya": kohya_lora(folder, out / "kohya.safetensors"), "peft": peft_lora(folder, out / "peft.safetensors")}


def _modules() -> dict[str, torch.nn.Module]:
    folder = builtin_folder("tiny-sd")
    return {"unet": load_component(folder, "unet"), "text_encoder": load_component(folder, "text_encoder")}


def _layers(tensors: dict) -> dict[str, int]:
    """Layers per component in a kohya file, counted from its keys."""
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    return {"unet": sum(k.startswith("lora_unet_") for k in downs), "text_encoder": sum(k.startswith("lora_te_") for k in downs)}


def test_parse_path_and_scale():
    assert LoraSpec.parse("a/b.safetensors:0.7") == LoraSpec(Path("a/b.safetensors"), 0.7)
    assert LoraSpec.parse("a/b.safetensors") == LoraSpec(Path("a/b.safetensors"), 1.0)


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_the_unet_merge_equals_diffusers_and_peft_fusing_the_same_file(files, layout: str):
    pytest.importorskip("peft", reason="peft (the dev extra) is the reference for the UNet merge")
    from diffship.validation.baseline import load_baseline

    pipe = load_baseline(builtin_folder("tiny-sd"), device="cpu", dtype=torch.float32)
    pipe.load_lora_weights(str(files[layout]), adapter_name="x")
    pipe.fuse_lora(components=["unet"], lora_scale=0.8)
    pipe.unload_lora_weights()  # the fused weights stay, peft's wrappers go
    theirs = pipe.unet.state_dict()
    modules = _modules()
    counts = merge(modules, LoraSpec(files[layout], 0.8), "unet")
    ours = modules["unet"].state_dict()
    original = load_component(builtin_folder("tiny-sd"), "unet").state_dict()
    changed = [k for k in ours if not torch.equal(ours[k], original[k])]
    assert counts["unet"] == len(changed) > 0
    worst = max(float((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max()) for k in changed)
    assert worst < 1e-5, worst


def test_the_text_encoder_merge_is_w_plus_scale_alpha_over_rank_b_a(files):
    from safetensors.torch import load_file

    tensors = load_file(str(files["kohya"]))
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    down, up, alpha = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"], float(tensors[f"{key}.alpha"])
    modules = _modules()
    before = modules["text_encoder"].get_submodule("encoder.layers.0.self_attn.q_proj").weight.clone()
    counts = merge(modules, LoraSpec(files["kohya"], 0.5), "unet")
    after = modules["text_encoder"].get_submodule("encoder.layers.0.self_attn.q_proj").weight
    torch.testing.assert_close(after, before + 0.5 * alpha / down.shape[0] * up @ down)
    assert counts == _layers(tensors)


def test_a_lora_that_matches_nothing_or_only_part_is_refused(tmp_path: Path, files, model_cache: Path):
    stranger = tmp_path / "sdxl.safetensors"
    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 32),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(32, 2)}, str(stranger))
    with pytest.raises(DiffshipError, match="none of its layers match; no module for text_encoder_2:"):
        merge(_modules(), LoraSpec(stranger), "unet")
    from safetensors.torch import load_file

    partial = dict(load_file(str(files["kohya"])))
    partial |= {"lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.ones(2, 32),
                "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": torch.ones(32, 2)}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    total = sum(_layers(partial).values())
    with pytest.raises(DiffshipError, match=rf"{total - 1} of {total} of its layers match; no module for unet:down_blocks_9"):
        merge(_modules(), LoraSpec(tmp_path / "partial.safetensors"), "unet")
    save_file({"model.weight": torch.ones(2)}, str(tmp_path / "junk.safetensors"))
    with pytest.raises(DiffshipError, match="not LoRA weights diffship reads"):
        merge(_modules(), LoraSpec(tmp_path / "junk.safetensors"), "unet")


def test_a_merged_model_is_a_cached_folder_recorded_with_hashes_and_scales(files, model_cache: Path):
    said: list[str] = []
    source = resolve("tiny-sd", loras=[LoraSpec(files["kohya"], 0.8), LoraSpec(files["peft"], 0.5)], say=said.append)
    assert [r["scale"] for r in source.loras] == [0.8, 0.5] and all(len(r["sha256"]) == 64 for r in source.loras)
    from safetensors.torch import load_file

    assert source.loras[0]["layers"] == _layers(load_file(str(files["kohya"])))
    assert any("Merging LoRA kohya.safetensors" in line for line in said)
    vae = next((source.folder / "vae").glob("*.safetensors"))
    assert vae.stat().st_nlink >= 2  # untouched components are linked, not copied
    again: list[str] = []
    assert resolve("tiny-sd", loras=[LoraSpec(files["kohya"], 0.8), LoraSpec(files["peft"], 0.5)],
                   say=again.append).folder == source.folder and not again
    assert resolve("tiny-sd", loras=[LoraSpec(files["kohya"], 0.7)]).folder != source.folder


def _lora_build(files: dict[str, Path], layout: str, targets: str, root: Path, few_step: bool):
    out = root / "out"
    result = CliRunner().invoke(app, ["build", "--model", "tiny-sd", "--lora", f"{files[layout]}:0.8", "--targets",
                                      targets, "--out", str(out), str(_fast_recipe(root, few_step=few_step))])
    return result, out, layout


@pytest.fixture(scope="module")
def lora_build(files, tmp_path_factory: pytest.TempPathFactory):
    """The kohya LoCon file, shipped as a few-step LoRA is, on both CPU runtimes: what lora apply is checked against."""
    return _lora_build(files, "kohya", "onnxruntime:fp32,openvino:fp32", tmp_path_factory.mktemp("lora-build"), True)


@pytest.fixture(scope="module")
def peft_build(files, tmp_path_factory: pytest.TempPathFactory):
    """The PEFT file, at 3 guided steps, on ONNX Runtime FP32 only (the layouts differ in reading, not in targets)."""
    return _lora_build(files, "peft", "onnxruntime:fp32", tmp_path_factory.mktemp("peft-build"), False)


def _fast_recipe(folder: Path, few_step: bool = False) -> Path:
    """Three steps under guidance; or, as a few-step LoRA is shipped, LCM at 4 steps without guidance. Latency is
    measured, as the default recipe does."""
    path = folder / "fast.toml"
    sampling = 'scheduler = "lcm"\nsteps = 4\nguidance_scale = 1.0\n' if few_step else "steps = 3\nguidance_scale = 6.0\n"
    path.write_text(f'[validation]\nprompts = ["a lighthouse"]\n{sampling}[validation.latency]\nwarmup = 1\nruns = 2\n'
                    'pipeline_runs = 1\n')
    return path


@pytest.mark.parametrize("which", ["lora_build", pytest.param("peft_build", marks=pytest.mark.slow)])
def test_a_build_with_a_lora_draws_the_merged_pytorch_pipelines_image(which: str, request, exported):
    result, out, layout = request.getfixturevalue(which)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [Path(r["path"]).name for r in manifest["source"]["loras"]] == [f"{layout}.safetensors"]
    report = json.loads((out / "report" / "report.json").read_text())
    e2e = report["sets"]["onnxruntime-fp32"]["e2e"]
    assert e2e["passed"] and (e2e["min_psnr_db"] is None or e2e["min_psnr_db"] >= 35)
    assert f"LoRA merged before export: {layout}.safetensors x0.8" in (out / "report" / "report.md").read_text()
    # The check can fail: the LoRA moves the exported UNet's output far from the base model's.
    from diffship.models.components import component_specs
    from diffship.targets import onnxruntime
    from diffship.validation.parity import compare

    spec = next(s for s in component_specs(builtin_folder("tiny-sd")) if s.name == "unet")
    inputs = spec.sample_inputs(2, 64, 64)
    merged = onnxruntime.load(out / "onnx" / "unet" / "model.onnx").run(inputs)["out_sample"]
    base = onnxruntime.load(exported("tiny-sd") / "unet" / "model.onnx").run(inputs)["out_sample"]
    assert compare(base, merged)["cosine"] < 0.99, compare(base, merged)
    assert np.isfinite(merged).all()


def test_a_few_step_build_records_its_sampling_and_generate_defaults_to_it(lora_build, tmp_path: Path):
    _, out, _ = lora_build
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generation"] == {"scheduler": "lcm", "scheduler_config": {}, "steps": 4, "guidance_scale": 1.0}
    said = CliRunner().invoke(app, ["generate", str(out), "-p", "a lighthouse", "--out", str(tmp_path / "a.png")])
    assert said.exit_code == 0 and "LCMScheduler" in said.output, said.output
    from PIL import Image

    from diffship.runtime.pipeline import DeployedPipeline

    pipe = DeployedPipeline.load(out)
    pipe.use_scheduler("lcm")
    expected = pipe("a lighthouse", steps=4, guidance_scale=1.0, seed=0).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png").convert("RGB")), expected)
    pipe.use_scheduler("lcm")
    assert not np.array_equal(pipe("a lighthouse", steps=20, guidance_scale=7.5, seed=0).images[0], expected)


def test_a_missing_or_pickled_lora_exits_2_before_any_work(tmp_path: Path, model_cache: Path):
    result = CliRunner().invoke(app, ["export", "--model", "tiny-sd", "--lora", str(tmp_path / "none.safetensors"),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "none.safetensors does not exist" in result.output, result.output
    (tmp_path / "style.pt").write_bytes(b"pickle")
    result = CliRunner().invoke(app, ["export", "--model", "tiny-sd", "--lora", f"{tmp_path / 'style.pt'}:0.5",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "pickle files can run code" in result.output, result.output
    assert not (tmp_path / "out").exists()


# --- lora apply: a LoRA swapped into an existing build by patching its weights ---------------------------------


@pytest.fixture(scope="module")
def base_build(tiny_build) -> Path:
    """The suite's tiny-sd build on both CPU runtimes, with FP16 weights beside FP32 on OpenVINO (its sets come from
    the cache when the runtimes' own tests built them)."""
    result = tiny_build("tiny-sd", "onnxruntime:fp32,openvino:fp32+fp16")
    assert result.passed
    return result.out


def _files(manifest: dict, key: str) -> dict[str, str]:
    return {f["path"]: f["sha256"] for c in manifest["artifacts"][key]["components"].values() for f in c["files"]}


def test_lora_apply_writes_what_a_rebuild_with_the_lora_writes(base_build, lora_build, tmp_path: Path):
    """The patched ONNX and OpenVINO IR are byte for byte the rebuilt ones, whose images equal the merged PyTorch
    pipeline's (the build test above) and whose UNet is far from the base's: the patch changes what it must."""
    rebuilt_result, rebuilt, layout = lora_build
    assert rebuilt_result.exit_code == 0, rebuilt_result.output
    lora = json.loads((rebuilt / "manifest.json").read_text())["source"]["loras"][0]["path"]
    result = CliRunner().invoke(app, ["lora", "apply", str(base_build), "--lora", f"{lora}:0.8", "--out", str(tmp_path / "new")])
    assert result.exit_code == 0, result.output
    swapped = json.loads((tmp_path / "new" / "manifest.json").read_text())
    built = json.loads((rebuilt / "manifest.json").read_text())
    base = json.loads((base_build / "manifest.json").read_text())
    assert "generation" not in base  # its recipe names no scheduler: generate keeps its own defaults
    assert set(swapped["artifacts"]) == {"onnxruntime-fp32", "openvino-fp32", "openvino-fp16"}
    for key in ("onnxruntime-fp32", "openvino-fp32"):
        # An IR's .xml names generated nodes by a counter of the converting process, so it is the base's, unchanged;
        # its weights (.bin) are the rebuild's.
        rebuilt_files = _files(built, key)
        rebuilt_files |= {p: h for p, h in _files(base, key).items() if p.endswith(".xml")}
        assert _files(swapped, key) == rebuilt_files
        changed = {p for p, h in _files(swapped, key).items() if _files(base, key)[p] != h}
        assert changed and all("/unet/" in p or "/text_encoder/" in p for p in changed)
    assert swapped["source"]["sha256"] == built["source"]["sha256"]
    assert [Path(x["path"]).name for x in swapped["recipe"]["loras"]] == [f"{layout}.safetensors"]
    report = json.loads((tmp_path / "new" / "report" / "report.json").read_text())
    assert report["passed"] and report["sets"]["openvino-fp16"]["patched"]["unet"] > 0
    # The swapped build is a build: it opens, verifies and generates like one.
    from diffship.runtime.pipeline import DeployedPipeline

    images = DeployedPipeline.load(tmp_path / "new", target="openvino", precision="fp16")(
        "a lighthouse", steps=2, seed=0).images
    assert images.shape == (1, 64, 64, 3) and images.std() > 0


@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
def test_generate_with_a_lora_at_run_time_draws_the_rebuilt_builds_image(base_build, lora_build, tmp_path: Path,
                                                                        target: str):
    """No files written: the base build's weights take the LoRA as they load (ONNX Runtime initializer overrides,
    OpenVINO constants replaced in memory); the UNet then computes what the rebuilt one does, far from the base's."""
    _, rebuilt, _ = lora_build
    lora = json.loads((rebuilt / "manifest.json").read_text())["source"]["loras"][0]["path"]
    sampling = ["-p", "a lighthouse", "--backend", target, "--precision", "fp32", "--steps", "3", "-g", "6",
                "--scheduler", "pndm"]
    before = sorted(p.name for p in base_build.rglob("*"))
    said = CliRunner().invoke(app, ["generate", str(base_build), *sampling, "--lora", f"{lora}:0.8",
                                    "--out", str(tmp_path / "runtime.png")])
    assert said.exit_code == 0 and "Loaded with 1 LoRA(s) merged" in said.output, said.output
    assert sorted(p.name for p in base_build.rglob("*")) == before
    said = CliRunner().invoke(app, ["generate", str(rebuilt), *sampling, "--out", str(tmp_path / "rebuilt.png")])
    assert said.exit_code == 0, said.output
    from PIL import Image

    from diffship.validation.e2e import compare_images

    runtime, merged = (np.asarray(Image.open(tmp_path / f"{n}.png").convert("RGB")) for n in ("runtime", "rebuilt"))
    psnr = compare_images(merged, runtime)["psnr_db"]
    assert psnr is None or psnr >= 35, psnr
    from diffship.models.components import component_specs
    from diffship.runtime.pipeline import DeployedPipeline
    from diffship.validation.parity import compare

    spec = next(s for s in component_specs(builtin_folder("tiny-sd")) if s.name == "unet")
    inputs = spec.sample_inputs(2, 64, 64)
    with_lora = DeployedPipeline.load(base_build, target, "fp32", loras=[LoraSpec(Path(lora), 0.8)]).runners["unet"]
    rebuilt_unet = DeployedPipeline.load(rebuilt, target, "fp32").runners["unet"]
    base_unet = DeployedPipeline.load(base_build, target, "fp32").runners["unet"]
    expected = rebuilt_unet.run(inputs)["out_sample"]
    assert compare(expected, with_lora.run(inputs)["out_sample"])["cosine"] > 0.99999
    assert compare(expected, base_unet.run(inputs)["out_sample"])["cosine"] < 0.99


def test_lora_apply_refuses_quantized_and_unpatchable_sets_and_names_the_way_out():
    from diffship.stages.lora_apply import choose_sets
    from diffship.store.manifest import SetRecord
    from diffship.targets.weight_patch import patch_refusal

    assert "re-quantize: rebuild with --lora" in patch_refusal("onnxruntime", "int8")
    assert "re-quantize: rebuild with --lora" in patch_refusal("openvino", "int8-hybrid")
    assert "rebuild with --lora" in patch_refusal("torch", "bf16-aoti")
    assert patch_refusal("onnxruntime", "fp16") is None and patch_refusal("openvino", "bf16") is None
    sets = {f"onnxruntime-{p}": SetRecord(target="onnxruntime", precision=p, components={}) for p in ("fp32", "int8")}
    with pytest.raises(DiffshipError, match=r"onnxruntime-int8 \(its weights are quantized.*--targets onnxruntime:fp32"):
        choose_sets(sets, None)
    assert list(choose_sets(sets, [{"name": "onnxruntime", "precisions": ["fp32"]}])) == ["onnxruntime-fp32"]


def test_lora_apply_refuses_a_lora_that_fits_nothing_and_leaves_no_folder(base_build, tmp_path: Path):
    stranger = tmp_path / "sdxl.safetensors"
    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 32),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(32, 2)}, str(stranger))
    result = CliRunner().invoke(app, ["lora", "apply", str(base_build), "--lora", str(stranger), "--out", str(tmp_path / "new")])
    assert result.exit_code == 2 and "none of its layers match" in result.output, result.output
    assert not (tmp_path / "new").exists()


def test_a_weight_the_artifact_does_not_hold_is_named_not_patched(exported, tmp_path: Path):
    from diffship.targets.weight_patch import Change, patch_onnx

    stranger = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
    with pytest.raises(DiffshipError, match=r"not stored as exported \(unet:foo.to_q\).*rebuild with --lora"):
        patch_onnx(exported("tiny-sd") / "unet" / "model.onnx", tmp_path / "model.onnx",
                   [Change("unet:foo.to_q", stranger, stranger + 1)])
    assert not (tmp_path / "model.onnx").exists()
