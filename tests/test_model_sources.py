"""Resolving and loading models, and every kind of bad model input the issue lists."""

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffship.errors import DiffshipError
from diffship.models.families import detect_family
from diffship.models.loading import load_component
from diffship.models.source import resolve


def test_local_folder_resolves_to_itself(model_copy):
    folder = model_copy("tiny-sd")
    source = resolve(str(folder))
    assert source.kind == "local" and source.folder == folder.resolve()


def test_unknown_model_name_is_refused_with_the_builtins_listed():
    with pytest.raises(DiffshipError, match="Unknown model 'no-such-model'.*tiny-sd"):
        resolve("no-such-model")


def test_hub_id_offline_fails_at_once_naming_the_local_folder_alternative(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache
    start = time.monotonic()
    with pytest.raises(DiffshipError, match="hub cannot be reached.*--model DIR"):
        resolve("stabilityai/stable-diffusion-2-1")
    assert time.monotonic() - start < 5


def test_a_pickle_checkpoint_is_refused_without_allow_pickle_and_junk_is_named(tmp_path: Path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not a pipeline")
    with pytest.raises(DiffshipError, match=r"pickle checkpoint \(.ckpt\), which can run code.*--allow-pickle"):
        resolve(str(ckpt))
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"not a pipeline")
    with pytest.raises(DiffshipError, match="not a readable .safetensors file"):
        resolve(str(junk))
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(DiffshipError, match="not a checkpoint diffship reads"):
        resolve(str(notes))


def test_folder_that_is_not_a_diffusers_pipeline_is_refused(tmp_path: Path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(DiffshipError, match="no model_index.json"):
        detect_family(tmp_path)


def test_folder_missing_a_component_is_refused(model_copy):
    folder = model_copy("tiny-sd")
    shutil.rmtree(folder / "vae")
    with pytest.raises(DiffshipError, match="missing the `vae` component"):
        detect_family(folder)


@pytest.mark.parametrize(("declared", "says"), [
    ("PixArtSigmaPipeline", "holds a `PixArtSigmaPipeline`"),
    # a family diffship knows, whose denoiser the folder lacks: said with the family's name
    ("FluxPipeline", "Flux.1 pipeline folder but is missing the `transformer` component"),
])
def test_unsupported_pipeline_class_is_refused(model_copy, declared: str, says: str):
    folder = model_copy("tiny-sd")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": declared}))
    with pytest.raises(DiffshipError, match=re.escape(says)):
        detect_family(folder)


def _rename_a_key(path: Path) -> None:
    weights = load_file(path)
    key = sorted(weights)[3]
    weights[f"renamed.{key}"] = weights.pop(key)
    save_file(weights, path, metadata={"format": "pt"})


@pytest.mark.parametrize(("component", "weights"), [
    ("text_encoder", "model.safetensors"),
    ("unet", "diffusion_pytorch_model.safetensors"),
])
def test_weights_that_do_not_match_the_architecture_are_refused(model_copy, component: str, weights: str):
    folder = model_copy("tiny-sd")
    _rename_a_key(folder / component / weights)
    with pytest.raises(DiffshipError, match="do not match the architecture.*1 missing keys.*1 unexpected keys"):
        load_component(folder, component)


def test_text_encoder_saved_without_its_prefix_by_another_release_is_caught_or_loaded_exactly(model_copy):
    # transformers 5 saves CLIPTextModel without `text_model.`; 4.x saved it with. Whichever form
    # a checkpoint uses, the load is either exact or refused, never silently random.
    folder = model_copy("tiny-sd")
    path = folder / "text_encoder" / "model.safetensors"
    weights = load_file(path)
    reference = load_component(folder, "text_encoder").state_dict()
    prefixed = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in weights.items()}
    save_file(prefixed, path, metadata={"format": "pt"})
    try:
        loaded = load_component(folder, "text_encoder").state_dict()
    except DiffshipError:
        return
    for key, value in reference.items():
        assert torch.equal(loaded[key], value), key


def test_pickle_weights_are_refused_unless_allowed(model_copy):
    folder = model_copy("tiny-sd")
    st = folder / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(st), folder / "vae" / "diffusion_pytorch_model.bin")
    st.unlink()
    with pytest.raises(DiffshipError, match="pickle files.*--allow-pickle"):
        load_component(folder, "vae")
    vae = load_component(folder, "vae", allow_pickle=True)
    assert sum(p.numel() for p in vae.parameters()) > 0


def test_component_without_weights_is_refused(model_copy):
    folder = model_copy("tiny-sd")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(DiffshipError, match="holds no weights"):
        load_component(folder, "unet")
