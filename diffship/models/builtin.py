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
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from diffship.errors import DiffshipError
from diffship.models.builtin_configs import (
    CLIP_IDS,
    CLIP_L,
    FLOW_MATCH,
    FLUX_FLOW_MATCH,
    OPENCLIP_BIGG,
    SD_SCHEDULER,
    SD_VAE,
    TINY_FLUX_TRANSFORMER,
    TINY_SD3_TRANSFORMER,
    TINY_SD_UNET,
    TINY_SDXL_UNET,
    TINY_T5,
    TINY_VAE,
    TINY_VAE_16,
)
from diffship.models.digits import DIGITS_TEXT_ENCODER, DIGITS_UNET, DIGITS_VAE, TRAIN_SCHEDULER
from diffship.models.families import family_named
from diffship.models.t5_tokenizer import build_t5_tokenizer, save_t5_tokenizer
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
    denoiser: dict[str, Any]  # the config of the family's denoiser (a UNet's, a transformer's)
    vae: dict[str, Any]
    # CLIPTextConfig kwargs (the SDXL second one has a projection), or T5Config kwargs under "kind": "t5"
    text_encoders: tuple[dict[str, Any], ...]
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
    denoiser_class: str = "UNet2DConditionModel"
    # The native image side in latent pixels, for a denoiser whose config cannot say it (Flux's has no sample_size;
    # FluxPipeline draws 1024 px by default, which a tiny model does not need): written into its config.json.
    native_latent_side: int | None = None


BUILTINS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            name="digits-sd",
            description="SD 1.x architecture trained on scikit-learn's handwritten digits: real, recognisable images",
            family="sd1",
            pipeline_class="StableDiffusionPipeline",
            denoiser=DIGITS_UNET,
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
            denoiser=TINY_SD_UNET,
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
            denoiser={**TINY_SD_UNET, "attention_head_dim": [2, 4, 4], "use_linear_projection": True},
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
            denoiser=TINY_SDXL_UNET,
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
            denoiser={
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
            denoiser={**TINY_SD_UNET, "in_channels": 9},
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
            name="tiny-sd3",
            description="SD3.5-medium architecture (MMDiT with dual attention and RMS qk-norm; CLIP-L, CLIP-G and T5; "
                        "flow matching; 16-channel VAE), tiny random weights",
            family="sd3",
            pipeline_class="StableDiffusion3Pipeline",
            denoiser=TINY_SD3_TRANSFORMER,
            denoiser_class="SD3Transformer2DModel",
            vae={**TINY_VAE_16, "shift_factor": 0.0609, "scaling_factor": 1.5035},
            text_encoders=(
                {**CLIP_IDS, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "hidden_act": "quick_gelu", "projection_dim": 32, "with_projection": True},
                {**CLIP_IDS, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
                 "num_attention_heads": 4, "hidden_act": "gelu", "projection_dim": 48, "with_projection": True},
                {**TINY_T5, "d_model": 96, "d_ff": 128, "max_length": 256},
            ),
            pad_tokens=("<|endoftext|>", "!", "<pad>"),
            text_encoder_folders=("text_encoder", "text_encoder_2", "text_encoder_3"),
            scheduler_class="FlowMatchEulerDiscreteScheduler",
            scheduler=FLOW_MATCH,
            seed=16,
            approx_size="28 MB",
        ),
        BuiltinModel(
            name="tiny-flux",
            description="Flux.1-dev architecture (double- and single-stream blocks, RoPE, embedded guidance; CLIP-L "
                        "pooled + T5; packed 16-channel latents), tiny random weights",
            family="flux",
            pipeline_class="FluxPipeline",
            denoiser=TINY_FLUX_TRANSFORMER,
            denoiser_class="FluxTransformer2DModel",
            native_latent_side=8,
            vae={**TINY_VAE_16, "shift_factor": 0.1159, "scaling_factor": 0.3611},
            text_encoders=(
                {**CLIP_IDS, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "hidden_act": "quick_gelu", "projection_dim": 32},
                {**TINY_T5, "d_model": 64, "d_ff": 96, "max_length": 512},
            ),
            pad_tokens=("<|endoftext|>", "<pad>"),
            scheduler_class="FlowMatchEulerDiscreteScheduler",
            scheduler=FLUX_FLOW_MATCH,
            seed=17,
            approx_size="13 MB",
        ),
        BuiltinModel(
            name="sd15-arch",
            description="Stable Diffusion 1.5 shapes exactly (860M UNet), random weights; for benchmarks",
            family="sd1",
            pipeline_class="StableDiffusionPipeline",
            denoiser={
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
            denoiser={
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
    denoiser_folder = family_named(model.family).denoiser.component
    index: dict[str, Any] = {
        "_class_name": model.pipeline_class,
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", model.scheduler_class],
        denoiser_folder: ["diffusers", model.denoiser_class],
        "vae": ["diffusers", "AutoencoderKL"],
        **model.extra_index,
    }
    if model.family in ("sd1", "sd2"):
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    else:
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
            index[f"tokenizer{suffix}"] = ["transformers", "T5TokenizerFast"]
        else:
            cls = CLIPTextModelWithProjection if config.pop("with_projection", False) else CLIPTextModel
            encoder = cls(CLIPTextConfig(pad_token_id=1, **config))
            save_clip_tokenizer(build_clip_tokenizer(pad_token=pad), folder / f"tokenizer{suffix}")
            index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
        _load_trained(model, f"text_encoder{suffix}", encoder)
        encoder.save_pretrained(folder / f"text_encoder{suffix}", safe_serialization=True)
        index[f"text_encoder{suffix}"] = ["transformers", type(encoder).__name__]
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
