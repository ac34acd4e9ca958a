"""Families and roles as declarations: detection, the specs each family declares against what diffusers' own
pipeline feeds its UNet, and no module outside `models/families` naming a family."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import diffship
from diffship.errors import DiffshipError
from diffship.models.builtin import BUILTINS, builtin_folder
from diffship.models.components import component_specs
from diffship.models.families import FAMILIES, component_config, denoiser_of, detect_family
from diffship.models.loading import load_folder
from diffship.validation.baseline import load_baseline

TINY = ["tiny-sd", "tiny-sd2", "tiny-sdxl", "tiny-sdxl-refiner"]


def _fed_to_denoiser(pipe, denoiser, **call) -> dict[str, torch.Tensor]:
    """The tensors diffusers' pipeline passes its denoiser on the first step, read by the denoiser's declared
    `call_inputs` (what calibration and real-step capture record)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_module, args, kwargs):
        if not seen:
            inputs, residuals = denoiser.call_inputs(args, kwargs)
            assert not residuals
            seen.update({k: v for k, v in inputs.items() if k != "timestep"})

    handle = getattr(pipe, denoiser.component).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(**call, num_inference_steps=2, output_type="np")
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("name", TINY)
def test_the_specs_a_family_declares_are_what_its_diffusers_pipeline_feeds_its_denoiser(name: str):
    folder = builtin_folder(name)
    family = detect_family(folder)
    denoiser = next(s for s in component_specs(folder) if s.is_denoiser)
    assert denoiser.name == family.denoiser.component and denoiser.denoiser is family.denoiser
    pipe = load_baseline(folder, device="cpu", dtype=torch.float32)
    assert type(pipe).__name__ == family.pipelines[family.tasks[0]]
    call = {"prompt": "a red bicycle", "height": 64, "width": 64, "generator": torch.Generator().manual_seed(0)}
    if family.tasks[0] == "img2img":
        call |= {"image": np.full((1, 64, 64, 3), 0.5, dtype=np.float32), "strength": 0.9}
    fed = _fed_to_denoiser(pipe, family.denoiser, **call)
    declared = denoiser.sample_inputs(2, 64, 64)
    assert set(fed) == set(declared) - {"timestep"}
    for key, value in fed.items():
        assert tuple(value.shape) == declared[key].shape, key
    if "time_ids" in fed:  # the values too: sizes, crop and (refiner) the aesthetic scores diffusers defaults to
        expected = [family.time_id_values(64, 64, score) for score in ((2.5, 6.0) if family.time_ids == 5 else (6.0, 6.0))]
        assert fed["time_ids"].tolist() == expected


def test_the_refiner_is_its_own_family_with_only_the_second_encoder():
    folder = builtin_folder("tiny-sdxl-refiner")
    family = detect_family(folder)
    assert family.name == "sdxl-refiner" and family.text_encoders == ("text_encoder_2",)
    assert "text2img" not in family.tasks  # diffusers' refiner pipeline takes an image
    specs = {s.name: s for s in component_specs(folder)}
    assert list(specs) == ["text_encoder_2", "unet", "vae_encoder", "vae_decoder"]
    layers = component_config(folder, "text_encoder_2")["num_hidden_layers"]
    # optimum's order (GenAI reads hidden_states[-2] at position layers + 1), then diffship's name for that state
    assert [o.name for o in specs["text_encoder_2"].outputs] == [
        "text_embeds", "last_hidden_state", *(f"hidden_states.{i}" for i in range(layers + 1)),
        "penultimate_hidden_state"]
    assert specs["unet"].sample_inputs(1, 64, 64)["time_ids"].tolist() == [[64, 64, 0, 0, 6.0]]


def test_every_builtin_declares_a_known_family():
    assert {m.family for m in BUILTINS.values()} <= set(FAMILIES)


# A family named as a string literal: "sd1", 'sdxl', "sdxl-refiner"...
FAMILY_LITERAL = re.compile("[\"'](?:" + "|".join(re.escape(n) for n in FAMILIES) + ")[\"']")


def test_no_module_outside_the_families_names_a_family():
    """Runtime, baseline, capture, validation and targets ask the family or the role (the built-in models'
    declarations say which family each one is)."""
    root = Path(diffship.__file__).parent
    allowed = {root / "models" / "builtin.py"}
    named = [f"{path.relative_to(root)}:{i}" for path in root.rglob("*.py")
             if "families" not in path.parts and path not in allowed
             for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if FAMILY_LITERAL.search(line)]
    assert not named, named


def _code_names(tree: ast.AST) -> list[tuple[int, str]]:
    """Names, attributes, parameters, imports and string constants (docstrings aside) of a module, with their line."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.Name | ast.Attribute | ast.arg | ast.alias):
            name = {ast.Name: "id", ast.Attribute: "attr", ast.arg: "arg", ast.alias: "name"}[type(node)]
            found.append((getattr(node, "lineno", 0), getattr(node, name)))
    return found


# The UNet as a component (its folder, attribute or name), its config, its class, its variant taking ControlNet
# residuals; a path piece counts ("unet/config.json"); LoRA key prefixes ("lora_unet_", "unet.") are a file format's.
UNET_NAME = re.compile(r"^(unet|unet_config|controlled_unet|UNet2DConditionModel)$|(^|/)(controlled_)?unet/|/unet$")


def test_no_module_outside_the_families_names_the_unet():
    """The denoiser is a role the family declares (`models/families/unet.py`): runtime, capture, calibration,
    validation, report, compression and targets ask `family.denoiser` / `spec.denoiser`, so a family with a
    transformer for a denoiser is one new declaration. The built-in models' own declarations may name it."""
    root = Path(diffship.__file__).parent
    allowed = {root / "models" / "builtin.py", root / "models" / "builtin_configs.py"}
    named = [f"{path.relative_to(root)}:{line} {value!r}" for path in sorted(root.rglob("*.py"))
             if "families" not in path.parts and path not in allowed
             for line, value in _code_names(ast.parse(path.read_text(encoding="utf-8"))) if UNET_NAME.search(value)]
    assert not named, named


def test_the_unet_guard_catches_each_way_of_naming_it():
    code = ast.parse('"""The module\'s docstring may say unet/."""\nx = pipe.unet\n'
                     'def f(unet): return "unet/config.json", "controlled_unet"\n'
                     'from diffusers import UNet2DConditionModel\n')
    caught = sorted(value for _, value in _code_names(code) if UNET_NAME.search(value))
    assert caught == ["UNet2DConditionModel", "controlled_unet", "unet", "unet", "unet/config.json"]
    assert not [v for _, v in _code_names(ast.parse('p = ("lora_unet_", "unet.", "denoiser")')) if UNET_NAME.search(v)]


def test_a_pipeline_no_family_runs_and_a_config_naming_no_diffusers_model_are_refused(tmp_path: Path):
    class StableCascadePipeline:  # a diffusers pipeline class no family declares
        pass

    with pytest.raises(DiffshipError, match="knows no family that runs a StableCascadePipeline"):
        denoiser_of(StableCascadePipeline())
    folder = builtin_folder("tiny-sd")
    for name in ("PNDMScheduler", "os"):  # a diffusers class that is no model, and not a diffusers name at all
        bad = tmp_path / name / "unet"
        bad.mkdir(parents=True)
        config = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        (bad / "config.json").write_text(json.dumps({**config, "_class_name": name}), encoding="utf-8")
        with pytest.raises(DiffshipError, match=f"names '{name}', which is not a diffusers model class"):
            load_folder(bad, "unet")
