"""ControlNets beside a pipeline: each one a folder (or hub snapshot) holding a diffusers `ControlNetModel`, added to
the model as `controlnet`, `controlnet_1`, ... (diffusers' own names for a saved multi-ControlNet pipeline) in a
cached folder that links the base pipeline's files, so everything after `resolve` reads one diffusers folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffship.errors import DiffshipError
from diffship.models.families import Denoiser, controlnet_names, detect_family
from diffship.models.variants import link_tree
from diffship.store import cache
from diffship.store.artifacts import read_json, staged_dir

REVISION = 1


def check_controlnet(path: Path, denoiser: Denoiser, denoiser_config: dict[str, Any]) -> dict[str, Any]:
    """A ControlNet folder's config, or an error when it is not the kind `denoiser` takes or does not fit it."""
    kind = denoiser.controlnet_class
    if kind is None:
        raise DiffshipError(f"This pipeline's {denoiser.title} takes no ControlNets; diffship cannot add {path}.")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise DiffshipError(f"ControlNet {path} is not a diffusers {kind} folder (no config.json).")
    config = read_json(config_path)
    if config.get("_class_name") != kind:
        raise DiffshipError(f"{path} holds a {config.get('_class_name')!r}, not a {kind}.")
    for key in denoiser.controlnet_fits:
        if key in denoiser_config and config.get(key) != denoiser_config[key]:
            raise DiffshipError(f"ControlNet {path} does not fit this pipeline's {denoiser.title}: its {key} is "
                                f"{config.get(key)}, the {denoiser.title}'s {denoiser_config[key]}.")
    return config


def with_controlnets(folder: Path, locations: list[Path], say: Callable[[str], None] | None = None) -> Path:
    """A cached pipeline folder holding `folder`'s files (linked) and each ControlNet as `controlnet`, `controlnet_1`..."""
    family = detect_family(folder)
    for path in locations:
        check_controlnet(path, family.denoiser, family.denoiser_config(folder))
    key = cache.key(stage="controlnets", folder=cache.folder_hash(folder),
                    controlnets=[cache.folder_hash(p) for p in locations], revision=REVISION)
    root = cache.scratch_root() if cache.unwritable_reason() is not None else cache.cache_root()
    joined = root / "models" / f"controlnet-{key[:16]}"
    if (joined / "model_index.json").is_file():
        return joined
    with cache.locked(joined, say or (lambda _: None), "ControlNet folder"), staged_dir(joined, owned=True) as staging:
        link_tree(folder, staging, skip={"model_index.json"})
        index = read_json(folder / "model_index.json")
        for name, path in zip(controlnet_names(len(locations)), locations, strict=True):
            link_tree(path, staging / name)
            index[name] = ["diffusers", "ControlNetModel"]
        (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return joined
