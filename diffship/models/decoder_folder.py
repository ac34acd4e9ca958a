"""A smaller VAE decoder beside a pipeline (the `vae_decoder` acceleration: diffusers' `AutoencoderTiny`, TAESD, or
another `AutoencoderKL`): its folder linked into a cached copy of the pipeline folder as `tiny_vae`, so export, parity
and the cache read it as one more module of one diffusers folder, and exported as the component `tiny_vae_decoder`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from diffship.errors import DiffshipError
from diffship.models.components import ComponentSpec
from diffship.models.families import component_config
from diffship.models.variants import link_tree
from diffship.store import cache
from diffship.store.artifacts import read_json, staged_dir

MODULE = "tiny_vae"
COMPONENT = "tiny_vae_decoder"
KINDS = ("AutoencoderKL", "AutoencoderTiny")
REVISION = 1


def upscale(config: dict[str, Any]) -> int:
    """Image pixels per latent pixel of a decoder with this config."""
    if config.get("_class_name") == "AutoencoderTiny":  # an upsampler after every decoder block but the last
        return int(config.get("upsampling_scaling_factor", 2)) ** (len(config.get("num_decoder_blocks", (3, 3, 3, 1))) - 1)
    return 2 ** (len(config.get("block_out_channels", [0] * 4)) - 1)


def check_decoder(path: Path, vae: dict[str, Any]) -> dict[str, Any]:
    """The decoder folder's config, or an error saying why it cannot decode this pipeline's latents."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise DiffshipError(f"vae_decoder {path} is not a diffusers VAE folder (no config.json).")
    config = read_json(config_path)
    if config.get("_class_name") not in KINDS:
        raise DiffshipError(f"vae_decoder {path} holds a {config.get('_class_name')!r}; it must be one of {', '.join(KINDS)}.")
    for what, mine, theirs in (("latent channels", config.get("latent_channels", 4), vae.get("latent_channels", 4)),
                               ("upscaling", upscale(config), upscale(vae))):
        if mine != theirs:
            raise DiffshipError(f"vae_decoder {path} does not fit this pipeline's VAE: its {what} is {mine}, the "
                                f"pipeline's {theirs}.")
    return config


def with_decoder(folder: Path, path: Path, say: Callable[[str], None] | None = None) -> Path:
    """A cached pipeline folder holding `folder`'s files (linked) and the decoder folder `path` as `tiny_vae` (not in
    model_index.json: the baseline's pipeline keeps its own VAE)."""
    if not path.is_dir():
        raise DiffshipError(f"vae_decoder {path} is not a folder.")
    check_decoder(path, component_config(folder, "vae"))
    key = cache.key(stage="decoder", folder=cache.folder_hash(folder), decoder=cache.folder_hash(path),
                    revision=REVISION)
    root = cache.scratch_root() if cache.unwritable_reason() is not None else cache.cache_root()
    joined = root / "models" / f"decoder-{key[:16]}"
    if (joined / "model_index.json").is_file():
        return joined
    with cache.locked(joined, say or (lambda _: None), "decoder folder"), staged_dir(joined, owned=True) as staging:
        link_tree(folder, staging)
        link_tree(path, staging / MODULE)
    return joined


def decoder_spec(vae_decoder: ComponentSpec) -> ComponentSpec:
    """The smaller decoder's component: the pipeline decoder's inputs and outputs, read from `tiny_vae`."""
    return replace(vae_decoder, name=COMPONENT, module=MODULE)
