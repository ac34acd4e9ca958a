"""Pipeline accelerations (issue 46): deep-feature caching's two graphs compute the UNet, each acceleration changes the
image by a measured amount, the budget picks the recommended row, and generate draws with it by default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffship.accelerations import Accelerations, DeepCache, GuidanceTruncation, parse_accelerations, step_plan
from diffship.cli.main import app
from diffship.errors import DiffshipError
from diffship.models.builtin import builtin_folder
from diffship.models.components import cache_specs, component_specs, run_torch, wrap

# Two caching steps and eight shallow ones (interval 5), guidance on the first step only: together they draw the image
# with about a third of the denoiser's work; interval 2 is a second point of the frontier. The fastest of five calls per
# row ranks them (a busy host's slow spells stretch medians).
RECIPE = """model = "tiny-sd"
[shapes]
batch = [1, 2]
height = [64, 128]
width = [64, 128]
[validation]
prompts = ["a red bicycle"]
steps = 10
guidance_scale = 6.0
clients = []
[validation.latency]
runs = 2
pipeline_runs = 5
[accelerations]
deep_cache = [{ interval = 5, depth = 1 }, { interval = 2, depth = 1 }]
guidance = { until = 0.1 }
vae_decoder = "taesd"
"""


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_the_shallow_graph_on_its_own_calls_features_is_the_unet_at_every_depth(model: str, model_cache):
    from diffusers import UNet2DConditionModel

    folder = builtin_folder(model)
    denoiser = next(s for s in component_specs(folder) if s.is_denoiser)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    call, other = denoiser.sample_inputs(2, 64, 64, seed=0), denoiser.sample_inputs(2, 64, 64, seed=1)
    expected = run_torch(wrap(denoiser, unet), denoiser, call)["out_sample"]
    for depth in range(1, sum(len(block.resnets) for block in unet.up_blocks)):
        caching, shallow = cache_specs(denoiser, folder, depth)
        full = run_torch(wrap(caching, unet), caching, call)
        assert np.array_equal(full["out_sample"], expected)
        assert full["cached_features"].shape == caching.outputs[-1].concrete(caching.axis_sizes(2, 64, 64))
        same = run_torch(wrap(shallow, unet), shallow, call | {"cached_features": full["cached_features"]})
        assert np.array_equal(same["out_sample"], expected)
        # another call's features (an earlier step's, as a shallow step reuses them) change the output
        stale = run_torch(wrap(caching, unet), caching, other)["cached_features"]
        changed = run_torch(wrap(shallow, unet), shallow, call | {"cached_features": stale})["out_sample"]
        assert np.abs(changed - expected).max() > 1e-2


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_the_shallow_transformer_on_its_own_calls_residual_is_the_transformer_at_every_depth(model: str, model_copy):
    """Block caching: the shallow graph fed the caching graph's residual of the same call is the transformer, to float
    rounding (it adds back what the middle blocks added); an earlier call's residual changes its output. tiny-sd3's two
    blocks leave no middle: five here (two dual-attention ones, as in SD3.5)."""
    import diffusers

    folder = model_copy(model)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    kind = getattr(diffusers, config["_class_name"])
    if model == "tiny-sd3":
        torch.manual_seed(0)
        kind.from_config({**config, "num_layers": 5, "dual_attention_layers": [0, 1]}).save_pretrained(
            folder / "transformer")
    transformer = kind.from_pretrained(folder / "transformer").eval()
    denoiser = next(s for s in component_specs(folder) if s.is_denoiser)
    call, other = denoiser.sample_inputs(2, 64, 64, seed=0), denoiser.sample_inputs(2, 64, 64, seed=1)
    expected = run_torch(wrap(denoiser, transformer), denoiser, call)["out_sample"]
    depths = {"tiny-flux": [1], "tiny-sd3": [1, 2]}[model]  # Flux: one double-stream block before two single
    for depth in depths:
        caching, shallow = cache_specs(denoiser, folder, depth)
        full = run_torch(wrap(caching, transformer), caching, call)
        assert np.array_equal(full["out_sample"], expected)
        assert full["cached_features"].shape == caching.outputs[-1].concrete(caching.axis_sizes(2, 64, 64))
        same = run_torch(wrap(shallow, transformer), shallow, call | {"cached_features": full["cached_features"]})
        np.testing.assert_allclose(same["out_sample"], expected, rtol=0, atol=1e-5)
        stale = run_torch(wrap(caching, transformer), caching, other)["cached_features"]
        changed = run_torch(wrap(shallow, transformer), shallow, call | {"cached_features": stale})["out_sample"]
        assert np.abs(changed - expected).max() > 1e-2
    with pytest.raises(DiffshipError, match=f"depth {depths[-1] + 1} must be 1 to {depths[-1]}"):
        cache_specs(denoiser, folder, depths[-1] + 1)


@pytest.mark.parametrize("model", ["sd15-arch", "sdxl-arch"])
def test_the_declared_features_are_what_the_full_size_unets_hand_over(model: str):
    """The tiny UNets' blocks are all one width; the full-size ones show the channels and resolutions the features
    spec reads from the config (run on the meta device: shapes without weights)."""
    from diffusers import UNet2DConditionModel

    from diffship.models.builtin import BUILTINS
    from diffship.models.families.unet import cache_features
    from diffship.models.families.unet_cache import CachingUNet

    config = BUILTINS[model].denoiser
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        conditioned = unet.config.addition_embed_type == "text_time"
        extra = (torch.zeros(2, 1280), torch.zeros(2, 6)) if conditioned else ()
        for depth in range(1, sum(len(block.resnets) for block in unet.up_blocks)):
            _, features = CachingUNet(unet, conditioned, depth)(torch.zeros(2, 4, 64, 64), torch.zeros(2),
                                                                torch.zeros(2, 77, unet.config.cross_attention_dim),
                                                                *extra)
            sizes = {"batch": 2, "height": 64, "width": 64} | {f"{s}_{f}": 64 // f for s in ("height", "width")
                                                                 for f in (2, 4, 8)}
            assert tuple(features.shape) == cache_features(dict(unet.config), depth).concrete(sizes), depth


def test_the_step_plan_caches_every_interval_and_truncates_guidance():
    plan = step_plan(10, Accelerations(deep_cache=DeepCache(interval=3), guidance=GuidanceTruncation(until=0.25)), True)
    assert [s.graph for s in plan] == ["caching", "shallow", "shallow"] * 3 + ["caching"]
    assert [s.guided for s in plan] == [True] * 3 + [False] * 7
    assert all(not s.guided for s in step_plan(4, Accelerations(), False))
    assert parse_accelerations(["deep-cache:interval=4,depth=2", "guidance:until=0.5"]).label == \
        "deep-cache:interval=4,depth=2; guidance:until=0.5; deep-cache:interval=4,depth=2+guidance:until=0.5"
    assert not parse_accelerations(["none"]).active
    # a repeated acceleration is one more setting to measure: alone, and with each setting of the others
    grid = parse_accelerations(["deep-cache:interval=2", "deep-cache:interval=3", "guidance:until=0.5"])
    assert [c.label for c in grid.combinations()] == [
        "none", "deep-cache:interval=2,depth=1", "deep-cache:interval=3,depth=1", "guidance:until=0.5",
        "deep-cache:interval=2,depth=1+guidance:until=0.5", "deep-cache:interval=3,depth=1+guidance:until=0.5"]
    assert grid.cache_depth == 1
    with pytest.raises(DiffshipError, match="draws with one combination"):
        grid.only("generate")
    with pytest.raises(DiffshipError, match="share one depth"):
        parse_accelerations(["deep-cache:depth=1", "deep-cache:depth=2"])
    with pytest.raises(DiffshipError, match="unknown acceleration 'tome'"):
        parse_accelerations(["tome:ratio=0.5"])


def tiny_decoder(folder: Path) -> Path:
    """A random-weight AutoencoderTiny (TAESD's class) that decodes tiny-sd's latents: 4 channels, 8x upscaling."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                    num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, model_cache) -> Path:
    folder = tmp_path_factory.mktemp("accelerated")
    (folder / "recipe.toml").write_text(RECIPE)
    tiny_decoder(folder / "taesd")
    out = folder / "out"
    said = CliRunner().invoke(app, ["build", str(folder / "recipe.toml"), "--targets", "onnxruntime:fp32",
                                    "--out", str(out)])
    assert said.exit_code == 0, said.output
    assert "whole image: round 6/6 done" in said.output  # progress while the rows take turns (1 warm-up + 5 timed)
    return out


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "report" / "report.json").read_text())["sets"]["onnxruntime-fp32"]["accelerations"]["rows"]


def test_each_acceleration_changes_the_image_by_a_measured_amount(built: Path):
    report = json.loads((built / "report" / "report.json").read_text())
    result = report["sets"]["onnxruntime-fp32"]
    # both graphs built, exported and checked like any component
    assert {"caching_unet_d1", "shallow_unet_d1"} <= set(_manifest(built)["artifacts"]["onnxruntime-fp32"]["components"])
    assert result["parity"]["components"]["shallow_unet_d1"]["passed"]
    rows = {r["accelerations"]: r for r in _rows(built)}
    decoder = f"vae-decoder:path={built.parent / 'taesd'}"
    assert list(rows) == ["none", "deep-cache:interval=5,depth=1", "deep-cache:interval=2,depth=1", "guidance:until=0.1",
                          decoder, f"deep-cache:interval=5,depth=1+guidance:until=0.1+{decoder}",
                          f"deep-cache:interval=2,depth=1+guidance:until=0.1+{decoder}"]
    # a random tiny decoder draws another image altogether: far outside the budget, never recommended
    assert result["parity"]["components"]["tiny_vae_decoder"]["passed"]
    assert rows[decoder]["min_psnr_db"] < 20 and not rows[decoder]["within_budget"]
    exact = rows["none"]["min_psnr_db"]
    assert exact is None or exact > 60  # the FP32 set's own loop draws the baseline's image, to float noise
    for label, row in rows.items():
        assert row["image_time"]["runs"] == 5 and row["speedup"] > 0
        if label != "none":  # approximate: a PSNR a budget can fail, under what FP32 export noise gives (identical)
            assert row["approximate"] and row["min_psnr_db"] is not None and row["min_psnr_db"] < 60, row
            assert row["within_budget"] == (row["min_psnr_db"] >= 30 and row["min_ssim"] >= 0.9)
    # caching more often keeps more of the image: the settings are points of a frontier, not one number twice
    assert rows["deep-cache:interval=2,depth=1"]["min_psnr_db"] > rows["deep-cache:interval=5,depth=1"]["min_psnr_db"]
    assert "Whole image against PyTorch FP32" in (built / "report" / "report.md").read_text()


def test_the_budget_picks_the_fastest_row_within_it_and_another_when_tightened(built: Path, tmp_path: Path):
    loose = _manifest(built)["recommended"]
    eligible = [r for r in _rows(built) if r["within_budget"]]
    assert loose["label"] == max(eligible, key=lambda r: r["speedup_fastest"])["accelerations"]
    assert loose["approximate"], "deep-feature caching and truncated guidance should draw tiny-sd faster"
    # the same build with a budget no approximate image keeps: measurements read back, judged again
    said = CliRunner().invoke(app, ["build", str(built.parent / "recipe.toml"), "--targets", "onnxruntime:fp32",
                                    "--budget", "min_psnr=99", "--out", str(tmp_path / "tight")])
    assert said.exit_code == 0, said.output
    tight = _manifest(tmp_path / "tight")["recommended"]
    assert tight["label"] == "none" and not tight["approximate"]
    assert not any(r["within_budget"] for r in _rows(tmp_path / "tight") if r["approximate"])


def _generate(out: Path, path: Path, *accelerate: str) -> np.ndarray:
    args = ["generate", str(out), "-p", "a red bicycle", "--steps", "10", "-g", "6", "--height", "64", "--width", "64",
            "--out", str(path)]
    said = CliRunner().invoke(app, args + [a for value in accelerate for a in ("--accelerate", value)])
    assert said.exit_code == 0, said.output
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_draws_with_the_recommended_accelerations_unless_told_otherwise(built: Path, tmp_path: Path):
    recommended = _manifest(built)["recommended"]["label"]
    default = _generate(built, tmp_path / "default.png")
    assert np.array_equal(default, _generate(built, tmp_path / "same.png", *recommended.split("+")))
    assert not np.array_equal(default, _generate(built, tmp_path / "none.png", "none"))


def test_a_lora_at_run_time_reaches_the_deep_cache_graphs(built: Path, tmp_path: Path):
    """The recommended accelerations run the caching and shallow graphs, not the UNet: a LoRA given to generate must
    patch them as it patches the UNet, or the steps would draw the base model."""
    from lora_files import kohya_lora

    from diffship.models.lora import LoraSpec
    from diffship.runtime.lora import runtime_changes
    from diffship.store.manifest import open_artifacts

    lora = kohya_lora(builtin_folder("tiny-sd"), tmp_path / "lora.safetensors")
    changes = runtime_changes(open_artifacts(built, "onnxruntime", "fp32"), [LoraSpec(lora, 1.0)])
    assert {"unet", "caching_unet_d1", "shallow_unet_d1"} <= set(changes)
    # the shallow graph holds the outer layers' weights only: the changes that have a weight there to land on
    assert 0 < len(changes["shallow_unet_d1"]) < len(changes["caching_unet_d1"]) == len(changes["unet"])
    plain = _generate(built, tmp_path / "plain.png")
    said = CliRunner().invoke(app, ["generate", str(built), "-p", "a red bicycle", "--steps", "10", "-g", "6",
                                    "--height", "64", "--width", "64", "--lora", str(lora), "--out",
                                    str(tmp_path / "lora.png")])
    assert said.exit_code == 0, said.output
    assert not np.array_equal(plain, np.asarray(Image.open(tmp_path / "lora.png").convert("RGB")))


def test_an_acceleration_s_graphs_load_like_the_set_s_own_one_at_a_time_where_it_is_held_so(built: Path):
    """The deep-cache graphs load when first run, through the same loader as the set's components: in a set held one
    component at a time (SD3.5-medium's FP32 set), in the same pool, releasing the others, never beside them."""
    from diffship.runtime.lazy_runners import LazyRunner
    from diffship.runtime.pipeline import DeployedPipeline
    from diffship.store.manifest import open_artifacts

    artifacts = open_artifacts(built, "onnxruntime", "fp32")
    cached = Accelerations(deep_cache=DeepCache(interval=2, depth=1))
    whole, lazy = (DeployedPipeline.from_artifacts(artifacts, memory=memory) for memory in (None, 1))
    images = [p("a red bicycle", None, 64, 64, 6, 6.0, 0, accelerations=cached).images[0] for p in (whole, lazy)]
    assert np.array_equal(images[0], images[1])
    assert not isinstance(whole.runners["shallow_unet_d1"], LazyRunner)
    graphs = [lazy.runners[name] for name in ("caching_unet_d1", "shallow_unet_d1")]
    assert all(isinstance(g, LazyRunner) and g._pool is lazy.runners["unet"]._pool for g in graphs)
    assert len(graphs[0]._pool.loaded) == 1 and {"caching_unet_d1", "shallow_unet_d1"} <= set(lazy.load_seconds)


@pytest.fixture(scope="module")
def flux_built(tmp_path_factory: pytest.TempPathFactory, model_cache) -> Path:
    out = tmp_path_factory.mktemp("flux-accelerated") / "out"
    said = CliRunner().invoke(app, ["build", "--model", "tiny-flux", "--targets", "onnxruntime:fp32", "--accelerate",
                                    "deep-cache:interval=2,depth=1", "--out", str(out)])
    assert said.exit_code == 0, said.output
    return out


def test_block_caching_runs_flux_s_steps_in_diffusers_loop_on_the_two_graphs(flux_built: Path, tmp_path: Path):
    """The transformer families' block caching, end to end with the default recipe: both graphs built and checked,
    the accelerated row drawn in diffusers' loop with a measured loss (tiny-flux's one middle block: about 60 dB
    against the exact row's 84+, so a budget can fail it), and generate applying it unless told otherwise."""
    result = json.loads((flux_built / "report" / "report.json").read_text())["sets"]["onnxruntime-fp32"]
    assert result["parity"]["components"]["shallow_transformer_d1"]["passed"]
    rows = {r["accelerations"]: r for r in result["accelerations"]["rows"]}
    assert list(rows) == ["none", "deep-cache:interval=2,depth=1"]
    exact = rows["none"]["min_psnr_db"] or float("inf")
    cached = rows["deep-cache:interval=2,depth=1"]
    assert cached["approximate"] and cached["min_psnr_db"] < exact - 10, (exact, cached["min_psnr_db"])
    assert cached["image_time"]["runs"] > 0
    # optimum-onnx loads the set with its two extra graphs as built and draws the plain loop (where it is installed)
    assert all(row["status"] in ("pass", "skipped") for row in result["clients"]["rows"]), result["clients"]
    recommended = _manifest(flux_built)["recommended"]["label"]
    default = _generate(flux_built, tmp_path / "default.png")
    assert np.array_equal(default, _generate(flux_built, tmp_path / "same.png", recommended))
    cached_image = _generate(flux_built, tmp_path / "cached.png", "deep-cache:interval=2,depth=1")
    assert not np.array_equal(cached_image, _generate(flux_built, tmp_path / "none.png", "none"))


def test_accelerations_a_build_cannot_run_are_refused(built: Path, tmp_path: Path, model_cache):
    said = CliRunner().invoke(app, ["generate", str(built), "-p", "x", "--accelerate", "deep-cache:depth=2",
                                    "--out", str(tmp_path / "o.png")])
    assert said.exit_code == 2 and "no deep-cache graphs at depth 2" in said.output, said.output
    said = CliRunner().invoke(app, ["build", "--model", "tiny-sd", "--accelerate", "deep-cache:depth=9",
                                    "--out", str(tmp_path / "b")])
    assert said.exit_code == 2 and "depth 9 must be 1 to 5" in said.output, said.output
    said = CliRunner().invoke(app, ["build", "--model", "tiny-sd3", "--accelerate", "deep-cache", "--out",
                                    str(tmp_path / "c")])
    assert said.exit_code == 2 and "needs at least three transformer blocks" in said.output, said.output
    said = CliRunner().invoke(app, ["build", "--model", "tiny-flux", "--accelerate", "guidance:until=0.5", "--out",
                                    str(tmp_path / "f")])
    assert said.exit_code == 2 and "guidance runs only in diffship's own denoising loop" in said.output, said.output
    said = CliRunner().invoke(app, ["build", "--model", "tiny-sd", "--accelerate",
                                    f"vae-decoder:path={builtin_folder('tiny-sd') / 'unet'}", "--out", str(tmp_path / "d")])
    assert said.exit_code == 2 and "holds a 'UNet2DConditionModel'" in said.output, said.output
    fixed = tmp_path / "fixed.toml"
    fixed.write_text('[shapes]\nbatch = [1, 1]\nheight = [64, 64]\nwidth = [64, 64]\n[accelerations]\nguidance = {}\n')
    said = CliRunner().invoke(app, ["build", str(fixed), "--model", "tiny-sd", "--out", str(tmp_path / "e")])
    assert said.exit_code == 2 and "[shapes] pins its batch to both halves" in said.output, said.output
    assert not any((tmp_path / name).exists() for name in "bcdef")
