"""Built-in models: real diffusers architectures with seeded random weights, built offline on demand.

`tiny-*` models are a few MB and build in about a second (tests, demo). `*-arch` models have the
exact shapes of SD 1.5 and SDXL base (benchmarks: export time, memory, file sizes); they take
minutes and GBs to build, so every built-in is written once as a normal diffusers folder in the
cache and loaded from there like any user model.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffship.errors import DiffshipError
from diffship.models.builtin_configs import (
    CLIP_IDS,
    CLIP_L,
    OPENCLIP_BIGG,
    SD_SCHEDULER,
    SD_VAE,
    TINY_SD_UNET,
    TINY_SDXL_UNET,
    TINY_VAE,
)
from diffship.models.digits import DIGITS_TEXT_ENCODER, DIGITS_UNET, DIGITS_VAE, TRAIN_SCHEDULER
from diffship.models.tokenizer import build_clip_tokenizer, save_clip_tokenizer
from diffship.store import cache
from diffship.store.artifacts import staged_dir

# Bump when a built-in's definition changes, so cached copies are rebuilt instead of reused.
BUILTIN_REVISION = 1


@dataclass(frozen=True)
class BuiltinModel:
    """A built-in model: its diffusers pipeline class, component configs, scheduler and seed."""

    name: str
    description: str
    family: str  # a name in diffship.models.families.FAMILIES
    pipeline_class: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]  # CLIPTextConfig kwargs; the SDXL second one has a projection
    pad_tokens: tuple[str, ...]
    scheduler_class: str
    scheduler: dict[str, Any]
    seed: int = 0
    approx_size: str = ""
    extra_index: dict[str, Any] = field(default_factory=dict)
    # Package folder with trained `<component>.safetensors` (FP16, loaded as FP32) instead of seeded random weights.
    weights: str | None = None
    # The pipeline folder of each text encoder (and its tokenizer); an SDXL refiner has only the second.
    text_encoder_folders: tuple[str, ...] = ("text_encoder", "text_encoder_2")


BUILTINS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            name="digits-sd",
            description="SD 1.x architecture trained on scikit-learn's handwritten digits: real, recognisable images",
            family="sd1",
            pipeline_class="StableDiffusionPipeline",
            unet=DIGITS_UNET,
            vae=DIGITS_VAE,
            text_encoders=(DIGITS_TEXT_ENCODER,),
            pad_tokens=("<|endoftext|>",),
            scheduler_class="DDIMScheduler",
            scheduler={**SD_SCHEDULER, **TRAIN_SCHEDULER},
            seed=0,
            approx_size="7 MB",
            weights="digits_sd",
        ),
        BuiltinModel(
            name="tiny-sd",
            description="SD 1.x architecture (CLIP ViT-L style text encoder, epsilon), tiny random weights",
            family="sd1",
            pipeline_class="StableDiffusionPipeline",
            unet=TINY_SD_UNET,
            vae=TINY_VAE,
            text_encoders=({**CLIP_IDS, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "hidden_act": "quick_gelu", "projection_dim": 32},),
            pad_tokens=("<|endoftext|>",),
            scheduler_class="PNDMScheduler",
            scheduler={**SD_SCHEDULER, "skip_prk_steps": True},
            seed=1,
            approx_size="18 MB",
        ),
        BuiltinModel(
            name="tiny-sd2",
            description="SD 2.x architecture (OpenCLIP-style text encoder, linear projections, v-prediction), tiny",
            family="sd2",
            pipeline_class="StableDiffusionPipeline",
            # SD 2.x differs from 1.x by per-level head counts and linear projections in the transformers
            unet={**TINY_SD_UNET, "attention_head_dim": [2, 4, 4], "use_linear_projection": True},
            vae=TINY_VAE,
            text_encoders=({**CLIP_IDS, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "hidden_act": "gelu", "projection_dim": 32},),
            pad_tokens=("!",),
            scheduler_class="DDIMScheduler",
            scheduler={**SD_SCHEDULER, "prediction_type": "v_prediction"},
            seed=2,
            approx_size="18 MB",
        ),
        BuiltinModel(
            name="tiny-sdxl",
            description="SDXL architecture (two text encoders, text_embeds + time_ids), tiny random weights",
            family="sdxl",
            pipeline_class="StableDiffusionXLPipeline",
            unet=TINY_SDXL_UNET,
            vae={**TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True},
            text_encoders=(
                {**CLIP_IDS, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "hidden_act": "quick_gelu", "projection_dim": 32},
                {**CLIP_IDS, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                 "num_attention_heads": 4, "hidden_act": "gelu", "projection_dim": 32, "with_projection": True},
            ),
            pad_tokens=("<|endoftext|>", "!"),
            scheduler_class="EulerDiscreteScheduler",
            scheduler={**SD_SCHEDULER, "interpolation_type": "linear", "timestep_spacing": "leading"},
            seed=3,
            approx_size="31 MB",
            extra_index={"force_zeros_for_empty_prompt": True},
        ),
        BuiltinModel(
            name="tiny-sdxl-refiner",
            description="SDXL refiner architecture (second text encoder only, aesthetic-score time ids), tiny random "
                        "weights",
            family="sdxl-refiner",
            pipeline_class="StableDiffusionXLImg2ImgPipeline",
            unet={
                **TINY_SDXL_UNET,
                "cross_attention_dim": 32,  # the second encoder's width alone
                # 5 time ids (sizes, crop, aesthetic score) x addition_time_embed_dim + the projection (32)
                "projection_class_embeddings_input_dim": 5 * 8 + 32,
            },
            vae={**TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True},
            text_encoders=(
                {**CLIP_IDS, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                 "num_attention_heads": 4, "hidden_act": "gelu", "projection_dim": 32, "with_projection": True},
            ),
            pad_tokens=("!",),
            text_encoder_folders=("text_encoder_2",),
            scheduler_class="EulerDiscreteScheduler",
            scheduler={**SD_SCHEDULER, "interpolation_type": "linear", "timestep_spacing": "leading"},
            seed=11,
            approx_size="20 MB",
            extra_index={"text_encoder": [None, None], "tokenizer": [None, None], "requires_aesthetics_score": True,
                         "force_zeros_for_empty_prompt": False},
        ),
        BuiltinModel(
            name="tiny-sd-inpaint",
            description="SD 1.x inpainting architecture (a 9-channel UNet: latents, mask, masked-image latents), "
                        "tiny random weights",
            family="sd1",
            pipeline_class="StableDiffusionInpaintPipeline",
            unet={**TINY_SD_UNET, "in_channels": 9},
            vae=TINY_VAE,
            text_encoders=({**CLIP_IDS, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "hidden_act": "quick_gelu", "projection_dim": 32},),
            pad_tokens=("<|endoftext|>",),
            scheduler_class="PNDMScheduler",
            scheduler={**SD_SCHEDULER, "skip_prk_steps": True},
            seed=12,
            approx_size="18 MB",
        ),
        BuiltinModel(
            name="sd15-arch",
            description="Stable Diffusion 1.5 shapes exactly (860M UNet), random weights; for benchmarks",
            family="sd1",
            pipeline_class="StableDiffusionPipeline",
            unet={
                "sample_size": 64,
                "in_channels": 4,
                "out_channels": 4,
                "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                "block_out_channels": [320, 640, 1280, 1280],
                "layers_per_block": 2,
                "attention_head_dim": 8,
                "cross_attention_dim": 768,
                "norm_num_groups": 32,
            },
            vae=SD_VAE,
            text_encoders=(CLIP_L,),
            pad_tokens=("<|endoftext|>",),
            scheduler_class="PNDMScheduler",
            scheduler={**SD_SCHEDULER, "skip_prk_steps": True},
            seed=15,
            approx_size="4.3 GB",
        ),
        BuiltinModel(
            name="sdxl-arch",
            description="SDXL base 1.0 shapes exactly (2.6B UNet, CLIP-L + OpenCLIP bigG), random weights; benchmarks",
            family="sdxl",
            pipeline_class="StableDiffusionXLPipeline",
            unet={
                "sample_size": 128,
                "in_channels": 4,
                "out_channels": 4,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "block_out_channels": [320, 640, 1280],
                "layers_per_block": 2,
                "transformer_layers_per_block": [1, 2, 10],
                "attention_head_dim": [5, 10, 20],
                "use_linear_projection": True,
                "cross_attention_dim": 2048,
                "norm_num_groups": 32,
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2816,
            },
            vae={**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
            text_encoders=(CLIP_L, OPENCLIP_BIGG),
            pad_tokens=("<|endoftext|>", "!"),
            scheduler_class="EulerDiscreteScheduler",
            scheduler={**SD_SCHEDULER, "interpolation_type": "linear", "timestep_spacing": "leading"},
            seed=10,
            approx_size="14 GB",
            extra_index={"force_zeros_for_empty_prompt": True},
        ),
    ]
}

DEFAULT_MODEL = "digits-sd"


def builtin_folder(name: str) -> Path:
    """The cached diffusers folder of a built-in model, built first if absent (once, when several builds ask at once;
    in a private scratch folder when the cache cannot be written)."""
    model = BUILTINS[name]
    folder_name = f"{name}-r{BUILTIN_REVISION}{_weights_tag(model)}"
    folder = cache.cache_root() / "models" / folder_name
    if (folder / "model_index.json").is_file():
        return folder
    if cache.unwritable_reason() is not None:
        folder = cache.scratch_root() / "models" / folder_name
        if not (folder / "model_index.json").is_file():
            with staged_dir(folder) as tmp:
                write_builtin(model, tmp)
        return folder
    with cache.locked(folder, lambda _: None, f"built-in model {name}"):
        if not (folder / "model_index.json").is_file():
            with staged_dir(folder, owned=True) as tmp:
                write_builtin(model, tmp)
    return folder


def write_builtin(model: BuiltinModel, folder: Path) -> None:
    """Write `model` as a diffusers pipeline folder, one component at a time to keep memory low."""
    index: dict[str, Any] = {
        "_class_name": model.pipeline_class,
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", model.scheduler_class],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        **model.extra_index,
    }
    if "XL" not in model.pipeline_class:
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    else:
        index |= {"image_encoder": [None, None], "feature_extractor": [None, None]}

    folders = model.text_encoder_folders[:len(model.text_encoders)]
    for i, (te_config, pad, te_folder) in enumerate(zip(model.text_encoders, model.pad_tokens, folders, strict=True)):
        suffix = te_folder.removeprefix("text_encoder")
        config = dict(te_config)
        with_projection = config.pop("with_projection", False)
        cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
        torch.manual_seed(model.seed * 100 + i)
        encoder = cls(CLIPTextConfig(pad_token_id=1, **config))
        _load_trained(model, f"text_encoder{suffix}", encoder)
        encoder.save_pretrained(folder / f"text_encoder{suffix}", safe_serialization=True)
        del encoder
        save_clip_tokenizer(build_clip_tokenizer(pad_token=pad), folder / f"tokenizer{suffix}")
        index[f"text_encoder{suffix}"] = ["transformers", cls.__name__]
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
    torch.manual_seed(model.seed * 100 + 10)
    unet = UNet2DConditionModel(**model.unet)
    _load_trained(model, "unet", unet)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    del unet
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


def _weights_tag(model: BuiltinModel) -> str:
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
