"""fp16 weight variants (`*.fp16.safetensors`): loaded when asked for, or when they are all a folder has, upcast to
FP32 at load, recorded in the manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diffship.cli.main import app
from diffship.errors import DiffshipError
from diffship.models.builtin import builtin_folder
from diffship.models.loading import load_component
from diffship.models.source import resolve
from diffship.stages.provenance import weights_of

WEIGHTS = ("unet", "vae", "text_encoder")


def _variant_folder(tmp_path: Path, keep_default: bool) -> Path:
    """tiny-sd with every module also (or only) saved as diffusers' fp16 variant."""
    source = builtin_folder("tiny-sd")
    folder = tmp_path / ("both" if keep_default else "fp16-only")
    shutil.copytree(source, folder)
    for component in WEIGHTS:
        module = load_component(source, component).to(torch.float16)
        if not keep_default:
            for weights in (folder / component).glob("*.safetensors"):
                weights.unlink()
        module.save_pretrained(folder / component, variant="fp16", safe_serialization=True)
    return folder


def _unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_component(folder, "unet").state_dict()


def test_a_folder_of_only_fp16_weights_loads_them_upcast_and_says_so(tmp_path: Path, model_cache: Path):
    folder = _variant_folder(tmp_path, keep_default=False)
    said: list[str] = []
    source = resolve(str(folder), say=said.append)
    assert source.variant == "fp16" and any("fp16 variant" in line for line in said)
    original = _unet_weights(builtin_folder("tiny-sd"))
    loaded = _unet_weights(source.folder)
    assert all(loaded[k].dtype == torch.float32 for k in loaded)
    assert all(torch.equal(loaded[k], original[k].half().float()) for k in original)  # the fp16 values, upcast
    assert not all(torch.equal(loaded[k], original[k]) for k in original)  # and not the FP32 ones
    assert weights_of(source)["weights"] == "fp16 variant files, upcast to fp32 at load"
    # No weights were copied: the variant folder links the same files.
    unet = next((source.folder / "unet").glob("*.safetensors"))
    assert unet.name == "diffusion_pytorch_model.safetensors" and unet.stat().st_nlink >= 2


def test_with_both_the_default_weights_load_unless_the_variant_is_asked_for(tmp_path: Path, model_cache: Path):
    folder = _variant_folder(tmp_path, keep_default=True)
    assert resolve(str(folder)).variant is None
    original = _unet_weights(builtin_folder("tiny-sd"))
    default = _unet_weights(folder)
    assert all(torch.equal(default[k], original[k]) for k in original)
    asked = resolve(str(folder), variant="fp16")
    assert asked.variant == "fp16"
    fp16 = _unet_weights(asked.folder)
    assert all(torch.equal(fp16[k], original[k].half().float()) for k in original)
    assert not all(torch.equal(fp16[k], original[k]) for k in original)  # the variant's values, not the default's


def test_a_variant_the_folder_lacks_exits_2_naming_the_components(tmp_path: Path, model_cache: Path):
    folder = _variant_folder(tmp_path, keep_default=True)
    with pytest.raises(DiffshipError, match=r"--variant bf16: text_encoder, unet, vae in .* has no \*\.bf16"):
        resolve(str(folder), variant="bf16")
    result = CliRunner().invoke(app, ["models", str(folder), "--variant", "bf16"])
    assert result.exit_code == 2 and "variants there: fp16" in result.output


def test_a_folder_of_fp16_variants_builds_and_validates_end_to_end(tmp_path: Path, fast_recipe: Path):
    """The upcast weights are the baseline and the exports' source; the manifest says how they were read."""
    folder = _variant_folder(tmp_path, keep_default=False)
    result = CliRunner().invoke(app, ["build", str(fast_recipe), "--model", str(folder), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["passed"] and manifest["source"]["weights"] == "fp16 variant files, upcast to fp32 at load"
    r = json.loads((tmp_path / "out" / "report" / "report.json").read_text())["sets"]["onnxruntime-fp32"]
    assert r["e2e"]["passed"] and r["latency"]["pipeline"]["target"]["total"]["p50_s"] > 0
