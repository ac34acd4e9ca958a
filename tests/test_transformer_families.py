"""SD3 / SD3.5 and Flux.1: the diffusion transformers build, run diffusers' own pipeline class over the artifacts,
and draw diffusers' image for every task; their INT8 sets pass their gates and the clients load them as built.

Both built-ins and two models no test was fitted to (an SD3 of 3.0's form without T5, a Flux.1-schnell) go through
the default recipe's stages: export, compile, parity on real denoising steps, images per task, latency.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffship.cli.main import app
from diffship.runtime.pipeline import DeployedPipeline, initial_latents
from diffship.runtime.tasks import default_image, default_mask
from diffship.validation.e2e import compare_images
from tests.conftest import TINY_VALIDATION

# One OpenVINO set each beside ONNX Runtime FP32: SD3's INT8 (int8-hybrid) drawn in GenAI and optimum-intel, Flux's
# FP32 in GenAI (whose scheduler reads `time_shift_type` its own way) and optimum-intel (whose reshape met Flux's
# folded Cast), its ONNX Runtime set in optimum-onnx. The other precisions (int8-auto for both) and the clients' full
# matrix are the slow tier's.
FAMILIES = {"tiny-sd3": ("onnxruntime:fp32,openvino:int8-hybrid", "StableDiffusion3Pipeline", ["genai", "optimum-intel"]),
            "tiny-flux": ("onnxruntime:fp32,openvino:fp32", "FluxPipeline", ["genai", "optimum-intel", "optimum-onnx"])}
TASKS = ["text2img", "img2img", "inpaint"]
FP32_MIN_PSNR = 35.0  # the bar: identical, or at least this


@pytest.fixture(scope="module")
def dit(tiny_build):
    """dit(model) -> the module's build of a built-in transformer model: ONNX Runtime FP32 and one OpenVINO INT8
    set, every client drawing its first image."""
    return lambda model: tiny_build(model, FAMILIES[model][0],
                                    validation={**TINY_VALIDATION, "clients": FAMILIES[model][2]})


def _sets(build) -> dict:
    return build.report["sets"]


@pytest.mark.parametrize("model", list(FAMILIES))
def test_onnxruntime_fp32_draws_diffusers_image_for_every_task(dit, model: str):
    build = dit(model)
    fp32 = _sets(build)["onnxruntime-fp32"]
    assert fp32["passed"] and fp32["denoiser"] == "transformer"
    e2e = fp32["e2e"]
    assert list(e2e["tasks"]) == TASKS
    for sample in e2e["samples"]:
        assert sample["identical"] or sample["psnr_db"] >= FP32_MIN_PSNR, sample
    # The exported T5 (and every other component) matches PyTorch's at two batches and sizes (dynamic axes)
    components = fp32["parity"]["components"]
    t5 = next(name for name in components if (build.out / "onnx" / name / "config.json").is_file()
              and json.loads((build.out / "onnx" / name / "config.json").read_text()).get("model_type") == "t5")
    for name, result in components.items():
        assert len(result["cases"]) == 2, name
        cosines = [o["cosine"] for case in result["cases"] for o in case["outputs"].values()]
        assert min(cosines) >= (0.9999 if name == t5 else 0.999), (name, cosines)
    assert fp32["parity"]["denoiser_steps"]["min_cosine"] >= 0.9999
    assert (build.out / "report" / "images" / "grid-onnxruntime-fp32.png").stat().st_size > 1000


@pytest.mark.parametrize("model", list(FAMILIES))
def test_the_image_check_can_fail(dit, model: str):
    """Another seed, and img2img beside text2img, sit far below the FP32 bar: identical images are not an accident
    of a model that draws the same picture whatever it is given."""
    deployed = DeployedPipeline.load(dit(model).out, "onnxruntime", "fp32")
    latents = [initial_latents(seed, 1, 16, 8, 8) for seed in (0, 1)]
    first, other = (deployed("a red bicycle", None, 64, 64, 3, 4.0, seed, latents=x).images[0]
                    for seed, x in zip((0, 1), latents, strict=True))
    img2img = deployed("a red bicycle", None, None, None, 3, 4.0, 0, image=default_image(64, 64)).images[0]
    inpaint = deployed("a red bicycle", None, None, None, 3, 4.0, 0, image=default_image(64, 64),
                       mask=default_mask(64, 64)).images[0]
    for candidate in (other, img2img, inpaint):
        assert compare_images(first, candidate)["psnr_db"] < FP32_MIN_PSNR - 10
    assert compare_images(img2img, inpaint)["psnr_db"] < FP32_MIN_PSNR - 10


@pytest.mark.parametrize("model", list(FAMILIES))
def test_the_openvino_set_passes_its_gates_and_the_clients_draw_the_sets(dit, model: str):
    build = dit(model)
    assert build.passed, {k: s["passed"] for k, s in _sets(build).items()}
    key = next(k for k in _sets(build) if k.startswith("openvino"))
    openvino = _sets(build)[key]
    assert openvino["parity"]["denoiser_steps"]["passed"]
    if key == "openvino-int8-hybrid":  # quantized for real: the images moved off FP32's, within the INT8 gates
        assert not any(s["identical"] for s in openvino["e2e"]["samples"])
    expected = {c: k for k in _sets(build) for c in FAMILIES[model][2]
                if (c == "optimum-onnx") == k.startswith("onnxruntime")}
    for client, set_key in expected.items():
        row = {r["client"]: r for r in _sets(build)[set_key]["clients"]["rows"]}[client]
        assert row["status"] == "pass", (set_key, client, row.get("error") or row.get("reason"))
        assert row["pipeline"] == {"genai": "Text2ImagePipeline", "optimum-intel": "OV" + FAMILIES[model][1],
                                   "optimum-onnx": "ORT" + FAMILIES[model][1]}[client]
        if set_key.endswith("fp32"):  # in FP32, the client's image is diffusers' (GenAI's Flux schedule from a folder
            # that kept diffusers' `time_shift_type`: 40.6 dB at 3 steps)
            assert row["identical"] or row["psnr_db"] >= 45, (set_key, client, row["psnr_db"])
    # each OpenVINO input is named by its spec name alone (a folded Cast had given Flux's timestep a second name)
    import openvino as ov

    graph = ov.Core().read_model(str(build.out / key / "transformer" / "openvino_model.xml"))
    assert all(len(port.get_names()) == 1 for port in graph.inputs)
    scheduler = json.loads((build.out / key / "scheduler" / "scheduler_config.json").read_text())
    assert "time_shift_type" not in scheduler  # diffusers' default, which GenAI would read as Flux.2's mu


def _sd3_form_of_3_0(folder: Path) -> None:
    """SD3.0's transformer form (no dual attention, no qk-norm; other widths and depth than the built-in's), and
    no T5: model_index.json lists text_encoder_3 / tokenizer_3 as absent, as users save it to spare memory."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(5)
    SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3,
                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=96,
                          caption_projection_dim=32, pooled_projection_dim=80, pos_embed_max_size=24
                          ).save_pretrained(folder / "transformer")
    index = json.loads((folder / "model_index.json").read_text())
    index |= {"text_encoder_3": [None, None], "tokenizer_3": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index))
    for name in ("text_encoder_3", "tokenizer_3"):
        for path in sorted((folder / name).iterdir()):
            path.unlink()
        (folder / name).rmdir()


def _flux_schnell(folder: Path) -> None:
    """Flux.1-schnell's form: no guidance embedding, other RoPE axes and depth, a fixed shift of 1."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(6)
    FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=1, attention_head_dim=16,
                           num_attention_heads=3, joint_attention_dim=64, pooled_projection_dim=32,
                           guidance_embeds=False, axes_dims_rope=(2, 6, 8)).save_pretrained(folder / "transformer")
    config = json.loads((folder / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(json.dumps({**config, "sample_size": 8}))
    scheduler = folder / "scheduler" / "scheduler_config.json"
    (scheduler).write_text(json.dumps({**json.loads(scheduler.read_text()), "use_dynamic_shifting": False,
                                       "shift": 1.0}))


@pytest.mark.parametrize(("model", "change"), [("tiny-sd3", _sd3_form_of_3_0), ("tiny-flux", _flux_schnell)])
def test_a_model_the_tests_never_saw_builds_and_draws_diffusers_image(tiny_build, model_copy, model: str, change):
    folder = model_copy(model)
    change(folder)
    build = tiny_build(str(folder), "onnxruntime:fp32")
    fp32 = _sets(build)["onnxruntime-fp32"]
    assert build.passed, fp32["parity"]["passed"]
    assert list(fp32["e2e"]["tasks"]) == TASKS
    assert all(s["identical"] or s["psnr_db"] >= FP32_MIN_PSNR for s in fp32["e2e"]["samples"])
    exported = sorted(p.name for p in (build.out / "onnx").iterdir() if p.is_dir())
    inputs = json.loads((build.out / "manifest.json").read_text())["artifacts"]["onnxruntime-fp32"]["components"]
    names = [i["name"] for i in inputs["transformer"]["inputs"]]
    if model == "tiny-sd3":
        assert "text_encoder_3" not in exported  # diffusers feeds zeros for T5's part; so does the deployed pipeline
    else:
        assert "guidance" not in names and names[:2] == ["hidden_states", "timestep"]


def test_generate_takes_flux_embedded_guidance_and_t5_length(dit, tmp_path: Path):
    out = dit("tiny-flux").out
    runner = CliRunner()
    images = {}
    for name, args in {"default": [], "guided": ["-g", "6.0"], "short": ["--max-sequence-length", "16"]}.items():
        path = tmp_path / f"{name}.png"
        result = runner.invoke(app, ["generate", str(out), "-p", "a red bicycle", "-o", str(path), "--steps", "3",
                                     "--backend", "onnxruntime", *args])
        assert result.exit_code == 0, result.output
        from PIL import Image

        images[name] = np.asarray(Image.open(path))
    # the embedded guidance and T5's padding length both reach the transformer (a tiny random model still moves)
    assert compare_images(images["default"], images["guided"])["max_abs_diff"] > 0
    assert compare_images(images["default"], images["short"])["max_abs_diff"] > 0
    refused = runner.invoke(app, ["generate", str(out), "-p", "x", "-o", str(tmp_path / "x.png"),
                                  "--max-sequence-length", "600"])
    assert refused.exit_code == 2 and "2 to 512" in refused.output
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(("args", "says"), [
    (["build", "--model", "tiny-flux", "--targets", "web"], ["Flux", "app = false"]),
    (["compress", "--model", "tiny-sd3", "--step", "prune-magnitude:sparsity=0.5"], ["SD3", "not supported yet"]),
])
def test_what_the_transformers_do_not_have_yet_is_refused_before_any_work(tmp_path: Path, model_cache: Path,
                                                                         args: list[str], says: list[str]):
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert all(s in result.output for s in says), result.output
    assert not (tmp_path / "out").exists()


# --- LoRA: diffusers / PEFT transformer.* files and Flux's BFL blocks in kohya's layout ------------------------


@pytest.mark.parametrize("model", list(FAMILIES))
def test_a_transformer_lora_merges_as_diffusers_and_peft_fuse_it(tmp_path: Path, model_cache: Path, model: str):
    """Every layout lands on the modules diffusers' own loader patches, with the same values: PEFT files for both
    families, Flux's kohya file too (without what diffusers' converter cannot read: the single blocks' linear1, whose
    widths it hard-codes at Flux.1's full size, and the final layer, which it drops; the next test covers those)."""
    pytest.importorskip("peft", reason="peft (the dev extra) is the reference for the merge")
    import diffusers
    from lora_files import flux_kohya_lora, transformer_peft_lora

    from diffship.models.builtin import builtin_folder
    from diffship.models.loading import load_component
    from diffship.models.lora import LoraSpec, merge

    folder = builtin_folder(model)
    files = [transformer_peft_lora(folder, tmp_path / "peft.safetensors")]
    if model == "tiny-flux":
        files.append(flux_kohya_lora(folder, tmp_path / "kohya.safetensors", diffusers_reads=True))
    base = load_component(folder, "transformer").state_dict()
    for path in files:
        ours = {"transformer": load_component(folder, "transformer")}
        assert merge(ours, LoraSpec(path, 0.8), "transformer")["transformer"] >= 7
        pipe = getattr(diffusers, FAMILIES[model][1]).from_pretrained(folder)
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(lora_scale=0.8)
        pipe.unload_lora_weights()
        theirs, merged = pipe.transformer.state_dict(), ours["transformer"].state_dict()
        assert all(torch.equal(theirs[k], merged[k]) for k in merged), path.name
        assert sum(not torch.equal(base[k], merged[k]) for k in merged) >= 7, path.name


def test_a_kohya_flux_lora_merged_in_bfl_layout_then_converted_equals_diffship_merge(tmp_path: Path,
                                                                                    model_cache: Path):
    """Every BFL block kind, linear1 and the final norm's (shift, scale) modulation included: adding the LoRA to the
    BFL-layout weights and converting them (the checkpoint path, equal to diffusers' own at Flux.1's widths) gives
    what diffship's merge of the LoRA into diffusers' modules gives."""
    import re

    from bfl_checkpoint import bfl_state
    from lora_files import flux_kohya_lora
    from safetensors.torch import load_file

    from diffship.models.builtin import builtin_folder
    from diffship.models.flux_checkpoint import to_diffusers
    from diffship.models.loading import load_component
    from diffship.models.lora import LoraSpec, merge

    folder = builtin_folder("tiny-flux")
    path = flux_kohya_lora(folder, tmp_path / "kohya.safetensors", magnitude=0.6)
    model = load_component(folder, "transformer")
    bfl = bfl_state(model, prefix="")
    lora = load_file(str(path))
    for key in [k for k in lora if k.endswith(".lora_down.weight")]:
        name = key.removeprefix("lora_unet_").removesuffix(".lora_down.weight")
        module = re.sub(r"^(double|single)_blocks_(\d+)_", r"\1_blocks.\2.", name)
        module = re.sub(r"_(attn)_(qkv|proj)$", r"_\1.\2", module).replace("img_mlp_0", "img_mlp.0")
        module = module.replace("final_layer_adaLN_modulation_1", "final_layer.adaLN_modulation.1")
        down, up = lora[key], lora[key.replace("lora_down", "lora_up")]
        factor = 0.8 * float(lora[key.replace("lora_down.weight", "alpha")]) / down.shape[0]
        bfl[f"{module}.weight"] = bfl[f"{module}.weight"] + factor * (up @ down)
    converted = to_diffusers(bfl, model)
    ours = {"transformer": load_component(folder, "transformer")}
    # 3 + 1 + 1 in the double block, 4 + 1 in each of the two single blocks, the final norm
    assert merge(ours, LoraSpec(path, 0.8), "transformer")["transformer"] == 16
    merged = ours["transformer"].state_dict()
    assert all(torch.allclose(converted[k], merged[k], atol=1e-6) for k in merged)
    assert not torch.equal(merged["norm_out.linear.weight"], model.state_dict()["norm_out.linear.weight"])


@pytest.fixture(scope="module")
def flux_lora(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    """A kohya Flux LoRA over every kind of BFL block, linear1 (q, k, v and the MLP's input fused) included."""
    from lora_files import flux_kohya_lora

    from diffship.models.builtin import builtin_folder

    # large enough to move the tiny model's image well past the FP32 bar (at 0.2 it moved it to 43 dB only)
    return flux_kohya_lora(builtin_folder("tiny-flux"), tmp_path_factory.mktemp("lora") / "flux-kohya.safetensors",
                           magnitude=0.6)


def test_a_flux_lora_build_and_lora_apply_draw_the_merged_pipelines_image(dit, tiny_build, flux_lora: Path,
                                                                        tmp_path: Path):
    built = tiny_build("tiny-flux", "onnxruntime:fp32", loras=[{"path": str(flux_lora), "scale": 0.8}])
    # validated against diffusers' pipeline over the merged weights: the same image
    fp32 = _sets(built)["onnxruntime-fp32"]
    assert built.passed and all(s["identical"] or s["psnr_db"] >= FP32_MIN_PSNR for s in fp32["e2e"]["samples"])
    base = dit("tiny-flux")
    latents = initial_latents(0, 1, 16, 8, 8)
    images = [DeployedPipeline.load(out, "onnxruntime", "fp32")("a red bicycle", None, 64, 64, 3, 4.0, 0,
                                                                latents=latents).images[0]
              for out in (base.out, built.out)]
    assert compare_images(*images)["psnr_db"] < FP32_MIN_PSNR - 10  # the LoRA changes the image
    # lora apply patches the base build's FP32 graph into the LoRA build's, byte for byte
    result = CliRunner().invoke(app, ["lora", "apply", str(base.out), "--lora", f"{flux_lora}:0.8", "--targets",
                                      "onnxruntime", "--out", str(tmp_path / "swapped")])
    assert result.exit_code == 0, result.output
    swapped = json.loads((tmp_path / "swapped" / "manifest.json").read_text())["artifacts"]["onnxruntime-fp32"]
    rebuilt = json.loads((built.out / "manifest.json").read_text())["artifacts"]["onnxruntime-fp32"]
    for side in (swapped, rebuilt):
        side["files"] = {f["path"]: f["sha256"] for f in side["components"]["transformer"]["files"]}
    assert swapped["files"] == rebuilt["files"]


# --- single files: a Flux transformer in BFL's layout over a diffusers folder of its family --------------------


def test_a_flux_single_file_with_model_config_exports_the_folders_weights(exported, tmp_path: Path):
    from bfl_checkpoint import write_bfl_checkpoint
    from test_single_file import _initializer_digest

    from diffship.models.builtin import builtin_folder
    from diffship.models.loading import load_component

    folder = builtin_folder("tiny-flux")
    checkpoint = write_bfl_checkpoint(load_component(folder, "transformer"), tmp_path / "tiny-flux.safetensors")
    runner = CliRunner()
    refused = runner.invoke(app, ["export", "--model", str(checkpoint), "--out", str(tmp_path / "none")])
    assert refused.exit_code == 2 and "Flux transformer checkpoint" in refused.output and "--model-config" in \
        refused.output
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", "--model", str(checkpoint), "--model-config", str(folder), "--out", str(out),
                                 "-c", "transformer"])
    assert result.exit_code == 0, result.output
    assert _initializer_digest(out / "transformer" / "model.onnx") == \
        _initializer_digest(exported("tiny-flux") / "transformer" / "model.onnx")


@pytest.mark.slow
def test_the_bfl_conversion_is_diffusers_own_at_flux_1_widths():
    """At Flux.1's widths (inner 3072, which diffusers' converter assumes), one double and one single block: the
    same tensors as diffusers' `convert_flux_transformer_checkpoint_to_diffusers`."""
    from bfl_checkpoint import bfl_state
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from diffship.models.flux_checkpoint import to_diffusers

    torch.manual_seed(0)
    model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
                                   joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                                   axes_dims_rope=(16, 56, 56))
    state = bfl_state(model)
    theirs, ours = convert_flux_transformer_checkpoint_to_diffusers(dict(state)), to_diffusers(state, model)
    assert sorted(theirs) == sorted(ours) == sorted(model.state_dict())
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_an_sd3_single_file_with_model_config_converts_to_the_folders_weights(tmp_path: Path, model_cache: Path):
    """SD3's original (MMDiT) layout, dual attention and RMS qk-norm included, through diffusers' own converter."""
    from bfl_checkpoint import sd3_state
    from safetensors.torch import save_file

    from diffship.errors import DiffshipError
    from diffship.models.builtin import builtin_folder
    from diffship.models.loading import load_component
    from diffship.models.source import resolve

    folder = builtin_folder("tiny-sd3")
    model = load_component(folder, "transformer")
    checkpoint = tmp_path / "tiny-sd3.safetensors"
    save_file(sd3_state(model), str(checkpoint))
    with pytest.raises(DiffshipError, match="SD3 transformer checkpoint"):
        resolve(str(checkpoint))
    source = resolve(str(checkpoint), model_config=str(folder))
    converted, original = load_component(source.folder, "transformer").state_dict(), model.state_dict()
    assert sorted(converted) == sorted(original) and all(torch.equal(converted[k], original[k]) for k in original)
    assert (source.folder / "text_encoder_3").is_dir() and source.kind == "single-file"


def test_tensorrt_profiles_span_the_transformers_token_axes(model_cache: Path):
    """TensorRT's code path (not runnable here): engine profiles from the transformers' axes, T5 sequences from one
    token to 512, Flux's packed image tokens from the smallest to the largest image of the recipe's range."""
    from diffship.models.builtin import builtin_folder
    from diffship.models.components import component_specs
    from diffship.targets import tensorrt

    ranges = {"batch": [1, 2], "height": [64, 128], "width": [64, 128]}
    flux = {s.name: s for s in component_specs(builtin_folder("tiny-flux"))}
    low, opt, high = zip(*tensorrt.profile_shapes(flux["transformer"], ranges, (64, 64), guided=True).values(),
                         strict=True)
    names = [t.name for t in flux["transformer"].inputs]
    hidden, ids, text = names.index("hidden_states"), names.index("img_ids"), names.index("encoder_hidden_states")
    # guidance is an input of Flux: the batch is never doubled; 64 px = 4 x 4 packed tokens, 128 px = 8 x 8
    assert (low[hidden], opt[hidden], high[hidden]) == ((1, 16, 64), (1, 16, 64), (2, 64, 64))
    assert (low[ids], high[ids]) == ((16, 3), (64, 3))
    assert (low[text][1], opt[text][1], high[text][1]) == (1, 512, 512)
    sd3 = {s.name: s for s in component_specs(builtin_folder("tiny-sd3"))}
    profile = tensorrt.profile_shapes(sd3["transformer"], ranges, (64, 64), guided=True)
    assert [shape[1] for shape in profile["encoder_hidden_states"]] == [78, 333, 589]  # 77 CLIP + 1 / 256 / 512 T5
    assert [shape[0] for shape in profile["hidden_states"]] == [1, 2, 4]  # SD3 guides with a second batch half
    t5 = tensorrt.profile_shapes(sd3["text_encoder_3"], ranges, (64, 64), guided=True)
    assert [shape[1] for shape in t5["input_ids"]] == [1, 256, 512]


SLOW_TARGETS = {"tiny-sd3": "onnxruntime:int8+int8-auto,openvino:fp32+bf16+int8-weights+int8-auto,torch:fp32,coreml,"
                            "mobile",
                "tiny-flux": "onnxruntime:fp16+int8,openvino:bf16+int8-hybrid+int8-auto,torch:fp32-aoti,coreml,mobile"}


@pytest.mark.slow
@pytest.mark.parametrize("model", list(SLOW_TARGETS))
def test_every_cpu_target_builds_and_passes_the_transformers(tiny_build, model: str):
    build = tiny_build(model, SLOW_TARGETS[model])
    assert build.passed, {k: s["passed"] for k, s in _sets(build).items()}
    for key, result in _sets(build).items():
        if key.startswith("coreml"):  # converted and spec-checked only off macOS
            assert result["spec"]["passed"] and "not_run" in result
        else:
            assert list(result["e2e"]["tasks"]) == TASKS, key
            assert result["parity"]["denoiser_steps"]["passed"], key
