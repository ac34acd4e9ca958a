"""The build recipe: defaults, TOML, and every kind of bad recipe named precisely."""

from pathlib import Path

import pytest

from diffship.errors import DiffshipError
from diffship.recipe import DEFAULT_THRESHOLDS, load_recipe, parse_recipe, targets_from_cli


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_defaults_build_digits_sd_on_onnxruntime_fp32():
    recipe = parse_recipe({})
    assert recipe.model == "digits-sd"
    assert [(t.name, t.precisions) for t in recipe.targets] == [("onnxruntime", ["fp32"])]
    assert recipe.threshold("fp32") == DEFAULT_THRESHOLDS["fp32"]
    assert recipe.validation.prompts and recipe.calibration.prompts


def test_a_toml_recipe_is_read_and_overrides_apply_on_top(tmp_path: Path):
    path = write(tmp_path, """
model = "tiny-sdxl"
components = ["unet", "vae_decoder"]
[[targets]]
name = "onnxruntime"
precisions = ["fp32"]
options = { intra_op_threads = 1 }
[shapes]
batch = [1, 2]
height = [64, 256]
width = [64, 128]
[validation]
prompts = ["a cat"]
seeds = [1, 2]
steps = 3
[thresholds.fp32]
min_cosine = 0.999
max_rel_l2 = 0.01
min_psnr = 30
min_ssim = 0.9
[calibration]
samples = 4
""")
    recipe = load_recipe(path, {"model": "tiny-sd", "targets": None})
    assert recipe.model == "tiny-sd"  # the override wins; a None override leaves the file's value
    assert recipe.targets[0].options == {"intra_op_threads": 1}
    assert recipe.shapes.height == (64, 256)
    assert recipe.threshold("fp32").min_psnr == 30
    assert recipe.calibration.samples == 4


@pytest.mark.parametrize(("text", "expected"), [
    ("modle = 'tiny-sd'", "modle: unknown key"),
    ("[validation]\nstpes = 3", "validation.stpes: unknown key"),
    ("[validation]\nsteps = 'four'", "validation.steps"),
    ("[shapes]\nheight = [60, 128]", "not a multiple of 8"),
    ("[shapes]\nbatch = [4, 1]", "min > max"),
    ("[validation]\nprompts = []", "validation.prompts"),
    ("[validation]\nprompts = ['  ']", "must not be empty"),
    ("[validation]\nheight = 100", "validation.height"),
    ("[shapes]\nheight = [64, 128]\n[validation]\nheight = 256", "outside shapes.height"),
    ("targets = []", "targets"),
    ("[export]\nopset = 9", "export.opset"),
])
def test_bad_recipes_are_refused_with_the_key_and_the_reason(tmp_path: Path, text: str, expected: str):
    with pytest.raises(DiffshipError, match="Invalid recipe") as error:
        load_recipe(write(tmp_path, text))
    assert expected in str(error.value)


def test_a_recipe_that_is_not_toml_or_not_there_is_refused(tmp_path: Path):
    with pytest.raises(DiffshipError, match="not valid TOML"):
        load_recipe(write(tmp_path, "model = "))
    with pytest.raises(DiffshipError, match="does not exist"):
        load_recipe(tmp_path / "missing.toml")


def test_a_precision_without_a_threshold_is_refused_and_modes_fall_back_to_their_family():
    with pytest.raises(DiffshipError, match=r"\[thresholds.int2\]"):
        parse_recipe({}).threshold("int2")
    assert parse_recipe({}).threshold("int8-hybrid") == DEFAULT_THRESHOLDS["int8"]
    recipe = parse_recipe({"thresholds": {"int8": {"min_cosine": 0.9, "max_rel_l2": 0.3, "min_psnr": 15, "min_ssim": 0.5}}})
    assert recipe.threshold("int8-full").min_psnr == 15


def test_cli_targets_group_precisions_by_target():
    assert targets_from_cli(["onnxruntime:fp32+fp16", "openvino", "onnxruntime:int8"]) == [
        {"name": "onnxruntime", "precisions": ["fp32", "fp16", "int8"]}, {"name": "openvino"}]


def test_cli_targets_choose_what_to_build_and_keep_the_recipes_options_for_that_target(tmp_path: Path):
    path = write(tmp_path, "[[targets]]\nname = 'onnxruntime'\noptions = { cpu_mem_arena = false }\n"
                           "[[targets]]\nname = 'openvino'\nprecisions = ['bf16']\noptions = { matmuls = 'w8' }\n")
    recipe = load_recipe(path, {"targets": targets_from_cli(["onnxruntime:fp32+int8", "torch"])})
    assert [(t.name, t.precisions, t.options) for t in recipe.targets] == [
        ("onnxruntime", ["fp32", "int8"], {"cpu_mem_arena": False}), ("torch", recipe.targets[1].precisions, {})]


def test_the_documented_example_recipe_is_valid_and_matches_the_defaults():
    example = load_recipe(Path(__file__).parents[1] / "examples" / "recipe.toml")
    defaults = parse_recipe({})
    assert example.threshold("fp32") == defaults.threshold("fp32")
    assert example.validation.model_dump() == defaults.validation.model_dump()
    assert example.shapes.height == (32, 64)
