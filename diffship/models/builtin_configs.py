"""The tiny and full-size architectures the built-in models are made of, as diffusers / transformers configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CLIP_IDS = {"vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407}


SD_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}


TINY_SD_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "attention_head_dim": 4,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
}


TINY_SDXL_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "transformer_layers_per_block": [1, 1, 2],
    "attention_head_dim": [2, 4, 4],
    "use_linear_projection": True,
    "cross_attention_dim": 64,
    "norm_num_groups": 8,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    # 6 time ids x addition_time_embed_dim + the second encoder's projection (32)
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
}


TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    # Four levels, like SD's VAE, so the latent is 1/8 of the image as in the real models.
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 16, 32, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}


SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}


CLIP_L = {**CLIP_IDS, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "hidden_act": "quick_gelu", "projection_dim": 768}


OPENCLIP_BIGG = {**CLIP_IDS, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                 "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280, "with_projection": True}


# The diffusion transformers' 16-channel VAE (SD3 and Flux.1 share its form, not its latent statistics): no quant
# convolutions, a shift before the scaling.
TINY_VAE_16 = {**TINY_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}

# T5 v1.1 (gated GELU, relative attention buckets), as SD3's and Flux's T5-XXL, tiny; vocab_size is the tokenizer's.
TINY_T5 = {"kind": "t5", "d_kv": 16, "num_layers": 2, "num_heads": 4, "feed_forward_proj": "gated-gelu",
           "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32, "dense_act_fn": "gelu_new",
           "is_gated_act": True}

FLOW_MATCH = {"num_train_timesteps": 1000, "shift": 3.0}
# Flux.1-dev's: the shift grows with the image's token count between these anchors
FLUX_FLOW_MATCH = {**FLOW_MATCH, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                   "base_image_seq_len": 256, "max_image_seq_len": 4096}

# SD3.5-medium's form, tiny: MMDiT with a dual-attention first layer and RMS qk-norm; CLIP-L (32) and CLIP-G (48)
# pooled side by side (80), their states padded to T5's width (96) and joined along the sequence.
TINY_SD3_TRANSFORMER = {"sample_size": 8, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
                        "attention_head_dim": 8, "num_attention_heads": 4, "joint_attention_dim": 96,
                        "caption_projection_dim": 32, "pooled_projection_dim": 80, "pos_embed_max_size": 32,
                        "qk_norm": "rms_norm", "dual_attention_layers": [0]}

# Flux.1-dev's form, tiny: one double-stream and two single-stream blocks, RoPE over (4, 6, 6) of the 16-wide
# heads, the embedded guidance; 64 input channels = 16 latent channels x a 2x2 patch.
TINY_FLUX_TRANSFORMER = {"patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 2,
                         "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 64,
                         "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": [4, 6, 6]}

# The full-size forms (hub configs of stabilityai/stable-diffusion-3.5-medium and black-forest-labs/FLUX.1-schnell)
T5_XXL = {"kind": "t5", "vocab_size": 32128, "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_layers": 24,
          "num_heads": 64, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
          "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128}
SD3_VAE = {**SD_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False, "sample_size": 1024}
SD35M_TRANSFORMER = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
                     "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
                     "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
                     "qk_norm": "rms_norm", "dual_attention_layers": list(range(13))}
FLUX_SCHNELL_TRANSFORMER = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                            "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                            "pooled_projection_dim": 768, "guidance_embeds": False, "axes_dims_rope": [16, 56, 56]}
FLUX_SCHNELL_FLOW_MATCH = {**FLUX_FLOW_MATCH, "shift": 1.0, "use_dynamic_shifting": False}


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
    # Full-size models too large to hold twice: every component written layer by layer in this dtype
    # ("bfloat16", as the hub ships them; loaded as FP32 like any variant), never whole in memory.
    dtype: str | None = None
