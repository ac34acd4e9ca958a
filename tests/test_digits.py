"""digits-sd: a trained Stable Diffusion shipped with the package, and a quality check that can fail a build."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffship.models.source import resolve
from diffship.recipe import parse_recipe
from diffship.stages.build import build
from diffship.validation.baseline import load_baseline
from diffship.validation.quality import digit_classifier, quality_task, score_digits

# The default recipe's validation steps (parity, images, prompt accuracy, latency) at test size.
QUICK = {"prompts": ["a handwritten digit seven"], "seeds": [0], "steps": 4, "quality": {"seeds": [0]},
         "latency": {"enabled": True, "warmup": 1, "runs": 2, "pipeline_runs": 1}}


def test_digits_sd_is_a_standard_sd_pipeline_with_its_trained_weights_committed(model_cache: Path):
    folder = resolve("digits-sd").folder
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert quality_task(folder) == "digits"
    package = Path(__file__).parents[1] / "diffship" / "models" / "digits_sd"
    assert sum(p.stat().st_size for p in package.glob("*.safetensors")) < 10 * 2**20  # a few MB in the package
    pipe = load_baseline(folder)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


def test_the_classifier_knows_digits_and_refuses_noise():
    assert digit_classifier().held_out_accuracy > 0.95
    noise = np.random.default_rng(0).integers(0, 256, (30, 32, 32, 3)).astype(np.uint8)
    assert score_digits(noise, [i % 10 for i in range(30)])["prompt_accuracy"] < 0.4


@pytest.mark.slow
def test_pytorch_digits_sd_draws_the_digit_its_prompt_names(model_cache: Path):
    from diffship.validation.suite import baseline_quality

    folder = resolve("digits-sd").folder
    recipe = parse_recipe({"model": "digits-sd", "validation": {"quality": {"seeds": [0, 1, 2], "steps": 20}}})
    from diffship.models.components import component_specs
    from diffship.stages.context import plan_shapes

    unet = next(s for s in component_specs(folder) if s.name == "unet")
    _, plan = plan_shapes(recipe, unet, folder)
    scores = baseline_quality(load_baseline(folder), plan, lambda _: None)
    assert scores["images"] == 30 and scores["prompt_accuracy"] >= 0.9, scores


def test_a_digits_build_reports_prompt_accuracy_for_every_set(tmp_path: Path, model_cache: Path):
    recipe = parse_recipe({"model": "digits-sd", "validation": QUICK,
                           "targets": [{"name": "onnxruntime", "precisions": ["fp32", "int8"]}],
                           "calibration": {"prompts": ["the number three", "a handwritten digit five"], "samples": 4,
                                           "steps": 4}})
    result = build(recipe, tmp_path / "out")
    for key in ("onnxruntime-fp32", "onnxruntime-int8"):
        q = result.report["sets"][key]["quality"]
        assert q["images"] == 10 and q["baseline_prompt_accuracy"] >= 0.8 and q["passed"], q
        assert result.report["sets"][key]["latency"]["pipeline"]["target"]["total"]["p50_s"] > 0
    assert "prompt accuracy (PyTorch)" in (tmp_path / "out" / "report" / "report.md").read_text()


def test_a_degraded_unet_fails_the_quality_check_and_the_build(model_copy, tmp_path: Path):
    folder = model_copy("digits-sd")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    generator = torch.Generator().manual_seed(0)
    noisy = {k: v + 0.5 * v.std() * torch.randn(v.shape, generator=generator) if v.ndim > 1 else v
             for k, v in state.items()}
    save_file(noisy, str(weights))
    recipe = parse_recipe({"model": str(folder), "validation": QUICK})
    result = build(recipe, tmp_path / "out")
    q = result.report["sets"]["onnxruntime-fp32"]["quality"]
    assert not q["passed"] and q["prompt_accuracy"] < q["min_prompt_accuracy"]
    assert result.report["sets"]["onnxruntime-fp32"]["parity"]["passed"]  # the export is faithful; the model is not
    assert result.manifest["passed"] is False


def test_a_built_in_model_without_its_trained_weights_is_refused_by_name(tmp_path: Path):
    from dataclasses import replace

    from diffship.errors import DiffshipError
    from diffship.models.builtin import BUILTINS, write_builtin

    (tmp_path / "weights").mkdir()
    model = replace(BUILTINS["digits-sd"], weights=str(tmp_path / "weights"))  # an empty weights folder
    with pytest.raises(DiffshipError, match="digits-sd is missing its trained weights .*text_encoder.safetensors"):
        write_builtin(model, tmp_path / "out")
