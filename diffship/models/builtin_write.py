"""Writing a built-in model as a diffusers pipeline folder: seeded random weights in diffusers' and transformers'
real classes (or the committed trained ones), one component at a time to keep memory low."""

from __future__ import annotations

import functools
import gc
import hashlib
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from diffship.errors import DiffshipError
from diffship.models.builtin_configs import BuiltinModel
from diffship.models.builtin_stream import save_streamed
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
        if config.pop("kind", "clip") == "t5":
            tokenizer = build_t5_tokenizer(config.pop("max_length"))
            # a full-size T5 keeps T5-XXL's 32128-row embedding; the offline vocabulary uses its first rows
            t5 = T5Config(**{"vocab_size": len(tokenizer), "pad_token_id": 0, "eos_token_id": 1,
                             "decoder_start_token_id": 0, **config})
            cls, make = T5EncoderModel, functools.partial(T5EncoderModel, t5)
            save_t5_tokenizer(tokenizer, folder / f"tokenizer{suffix}")
        else:
            cls = CLIPTextModelWithProjection if config.pop("with_projection", False) else CLIPTextModel
            make = functools.partial(cls, CLIPTextConfig(pad_token_id=1, **config))
            save_clip_tokenizer(build_clip_tokenizer(pad_token=pad), folder / f"tokenizer{suffix}")
        _save(model, make, folder / f"text_encoder{suffix}", model.seed * 100 + i, f"text_encoder{suffix}")
        # model_index.json lists each encoder before its tokenizer, as the UNet built-ins always have
        index[f"text_encoder{suffix}"] = ["transformers", cls.__name__]
        index[f"tokenizer{suffix}"] = ["transformers", "T5TokenizerFast" if cls is T5EncoderModel
                                       else "CLIPTokenizer"]
    _save(model, functools.partial(getattr(diffusers, model.denoiser_class), **model.denoiser),
          folder / denoiser_folder, model.seed * 100 + 10, denoiser_folder)
    if model.native_latent_side is not None:
        path = folder / denoiser_folder / "config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps({**config, "sample_size": model.native_latent_side}, indent=2) + "\n",
                        encoding="utf-8")
    _save(model, functools.partial(AutoencoderKL, **model.vae, **_trained_config(model, "vae")), folder / "vae",
          model.seed * 100 + 20, "vae")

    scheduler = getattr(diffusers, model.scheduler_class).from_config(model.scheduler)
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (folder / "diffship_builtin.json").write_text(
        json.dumps({"name": model.name, "revision": BUILTIN_REVISION, "seed": model.seed,
                    **({"quality": "digits", "weights": "trained (scripts/train_digits_sd.py)"} if model.weights else {}),
                    "transformers": transformers.__version__, "diffusers": diffusers.__version__}, indent=2) + "\n",
        encoding="utf-8",
    )


def _save(model: BuiltinModel, make: Callable[[], torch.nn.Module], path: Path, seed: int, component: str) -> None:
    """Build one component with `make` and write it to `path`: whole (seeded, or the committed trained weights), or
    for a model stored in `model.dtype` layer by layer, never whole in memory (builtin_stream.py)."""
    if model.dtype is None:
        torch.manual_seed(seed)
        module = make()
        _load_trained(model, component, module)
        module.save_pretrained(path, safe_serialization=True)
        del module
        gc.collect()
        return
    from accelerate import init_empty_weights  # start-up time: accelerate

    with init_empty_weights(include_buffers=False):
        module = make()
    path.mkdir(parents=True)
    if isinstance(module, diffusers.ModelMixin):
        module.save_config(path)
        weights_name = "diffusion_pytorch_model.safetensors"
    else:
        module.config.save_pretrained(path)
        weights_name = "model.safetensors"
    save_streamed(module, path, weights_name, seed, getattr(torch, model.dtype))


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
