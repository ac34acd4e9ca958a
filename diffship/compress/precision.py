"""FP16 / BF16 components for the PyTorch backend, with what is kept in FP32 and why."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffship.models.families import Family

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def cast_pipeline(pipe: Any, dtype: str, vae: str, declared: Family) -> dict[str, Any]:
    """Cast the text encoders and the denoiser to `dtype`; the VAE too unless it is known to overflow there.

    The scheduler step always runs in FP32: diffusers' schedulers upcast the sample for the update.
    """
    target = DTYPES[dtype]
    kept: dict[str, str] = {"scheduler step": "diffusers' schedulers compute the update in FP32"}
    for name in (*declared.text_encoders, declared.denoiser.component):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(target)
    keep_vae = vae == "fp32" or (vae == "auto" and dtype == "fp16" and declared.vae_overflows_fp16)
    if keep_vae:
        kept["vae"] = ("the recipe asks for it" if vae == "fp32" else
                       f"{declared.short}'s VAE overflows to NaN in FP16 (its activations exceed 65504)")
    else:
        pipe.vae.to(target)
    return {"dtype": dtype, "kept_fp32": kept}
