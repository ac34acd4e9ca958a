"""Built-in models: real diffusers architectures with seeded random weights, built offline on demand.

`tiny-*` models are a few MB and build in about a second (tests, demo). `*-arch` models have the
exact shapes of SD 1.5 and SDXL base (benchmarks: export time, memory, file sizes); they take
minutes and GBs to build, so every built-in is written once as a normal diffusers folder in the
cache and loaded from there like any user model.
"""

from __future__ import annotations

from pathlib import Path

from diffship.models.builtin_configs import (
    CLIP_IDS,
    CLIP_L,
    FLOW_MATCH,
    FLUX_FLOW_MATCH,
    FLUX_SCHNELL_FLOW_MATCH,
    FLUX_SCHNELL_TRANSFORMER,
    OPENCLIP_BIGG,
    SD3_VAE,
    SD35M_TRANSFORMER,
    SD_SCHEDULER,
    SD_VAE,
    T5_XXL,
    TINY_FLUX_TRANSFORMER,
    TINY_SD3_TRANSFORMER,
    TINY_SD_UNET,
    TINY_SDXL_UNET,
    TINY_T5,
    TINY_VAE,
    TINY_VAE_16,
    BuiltinModel,
)
from diffship.models.builtin_write import BUILTIN_REVISION, weights_tag, write_builtin
from diffship.models.digits import DIGITS_TEXT_ENCODER, DIGITS_UNET, DIGITS_VAE, TRAIN_SCHEDULER
from diffship.store import cache
from diffship.store.artifacts import staged_dir

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
        BuiltinModel(
            name="sd35m-arch",
            description="Stable Diffusion 3.5 medium shapes exactly (2.5B MMDiT, CLIP-L, CLIP-G, T5-XXL), random "
                        "BF16 weights written layer by layer; for benchmarks",
            family="sd3",
            pipeline_class="StableDiffusion3Pipeline",
            denoiser=SD35M_TRANSFORMER,
            denoiser_class="SD3Transformer2DModel",
            vae={**SD3_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609},
            text_encoders=({**CLIP_L, "with_projection": True}, OPENCLIP_BIGG, {**T5_XXL, "max_length": 256}),
            pad_tokens=("<|endoftext|>", "!", "<pad>"),
            text_encoder_folders=("text_encoder", "text_encoder_2", "text_encoder_3"),
            scheduler_class="FlowMatchEulerDiscreteScheduler",
            scheduler=FLOW_MATCH,
            seed=18,
            approx_size="16 GB",
            dtype="bfloat16",
        ),
        BuiltinModel(
            name="flux-arch",
            description="FLUX.1-schnell shapes exactly (12B transformer, CLIP-L, T5-XXL), random BF16 weights written "
                        "layer by layer; for benchmarks",
            family="flux",
            pipeline_class="FluxPipeline",
            denoiser=FLUX_SCHNELL_TRANSFORMER,
            denoiser_class="FluxTransformer2DModel",
            vae={**SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159},
            text_encoders=(CLIP_L, {**T5_XXL, "max_length": 512}),
            pad_tokens=("<|endoftext|>", "<pad>"),
            scheduler_class="FlowMatchEulerDiscreteScheduler",
            scheduler=FLUX_SCHNELL_FLOW_MATCH,
            seed=19,
            approx_size="34 GB",
            dtype="bfloat16",
        ),
    ]
}

DEFAULT_MODEL = "digits-sd"


def builtin_folder(name: str) -> Path:
    """The cached diffusers folder of a built-in model, built first if absent (once, when several builds ask at once;
    in a private scratch folder when the cache cannot be written)."""
    model = BUILTINS[name]
    folder_name = f"{name}-r{BUILTIN_REVISION}{weights_tag(model)}"
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


