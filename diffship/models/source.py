"""Resolve what the user named (built-in, local folder, hub id) to a local diffusers folder."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffship.errors import DiffshipError
from diffship.models.builtin import BUILTINS, builtin_folder
from diffship.models.controlnet import with_controlnets
from diffship.models.lora import LoraSpec, with_loras
from diffship.models.single_file import convert, is_checkpoint_file
from diffship.models.variants import choose_variant, with_variant

if TYPE_CHECKING:
    from diffship.recipe import Recipe

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_HOST = "huggingface.co"
HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors"]
PICKLE_PATTERNS = ["*.bin", "*.ckpt", "*.pt", "*.pth"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from and the local folder that holds it."""

    spec: str  # what the user typed
    kind: str  # "builtin", "local", "single-file" (converted into the cache) or "hub"
    folder: Path
    variant: str | None = None  # the weight variant loaded (fp16: *.fp16.safetensors, upcast to FP32 at load)
    loras: tuple[dict[str, Any], ...] = ()  # merged into `folder`: each file's path, sha256, scale, layers patched
    controlnets: tuple[str, ...] = ()  # added to `folder` as controlnet, controlnet_1, ...: what the user named


def resolve(spec: str, allow_pickle: bool = False, model_config: str | Path | None = None,
            say: Callable[[str], None] | None = None, variant: str | None = None,
            loras: list[LoraSpec] | None = None, controlnets: list[str] | None = None) -> ModelSource:
    """Map a built-in name, a local folder, a single-file checkpoint or a hub id to a local diffusers folder; with a
    weight variant (asked for, or the only weights a folder has), to a folder that loads it; with LoRAs, to a folder
    with them merged; with ControlNets (folders or hub ids), to a folder that holds them too."""
    source = _locate(spec, allow_pickle, model_config, say)
    if source.kind == "single-file" and variant is not None:
        raise DiffshipError("--variant applies to diffusers folders; a single-file checkpoint has one set of weights.")
    chosen = choose_variant(source.folder, variant) if source.kind != "single-file" else None
    if chosen is not None:
        source = ModelSource(spec, source.kind, with_variant(source.folder, chosen, say), chosen)
    if loras:
        folder, record = with_loras(source.folder, loras, allow_pickle, say)
        source = ModelSource(spec, source.kind, folder, source.variant, tuple(record))
    if controlnets:
        locations = [_controlnet_location(c, allow_pickle) for c in controlnets]
        source = ModelSource(spec, source.kind, with_controlnets(source.folder, locations, say), source.variant,
                             source.loras, tuple(controlnets))
    return source


def _controlnet_location(spec: str, allow_pickle: bool) -> Path:
    """A ControlNet folder, or a hub id's snapshot."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve()
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")) and not path.exists():
        return _from_hub(spec, allow_pickle)
    raise DiffshipError(f"ControlNet {spec!r} is not a folder holding a diffusers ControlNetModel, nor a hub id.")


def _locate(spec: str, allow_pickle: bool, model_config: str | Path | None,
            say: Callable[[str], None] | None) -> ModelSource:
    if spec in BUILTINS:
        return ModelSource(spec, "builtin", builtin_folder(spec))
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if not is_checkpoint_file(path):
                raise DiffshipError(
                    f"{path} is a file but not a checkpoint diffship reads (.safetensors, or .ckpt with "
                    "--allow-pickle); --model takes a diffusers folder, a single-file checkpoint, a built-in name or "
                    "a hub id.")
            return ModelSource(spec, "single-file", convert(path, model_config, allow_pickle, say))
        if model_config is not None:
            raise DiffshipError("--model-config applies to single-file checkpoints; a diffusers folder has its own.")
        return ModelSource(spec, "local", path.resolve())
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return ModelSource(spec, "hub", _from_hub(spec, allow_pickle))
    raise DiffshipError(
        f"Unknown model {spec!r}: not a built-in ({', '.join(BUILTINS)}), not an existing folder or checkpoint file, "
        "and not a hub id of the form owner/name."
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_hub(repo_id: str, allow_pickle: bool) -> Path:
    from huggingface_hub import snapshot_download  # start-up time: huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError  # start-up time: huggingface_hub

    patterns = HUB_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:  # a snapshot already in the local hub cache works offline
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if offline or not _hub_reachable():
        raise DiffshipError(
            f"{repo_id!r} looks like a hub id, but the hub cannot be reached from here "
            f"({'HF_HUB_OFFLINE is set' if offline else f'no connection to {HUB_HOST}'}) and it is not in the "
            "local hub cache. Download the pipeline on a machine with network access "
            "(`DiffusionPipeline.from_pretrained(...).save_pretrained(DIR)`) and pass --model DIR, "
            "or use a built-in model (`diffship models`)."
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except HfHubHTTPError as exc:
        raise DiffshipError(f"Could not download {repo_id!r} from the hub: {exc}") from exc


def recipe_source(recipe: Recipe, loras: list[LoraSpec], say: Callable[[str], None] | None = None) -> ModelSource:
    """The model a build was made from (with the LoRAs its recipe merged), and `loras` merged after them."""
    return resolve(recipe.model, allow_pickle=recipe.allow_pickle, model_config=recipe.checkpoint_config, say=say,
                   variant=recipe.variant, loras=[LoraSpec(x.path, x.scale) for x in recipe.loras] + loras,
                   controlnets=recipe.controlnets)
