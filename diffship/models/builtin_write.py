"""Writing a built-in model as a diffusers pipeline folder: seeded random weights in diffusers' and transformers'
real classes (or the committed trained ones), one component at a time to keep memory low."""

from __future__ import annotations

import functools
import gc
import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from diffship.errors import DiffshipError
from diffship.models.builtin_configs import BuiltinModel
from diffship.models.families import family_named
from diffship.models.loading import quiet_libraries
from diffship.models.t5_tokenizer import build_t5_tokenizer, save_t5_tokenizer
from diffship.models.tokenizer import build_clip_tokenizer, save_clip_tokenizer

# Bump when a built-in's definition changes, so cached copies are rebuilt instead of reused.
BUILTIN_REVISION = 1


def write_builtin(model: BuiltinModel, folder: Path) -> None:
    """Write `model` as a diffusers pipeline folder, one component at a time to keep memory low."""
    denoiser_folder = family_named(model.family).denoiser.component
    index: dict[str, Any] = {
        "_class_name": model.pipeline_class,
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", model.scheduler_class],
        denoiser_folder: ["diffusers", model.denoiser_class],
        "vae": ["diffusers", "AutoencoderKL"],
        **model.extra_index,
    }
    quiet_libraries()  # a pipeline class's import warns about torchvision
    if "safety_checker" in inspect.signature(getattr(diffusers, model.pipeline_class).__init__).parameters:
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    else:  # SDXL's and the transformers' pipelines: an IP-Adapter image encoder instead
        index |= {"image_encoder": [None, None], "feature_extractor": [None, None]}

    folders = model.text_encoder_folders[:len(model.text_encoders)]
    for i, (te_config, pad, te_folder) in enumerate(zip(model.text_encoders, model.pad_tokens, folders, strict=True)):
        suffix = te_folder.removeprefix("text_encoder")
        config = dict(te_config)
        torch.manual_seed(model.seed * 100 + i)
        if config.pop("kind", "clip") == "t5":
            tokenizer = build_t5_tokenizer(config.pop("max_length"))
            encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1,
                                              decoder_start_token_id=0, **config))
            save_t5_tokenizer(tokenizer, folder / f"tokenizer{suffix}")
        else:
            cls = CLIPTextModelWithProjection if config.pop("with_projection", False) else CLIPTextModel
            encoder = cls(CLIPTextConfig(pad_token_id=1, **config))
            save_clip_tokenizer(build_clip_tokenizer(pad_token=pad), folder / f"tokenizer{suffix}")
        _load_trained(model, f"text_encoder{suffix}", encoder)
        encoder.save_pretrained(folder / f"text_encoder{suffix}", safe_serialization=True)
        # model_index.json lists each encoder before its tokenizer, as the UNet built-ins always have
        index[f"text_encoder{suffix}"] = ["transformers", type(encoder).__name__]
        index[f"tokenizer{suffix}"] = ["transformers", "T5TokenizerFast" if isinstance(encoder, T5EncoderModel)
                                       else "CLIPTokenizer"]
        del encoder
    torch.manual_seed(model.seed * 100 + 10)
    denoiser = getattr(diffusers, model.denoiser_class)(**model.denoiser)
    _load_trained(model, denoiser_folder, denoiser)
    denoiser.save_pretrained(folder / denoiser_folder, safe_serialization=True)
    del denoiser
    if model.native_latent_side is not None:
        path = folder / denoiser_folder / "config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps({**config, "sample_size": model.native_latent_side}, indent=2) + "\n",
                        encoding="utf-8")
    gc.collect()
    torch.manual_seed(model.seed * 100 + 20)
    vae = AutoencoderKL(**model.vae, **_trained_config(model, "vae"))
    _load_trained(model, "vae", vae)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    del vae

    scheduler = getattr(diffusers, model.scheduler_class).from_config(model.scheduler)
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (folder / "diffship_builtin.json").write_text(
        json.dumps({"name": model.name, "revision": BUILTIN_REVISION, "seed": model.seed,
                    **({"quality": "digits", "weights": "trained (scripts/train_digits_sd.py)"} if model.weights else {}),
                    "transformers": transformers.__version__, "diffusers": diffusers.__version__}, indent=2) + "\n",
        encoding="utf-8",
    )


def _weights_dir(model: BuiltinModel) -> Path | None:
    return Path(__file__).parent / model.weights if model.weights else None


def _trained_config(model: BuiltinModel, component: str) -> dict[str, Any]:
    """Config values the training decided (the VAE's latent scaling factor)."""
    folder = _weights_dir(model)
    path = folder / f"{component}_config.json" if folder else None
    return json.loads(path.read_text(encoding="utf-8")) if path and path.is_file() else {}


def _load_trained(model: BuiltinModel, component: str, module: torch.nn.Module) -> None:
    """Load the committed trained weights of `component` into `module`, every key accounted for."""
    folder = _weights_dir(model)
    if folder is None:
        return
    from safetensors.torch import load_file  # start-up time: safetensors

    path = folder / f"{component}.safetensors"
    if not path.is_file():
        raise DiffshipError(f"Built-in model {model.name} is missing its trained weights {path}; "
                            "reinstall diffship or run scripts/train_digits_sd.py.")
    state = {k: v.to(torch.float32) for k, v in load_file(str(path)).items()}
    module.load_state_dict(state, strict=True)


def weights_tag(model: BuiltinModel) -> str:
    """A short fingerprint of committed trained weights, so retrained weights never reuse a stale cached folder."""
    folder = _weights_dir(model)
    return f"-{_folder_digest(folder)}" if folder else ""


@functools.cache
def _folder_digest(folder: Path) -> str:
    # Read once per process: `builtin_folder` runs on every resolve of the model.
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:8]
