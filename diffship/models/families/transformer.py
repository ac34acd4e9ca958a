"""The diffusion transformers as denoisers: SD3's MMDiT (`SD3Transformer2DModel`) and Flux's
(`FluxTransformer2DModel`). Their inputs from their configs, how diffusers' pipelines call them (always by keyword),
and the layers INT8 keeps in float.

Torch-free, so detection and the CLI stay light; the wrappers and the export patches are in `transformer_modules`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffship.errors import DiffshipError
from diffship.models.families.base import Denoiser, SensitiveLayers
from diffship.models.specs import TensorSpec
from diffship.store.artifacts import read_json

if TYPE_CHECKING:
    from diffship.models.families.base import Family

COMPONENT = "transformer"


def transformer_class(folder: Path) -> str | None:
    """The `_class_name` the folder's transformer config declares, if it has one (detection)."""
    path = folder / COMPONENT / "config.json"
    return read_json(path).get("_class_name") if path.is_file() else None


def sd3_inputs(config: dict[str, Any], family: Family) -> tuple[TensorSpec, ...]:
    """The latents (height / width in latent pixels), the timestep (0..1000), CLIP's and T5's states concatenated
    along the sequence (77 + T5's length), and the two CLIPs' pooled projections side by side."""
    return (TensorSpec("hidden_states", "float32", ("batch", config.get("in_channels", 16), "height", "width")),
            TensorSpec("timestep", "float32", ("batch",)),
            TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", config["joint_attention_dim"])),
            TensorSpec("pooled_projections", "float32", ("batch", config["pooled_projection_dim"])))


def sd3_outputs(config: dict[str, Any]) -> tuple[TensorSpec, ...]:
    channels = config.get("out_channels") or config.get("in_channels", 16)
    return (TensorSpec("out_sample", "float32", ("batch", channels, "height", "width")),)


def flux_inputs(config: dict[str, Any], family: Family) -> tuple[TensorSpec, ...]:
    """The 2x2-packed latents (one token per 2x2 latent patch), the timestep (0..1), the embedded guidance (dev; none
    in schnell), CLIP-L's pooled output, T5's states, and the text and image position ids RoPE reads (2-D: no
    batch, as diffusers passes them)."""
    guidance = (TensorSpec("guidance", "float32", ("batch",)),) if config.get("guidance_embeds") else ()
    return (TensorSpec("hidden_states", "float32", ("batch", "image_tokens", config.get("in_channels", 64))),
            TensorSpec("timestep", "float32", ("batch",)), *guidance,
            TensorSpec("pooled_projections", "float32", ("batch", config["pooled_projection_dim"])),
            TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", config["joint_attention_dim"])),
            TensorSpec("txt_ids", "float32", ("sequence", 3)),
            TensorSpec("img_ids", "float32", ("image_tokens", 3)))


def flux_outputs(config: dict[str, Any]) -> tuple[TensorSpec, ...]:
    channels = config.get("out_channels") or config.get("in_channels", 64)
    return (TensorSpec("out_sample", "float32", ("batch", "image_tokens", channels)),)


def cache_depths(config: dict[str, Any]) -> int:
    """The deepest block-cache depth (`transformer_cache`): fewer than half the blocks, and for Flux no more than its
    double-stream or its single-stream blocks, so that a middle is left."""
    lists = [config.get("num_layers", 0), *([config["num_single_layers"]] if "num_single_layers" in config else [])]
    return min((sum(lists) - 1) // 2, *lists)


def cache_features(config: dict[str, Any], depth: int) -> TensorSpec:
    """What a shallow step reuses (`transformer_cache`): the residual the middle blocks add to the text and image
    tokens, concatenated along the tokens, at the transformer's width. Parity reports it ungated: a residual's
    relative error is over a difference (tiny-flux's one middle block in BF16: cosine 0.968 while the prediction's is
    0.9991); its effect is judged where it lands, in the accelerated images against the budget."""
    deepest = cache_depths(config)
    if deepest < 1:
        raise DiffshipError("Block caching needs at least three transformer blocks (a first, a middle and a last); "
                            f"this transformer has {config.get('num_layers', 0) + config.get('num_single_layers', 0)}.")
    if not 1 <= depth <= deepest:
        raise DiffshipError(f"deep_cache depth {depth} must be 1 to {deepest} for this transformer (its first and "
                            "last blocks around a middle of at least one).")
    width = config["num_attention_heads"] * config["attention_head_dim"]
    return TensorSpec("cached_features", "float32", ("batch", "tokens", width), gated=False)


def _wrap_cache(name: str) -> Any:
    def wrap(module: Any, inputs: tuple[str, ...], depth: int) -> Any:
        from diffship.models.families import transformer_cache  # start-up time: torch

        cache_features(dict(module.config), depth)  # a depth this transformer has
        return getattr(transformer_cache, name)(module, inputs, depth)
    return wrap


def keyword_call(names: tuple[str, ...]) -> Any:
    """The named inputs of one call diffusers' pipelines make to a transformer: keywords only, in the spec's
    order; an input the model was not given (schnell's guidance) is absent. No ControlNet residuals."""
    def call_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return {name: kwargs[name] for name in names if kwargs.get(name) is not None}, {}
    return call_inputs


def _wrap(name: str) -> Any:
    def wrap(module: Any, inputs: tuple[str, ...]) -> Any:
        from diffship.models.families import transformer_modules  # start-up time: torch

        return getattr(transformer_modules, name)(module, inputs)
    return wrap


def _export_patches() -> Any:
    from diffship.models.families import transformer_modules  # start-up time: torch

    return transformer_modules.exportable()


SD3_TRANSFORMER = Denoiser(
    COMPONENT, "SD3 transformer", sd3_inputs, sd3_outputs, _wrap("SD3Transformer"),
    keyword_call(("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")),
    # As for the UNet: the timestep / pooled-text embedding MLP, the patch embedding and the output projection carry
    # every token's conditioning and cost little.
    SensitiveLayers(kept_float=("time_text_embed", "pos_embed", "context_embedder", "proj_out"),
                    searched_first=("time_text_embed", "pos_embed", "proj_out", "context_embedder", "norm_out"),
                    trained_float=("time_text_embed", "pos_embed", "context_embedder", "proj_out", "norm_out")),
    latent_multiple=2,  # its 2x2 patches
    default_sample_size=128,
    onnx_model_type="mmdit",
    whole_timesteps=False,
    export_patches=_export_patches,
    cache_features=cache_features, wrap_caching=_wrap_cache("CachingTransformer"),
    wrap_shallow=_wrap_cache("ShallowTransformer"),
)

FLUX_TRANSFORMER = Denoiser(
    COMPONENT, "Flux transformer", flux_inputs, flux_outputs, _wrap("FluxTransformer"),
    keyword_call(("hidden_states", "timestep", "guidance", "pooled_projections", "encoder_hidden_states", "txt_ids",
                  "img_ids")),
    SensitiveLayers(kept_float=("time_text_embed", "x_embedder", "context_embedder", "proj_out"),
                    searched_first=("time_text_embed", "x_embedder", "proj_out", "context_embedder", "norm_out"),
                    trained_float=("time_text_embed", "x_embedder", "context_embedder", "proj_out", "norm_out")),
    latent_multiple=2,  # latents are packed in 2x2 patches
    default_sample_size=128,  # FluxPipeline's default_sample_size: 1024 pixels
    onnx_model_type="mmdit",
    timestep_scale=1.0,  # the pipeline passes t / 1000
    whole_timesteps=False,
    packed_latents=True,
    guidance_doubles_batch=False,  # guidance is an input (dev), not a second batch half
    export_patches=_export_patches,
    cache_features=cache_features, wrap_caching=_wrap_cache("CachingTransformer"),
    wrap_shallow=_wrap_cache("ShallowTransformer"),
)
