"""The UNet as a denoiser (`UNet2DConditionModel`, SD 1.x / 2.x / XL): its inputs from its config, the residuals a
ControlNet adds, how diffusers' pipelines call it, and the layers INT8 keeps in float.

Torch-free, so detection and the CLI stay light; the wrappers themselves are in `unet_modules`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from diffship.errors import DiffshipError
from diffship.models.families.base import Denoiser, SensitiveLayers
from diffship.models.specs import TensorSpec

if TYPE_CHECKING:
    from diffship.models.families.base import Family

COMPONENT = "unet"


def unet_inputs(config: dict[str, Any], family: Family) -> tuple[TensorSpec, ...]:
    """sample, timestep, the text encoders' states and (SDXL) the pooled text embedding and time ids. Its height and
    width axes count latent pixels."""
    inputs = [
        TensorSpec("sample", "float32", ("batch", config.get("in_channels", 4), "height", "width")),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", config["cross_attention_dim"])),
    ]
    if family.time_ids:
        text_embeds = config["projection_class_embeddings_input_dim"] - family.time_ids * config["addition_time_embed_dim"]
        inputs += [TensorSpec("text_embeds", "float32", ("batch", text_embeds)),
                   TensorSpec("time_ids", "float32", ("batch", family.time_ids))]
    return tuple(inputs)


def unet_outputs(config: dict[str, Any]) -> tuple[TensorSpec, ...]:
    return (TensorSpec("out_sample", "float32", ("batch", config.get("out_channels", 4), "height", "width")),)


def residual_specs(config: dict[str, Any]) -> tuple[TensorSpec, ...]:
    """The residuals a ControlNet adds to a UNet of this config: one per down-block output (conv_in, each layer of
    each block, each downsampler), then the mid block's, as diffusers' ControlNetModel returns them."""
    channels, layers = config["block_out_channels"], config.get("layers_per_block", 2)
    found = [(channels[0], 1)]
    for i, width in enumerate(channels):
        found += [(width, 2 ** i)] * (layers[i] if isinstance(layers, list) else layers)
        if i < len(channels) - 1:
            found.append((width, 2 ** (i + 1)))
    found.append((channels[-1], 2 ** (len(channels) - 1)))

    def side(name: str, factor: int) -> str:
        return name if factor == 1 else f"{name}_{factor}"

    return tuple(TensorSpec("mid_block" if i == len(found) - 1 else f"down_block_{i}", "float32",
                            ("batch", width, side("height", f), side("width", f))) for i, (width, f) in enumerate(found))


def call_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The named inputs of one call diffusers' pipelines make to a UNet (positional or keyword) and the ControlNet
    residuals it was given (empty without ControlNets), as the tensors themselves."""
    sample = args[0] if args else kwargs["sample"]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    call = {"sample": sample, "timestep": timestep,
            "encoder_hidden_states": kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)}
    added = kwargs.get("added_cond_kwargs") or {}
    call |= {k: added[k] for k in ("text_embeds", "time_ids") if k in added}
    residuals = [*(kwargs.get("down_block_additional_residuals") or []), kwargs.get("mid_block_additional_residual")]
    if residuals[-1] is None:
        return call, {}
    return call, {("mid_block" if i == len(residuals) - 1 else f"down_block_{i}"): r for i, r in enumerate(residuals)}


def cache_features(config: dict[str, Any], depth: int) -> TensorSpec:
    """The hidden state a shallow step reuses at `depth` (`unet_cache`): the one entering the up layer that takes skip
    connection r_depth. At a block's first layer that is the block before it's output (after its upsampler), else
    the block's own width; its resolution is the block's."""
    channels = list(config["block_out_channels"])
    layers = config.get("layers_per_block", 2)
    per_block = [(layers[-1 - i] if isinstance(layers, list) else layers) + 1 for i in range(len(channels))]
    if not 1 <= depth <= sum(per_block) - 1:
        raise DiffshipError(f"deep_cache depth {depth} must be 1 to {sum(per_block) - 1} for this UNet (its skip "
                            "connections after conv_in).")
    cut = sum(per_block) - 1 - depth  # the up layer that takes r_depth, counted over the whole up path
    for i, count in enumerate(per_block):
        if cut < count:
            width = (channels[-1] if i == 0 else channels[-i]) if cut == 0 else channels[-1 - i]
            factor = 2 ** (len(channels) - 1 - i)
            sides = ("height", "width") if factor == 1 else (f"height_{factor}", f"width_{factor}")
            return TensorSpec("cached_features", "float32", ("batch", width, *sides))
        cut -= count
    raise AssertionError("unreachable: the cut is within the up path")


def _wrap_cache(name: str) -> Any:
    def wrap(module: Any, inputs: tuple[str, ...], depth: int) -> Any:
        from diffship.models.families import unet_cache  # start-up time: torch

        return getattr(unet_cache, name)(module, "time_ids" in inputs, depth)
    return wrap


def _wrap(name: str) -> Any:
    def wrap(module: Any, inputs: tuple[str, ...]) -> Any:
        from diffship.models.families import unet_modules  # start-up time: torch

        return getattr(unet_modules, name)(module, "time_ids" in inputs)
    return wrap


UNET = Denoiser(
    COMPONENT, "UNet", unet_inputs, unet_outputs, _wrap("UNet"), call_inputs,
    # optimum-intel's and NVIDIA's diffusion recipes: the timestep embedding MLP and the first and last convolutions
    # hurt most and speed up least; the search also ranks first the 1x1 shortcuts over unnormalized skip
    # concatenations (on tiny-sd at 20 steps local SQNR alone ranked the latent input 15th of 125 yet its noise is
    # the one that reached the output); training keeps the ResNets' time projections in float as well.
    SensitiveLayers(kept_float=("time_embedding", "time_proj", "conv_in", "conv_out"),
                    searched_first=("conv_in", "conv_out", "time_embedding", "time_proj", "conv_shortcut"),
                    trained_float=("time_embedding", "conv_in", "conv_out", "conv_shortcut", "time_emb_proj")),
    latent_multiple=8,  # SD's three UNet downsamplings
    default_sample_size=64,
    onnx_model_type="unet",
    host_embedding=True,
    residuals=residual_specs, wrap_controlled=_wrap("ControlledUNet"), wrap_controlnet=_wrap("ControlNet"),
    controlnet_class="ControlNetModel",
    controlnet_fits=("cross_attention_dim", "block_out_channels", "layers_per_block", "in_channels"),
    cache_features=cache_features, wrap_caching=_wrap_cache("CachingUNet"), wrap_shallow=_wrap_cache("ShallowUNet"))
