"""Write diffship/models/standard_configs/: the diffusers configuration folders of the standard Stable Diffusion
architectures, which single-file checkpoints are converted against offline (no weights, a few KB each).

Run once when a declaration below changes; the JSON it writes is committed. The values are those of the
published models' diffusers folders (SD 1.5, SD 2.1 / 2.1-base, the inpainting releases, SDXL base 1.0 and
refiner 1.0, SDXL inpainting 0.1).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "diffship" / "models" / "standard_configs"

CLIP_IDS = {"vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 1}
CLIP_L = {**CLIP_IDS, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "hidden_act": "quick_gelu", "projection_dim": 768}
OPENCLIP_H = {**CLIP_IDS, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
              "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512}
OPENCLIP_BIGG = {**CLIP_IDS, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                 "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280}
SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
             "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True}
SDXL_SCHEDULER = {**SCHEDULER, "interpolation_type": "linear", "timestep_spacing": "leading"}
VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "down_block_types": ["DownEncoderBlock2D"] * 4,
       "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
       "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215}
SDXL_VAE = {**VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
SD1_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "block_out_channels": [320, 640, 1280, 1280],
            "layers_per_block": 2, "attention_head_dim": 8, "cross_attention_dim": 768, "norm_num_groups": 32}
SD2_UNET = {**SD1_UNET, "sample_size": 96, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
            "use_linear_projection": True}
SDXL_UNET = {"sample_size": 128, "in_channels": 4, "out_channels": 4,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "transformer_layers_per_block": [1, 2, 10],
             "attention_head_dim": [5, 10, 20], "use_linear_projection": True, "cross_attention_dim": 2048,
             "norm_num_groups": 32, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816}
REFINER_UNET = {"sample_size": 128, "in_channels": 4, "out_channels": 4,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "block_out_channels": [384, 768, 1536, 1536], "layers_per_block": 2,
                "transformer_layers_per_block": 4, "attention_head_dim": [6, 12, 24, 24],
                "use_linear_projection": True, "cross_attention_dim": 1280, "norm_num_groups": 32,
                "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2560}

SD1_TEXT = (("text_encoder", "CLIPTextModel", CLIP_L, "<|endoftext|>"),)
SD2_TEXT = (("text_encoder", "CLIPTextModel", OPENCLIP_H, "!"),)
SDXL_TEXT = (("text_encoder", "CLIPTextModel", CLIP_L, "<|endoftext|>"),
             ("text_encoder_2", "CLIPTextModelWithProjection", OPENCLIP_BIGG, "!"))
REFINER_TEXT = (("text_encoder_2", "CLIPTextModelWithProjection", OPENCLIP_BIGG, "!"),)
SD_INDEX = {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
XL_INDEX = {"image_encoder": [None, None], "feature_extractor": [None, None]}

# The model type diffusers' `infer_diffusers_model_type` reads from a checkpoint's tensors, per configuration. SD 2.x's
# 512 (epsilon) and 768 (v-prediction) files have the same tensors: like diffusers, 768-v is what "v2" means, and the
# 512 one is chosen by name (--model-config).
MODEL_TYPES = {"sd1": "v1", "sd1-inpaint": "inpainting", "sd2-768-v": "v2", "sd2-512": None,
               "sd2-inpaint": "inpainting_v2", "sdxl": "xl_base", "sdxl-refiner": "xl_refiner",
               "sdxl-inpaint": "xl_inpaint"}

# name -> (pipeline class, UNet, VAE, text encoders, scheduler class, scheduler config, model_index extras)
STANDARD: dict[str, tuple[str, dict[str, Any], dict[str, Any], tuple, str, dict[str, Any], dict[str, Any]]] = {
    "sd1": ("StableDiffusionPipeline", SD1_UNET, VAE, SD1_TEXT, "PNDMScheduler", SCHEDULER, SD_INDEX),
    "sd1-inpaint": ("StableDiffusionInpaintPipeline", {**SD1_UNET, "in_channels": 9}, VAE, SD1_TEXT, "PNDMScheduler",
                    SCHEDULER, SD_INDEX),
    "sd2-768-v": ("StableDiffusionPipeline", SD2_UNET, {**VAE, "sample_size": 768}, SD2_TEXT, "DDIMScheduler",
                  {**SCHEDULER, "prediction_type": "v_prediction"}, SD_INDEX),
    "sd2-512": ("StableDiffusionPipeline", {**SD2_UNET, "sample_size": 64}, VAE, SD2_TEXT, "PNDMScheduler",
                SCHEDULER, SD_INDEX),
    "sd2-inpaint": ("StableDiffusionInpaintPipeline", {**SD2_UNET, "sample_size": 64, "in_channels": 9}, VAE,
                    SD2_TEXT, "DDIMScheduler", SCHEDULER, SD_INDEX),
    "sdxl": ("StableDiffusionXLPipeline", SDXL_UNET, SDXL_VAE, SDXL_TEXT, "EulerDiscreteScheduler", SDXL_SCHEDULER,
             {**XL_INDEX, "force_zeros_for_empty_prompt": True}),
    "sdxl-refiner": ("StableDiffusionXLImg2ImgPipeline", REFINER_UNET, SDXL_VAE, REFINER_TEXT,
                     "EulerDiscreteScheduler", SDXL_SCHEDULER,
                     {**XL_INDEX, "text_encoder": [None, None], "tokenizer": [None, None],
                      "requires_aesthetics_score": True, "force_zeros_for_empty_prompt": False}),
    "sdxl-inpaint": ("StableDiffusionXLInpaintPipeline", {**SDXL_UNET, "in_channels": 9}, SDXL_VAE, SDXL_TEXT,
                     "EulerDiscreteScheduler", SDXL_SCHEDULER,
                     {**XL_INDEX, "requires_aesthetics_score": False, "force_zeros_for_empty_prompt": True}),
}


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    for name, (pipeline, unet, vae, texts, scheduler_class, scheduler, extra) in STANDARD.items():
        folder = OUT / name
        index: dict[str, Any] = {"_class_name": pipeline, "unet": ["diffusers", "UNet2DConditionModel"],
                                 "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", scheduler_class],
                                 **extra}
        pads = {}
        for te_folder, te_class, config, pad in texts:
            suffix = te_folder.removeprefix("text_encoder")
            index[te_folder] = ["transformers", te_class]
            index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
            _write(folder / te_folder / "config.json", {"architectures": [te_class], "model_type": "clip_text_model",
                                                         **config})
            pads[f"tokenizer{suffix}"] = pad
        _write(folder / "model_index.json", index)
        _write(folder / "unet" / "config.json", {"_class_name": "UNet2DConditionModel", **unet})
        _write(folder / "vae" / "config.json", {"_class_name": "AutoencoderKL", **vae})
        _write(folder / "scheduler" / "scheduler_config.json", {"_class_name": scheduler_class, **scheduler})
        # diffship's own: the checkpoints this configuration is for, and each tokenizer's pad token (built at
        # conversion from the shipped CLIP vocabulary)
        _write(folder / "diffship.json", {"diffusers_model_type": MODEL_TYPES[name], "tokenizer_pads": pads})
    print(f"wrote {len(STANDARD)} configuration folders under {OUT}")


if __name__ == "__main__":
    main()
