"""The compression steps a recipe or `diffship compress` can ask for, validated by pydantic.

Each step is one pass over the torch pipeline; they run in the order given, each on the result of the one
before. Most passes act on the UNet, where nearly all of the compute is.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrecisionStep(_Step):
    """Cast the pipeline's components to FP16 / BF16, keeping numerically sensitive parts in FP32."""

    step: Literal["precision"]
    dtype: Literal["fp16", "bf16"] = "bf16"
    vae: Literal["auto", "fp32", "same"] = "auto"  # auto: SDXL's VAE stays FP32 under fp16 (it overflows)


class MagnitudeStep(_Step):
    """Unstructured magnitude pruning of the UNet's conv and linear weights, made permanent."""

    step: Literal["prune-magnitude"]
    sparsity: float = Field(0.5, gt=0.0, lt=1.0)
    scope: Literal["global", "layer"] = "global"


class ChannelStep(_Step):
    """Structured pruning that removes UNet channels (torch-pruning tracks the skip connections)."""

    step: Literal["prune-channels"]
    ratio: float = Field(0.3, gt=0.0, lt=1.0)
    round_to: int | None = Field(None, ge=1)


class HeadStep(_Step):
    """Remove the `heads` least important heads from every attention layer of the UNet."""

    step: Literal["prune-heads"]
    heads: int = Field(1, ge=1)


class DistillStep(_Step):
    """Fine-tune the UNet to match the original's noise prediction on the original's own images, noised."""

    step: Literal["distill"]
    steps: int = Field(400, ge=1)
    images: int = Field(256, ge=1)  # the original's generations (calibration prompts in turn) noised as inputs
    batch: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    checkpoint_every: int = Field(100, ge=1)


class QuantizeStep(_Step):
    """Post-training quantization in PyTorch: optimum-quanto (CPU and GPU) or bitsandbytes (CUDA only)."""

    step: Literal["quantize"]
    library: Literal["quanto", "bitsandbytes"] = "quanto"
    weights: Literal["int8", "int4", "nf4"] = "int8"
    activations: Literal["none", "int8"] = "none"


class QatStep(_Step):
    """INT8 fake quantization (NVIDIA Model Optimizer), calibrated, then fine-tuned against the original.

    The result exports as a QDQ ONNX model that ONNX Runtime, OpenVINO and TensorRT run with INT8 kernels.
    `steps = 0` stops after calibration: plain post-training quantization on the same data, for comparison.
    """

    step: Literal["qat"]
    steps: int = Field(200, ge=0)
    images: int = Field(256, ge=1)
    batch: int = Field(32, ge=1)
    lr: float = Field(2e-5, gt=0.0)
    checkpoint_every: int = Field(100, ge=1)


Step = Annotated[PrecisionStep | MagnitudeStep | ChannelStep | HeadStep | DistillStep | QuantizeStep | QatStep,
                 Field(discriminator="step")]
STEP_NAMES = ("precision", "prune-magnitude", "prune-channels", "prune-heads", "distill", "quantize", "qat")
# Steps whose result ONNX export cannot represent: they are measured in PyTorch only.
TORCH_ONLY = ("precision", "quantize")
