"""`digits-sd`: the data, prompts and architecture of the small Stable Diffusion trained on scikit-learn's digits.

Shared by the training script (scripts/train_digits_sd.py), the built-in model that loads its committed weights,
and the quality check that asks whether generated images show the digit their prompt named.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT_TEMPLATES = ("a handwritten digit {word}", "the number {word}", "a digit {word}, handwritten",
                    "handwritten {word}", "a drawing of the digit {word}", "{digit}")
IMAGE_SIZE = 32

DIGITS_TEXT_ENCODER = {"vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406,
                       "eos_token_id": 49407, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "projection_dim": 32, "hidden_act": "quick_gelu"}
DIGITS_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": IMAGE_SIZE, "layers_per_block": 1,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 32], "norm_num_groups": 8,
}
DIGITS_UNET = {
    "sample_size": IMAGE_SIZE // 4, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32,
    "attention_head_dim": 4, "norm_num_groups": 32,
}
TRAIN_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                   "num_train_timesteps": 1000}


def prompt_for(digit: int, template: int = 0) -> str:
    """The prompt asking for `digit` in wording number `template`."""
    return PROMPT_TEMPLATES[template].format(word=WORDS[digit], digit=digit)


def digit_images(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 handwritten digits as (N, 3, size, size) images in [-1, 1] (white on black) and labels."""
    from sklearn.datasets import load_digits  # start-up time: sklearn

    data = load_digits()
    pixels = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]  # 8x8, 0..1
    upscaled = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    return (upscaled * 2 - 1).repeat(1, 3, 1, 1), torch.from_numpy(data.target.astype(np.int64))


def to_digit_pixels(images: np.ndarray) -> np.ndarray:
    """Generated uint8 images (N, H, W, 3) as the data set's 8x8 grid of 0..16 values, flattened to (N, 64)."""
    gray = torch.from_numpy(images.astype(np.float32).mean(axis=-1) / 255.0)[:, None]
    small = F.adaptive_avg_pool2d(gray, 8)[:, 0]
    return (small.numpy() * 16.0).reshape(len(images), 64)
