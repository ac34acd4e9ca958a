"""Every target's options are one pydantic model on `targets/options.TargetOptions`: unknown keys and bad values are
sentences naming the choices, and the VAE's FP16 policy has one name (`vae_precision`), its old one (`fp16_vae`)
still read with a deprecation line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from diffship.errors import DiffshipDeprecation, DiffshipError
from diffship.targets import TARGETS, get_target
from diffship.targets.options import TargetOptions, VaeOptions
from diffship.targets.pytorch_options import TorchOptions

# the targets that convert components to FP16, and so decide the VAE's precision there
CONVERTS_TO_FP16 = {"onnxruntime", "torch", "coreml", "tensorrt", "web"}


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_target_parses_its_options_into_one_model(name: str):
    target = get_target(name, installed=False)
    options = target.parse_options({})
    assert isinstance(options, TargetOptions)
    assert repr(options).startswith(f"{type(options).__name__}(")  # the repr cache keys are made of
    with pytest.raises(DiffshipError, match=rf"Unknown {options.title} option\(s\) bogus; known: "):
        target.parse_options({"bogus": 1})
    assert ("vae_precision" in type(options).model_fields) == (name in CONVERTS_TO_FP16)
    assert isinstance(options, VaeOptions) == (name in CONVERTS_TO_FP16)


@pytest.mark.parametrize("name", sorted(CONVERTS_TO_FP16))
def test_the_vae_precision_has_one_name_and_the_old_one_still_reads(name: str):
    target = get_target(name, installed=False)
    with pytest.warns(DiffshipDeprecation, match="fp16_vae is now called vae_precision"):
        old = target.parse_options({"fp16_vae": "fp32"})
    assert old == target.parse_options({"vae_precision": "fp32"}) != target.parse_options({})
    with pytest.raises(DiffshipError, match="give both vae_precision and fp16_vae"):
        target.parse_options({"fp16_vae": "fp32", "vae_precision": "fp16"})
    with pytest.raises(DiffshipError, match="vae_precision 'bf16'; choose auto, fp16 or fp32"):
        target.parse_options({"vae_precision": "bf16"})


@pytest.mark.parametrize(("options", "message"), [
    ({"freezing": "sometimes"}, "PyTorch freezing must be true, false or 'auto', not 'sometimes'"),
    ({"channels_last": "yes"}, "PyTorch channels_last must be true or false, not 'yes'"),  # strict: no "yes" -> True
    ({"attention_slice": True}, "attention_slice must be 'auto', 'max' or a positive number of heads, not True"),
    ({"compile_components": "unet"}, "compile_components: input should be a valid tuple"),
])
def test_a_bad_value_is_one_sentence_naming_what_the_option_takes(options: dict, message: str):
    with pytest.raises(DiffshipError) as caught:
        TorchOptions.parse(options)
    assert message in str(caught.value)


def test_lists_read_as_tuples_and_the_options_are_frozen():
    options = TorchOptions.parse({"compile_components": ["denoiser"]})
    assert options.compile_components == ("denoiser",)
    with pytest.raises(Exception, match="frozen"):
        options.compile_mode = "max-autotune"  # type: ignore[misc]


def test_a_deprecated_option_is_one_line_on_the_command_line(tmp_path: Path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("model = '/nonexistent/model'\n[[targets]]\nname = 'onnxruntime'\nprecisions = ['fp32']\n"
                      "options = { fp16_vae = 'fp32' }\n")
    result = subprocess.run([sys.executable, "-m", "diffship.cli", "build", str(recipe), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2  # the model is what is wrong; the old name is only said
    lines = [line for line in result.stderr.splitlines() if "fp16_vae" in line]
    assert lines == ["deprecated: ONNX Runtime option fp16_vae is now called vae_precision; the old name will stop "
                     "working in a later release."]
