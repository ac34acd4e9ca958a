"""Single-file checkpoints (the original LDM / A1111 layout most fine-tunes ship in), converted offline into a
diffusers folder in the cache, once per file and configuration.

The architecture is read from the tensor names and shapes with diffusers' own `infer_diffusers_model_type`, over
the file's header alone; the conversion is diffusers' `from_single_file`, pointed at a configuration folder
shipped in the package (`standard_configs/`) or named by `--model-config`, so nothing is fetched: given a hub
repository as its config, diffusers contacts the hub even with `local_files_only`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from diffship.errors import DiffshipError
from diffship.models.families import FAMILIES, detect_family, read_model_index
from diffship.store import cache
from diffship.store.artifacts import read_json, staged_dir

STANDARD_CONFIGS = Path(__file__).parent / "standard_configs"
SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DECLARATION = "diffship.json"  # in each shipped configuration: the diffusers model type it is for, tokenizer pads
REVISION = 1  # bump when conversion changes, so cached conversions are redone


def is_checkpoint_file(path: Path) -> bool:
    """Whether `path` names a single-file checkpoint diffship reads (safe or pickle)."""
    return path.is_file() and path.suffix.lower() in SAFE_SUFFIXES + PICKLE_SUFFIXES


def standard_config_names() -> list[str]:
    return sorted(p.name for p in STANDARD_CONFIGS.iterdir() if (p / "model_index.json").is_file())


def by_model_type() -> dict[str, str]:
    """diffusers' model type -> the shipped configuration declared for it (SD 2.x's 512 model has none: its tensors
    are those of the 768 v-prediction one, which diffusers assumes too)."""
    found = {}
    for name in standard_config_names():
        declared = read_json(STANDARD_CONFIGS / name / DECLARATION).get("diffusers_model_type")
        if declared:
            found[declared] = name
    return found


def _shapes(path: Path, allow_pickle: bool) -> dict[str, Any]:
    """Tensor name -> an object with `.shape`, read without loading the weights where the format allows."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise DiffshipError(f"{path} is a pickle checkpoint ({suffix}), which can run code when loaded: refused. "
                                "Use its .safetensors version, or pass --allow-pickle if you trust the file.")
        import torch  # start-up time: torch

        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state = state.get("state_dict", state)
        return {k: v for k, v in state.items() if hasattr(v, "shape")}
    from safetensors import SafetensorError, safe_open  # start-up time: safetensors

    try:
        with safe_open(str(path), "pt") as opened:
            return {k: SimpleNamespace(shape=tuple(opened.get_slice(k).get_shape())) for k in opened.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise DiffshipError(f"{path} is not a readable .safetensors file: {exc}") from None


def detect_config(path: Path, allow_pickle: bool = False) -> str:
    """The shipped configuration whose architecture the checkpoint's tensors have."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type  # start-up time: diffusers

    shapes = _shapes(path, allow_pickle)
    try:
        model_type = infer_diffusers_model_type(shapes)
    except (KeyError, IndexError, AttributeError):
        model_type = None
    # a transformer-only file (SD3, Flux): which family's, by diffusers' name for it or the family's own marks
    family = next((f for f in FAMILIES.values() if model_type in f.checkpoint_types
                   or any(mark in f".{k}" for mark in f.checkpoint_marks for k in shapes)), None)
    if family is not None:
        raise DiffshipError(
            f"{path} is a {family.short} transformer checkpoint"
            + (f" (diffusers reads it as `{model_type}`)" if model_type in family.checkpoint_types else "")
            + f": diffship takes its transformer over a diffusers {family.short} folder, which brings the text "
            "encoders, their tokenizers (T5's SentencePiece vocabulary cannot be made offline) and the VAE. Give that "
            "folder with --model-config; the file's transformer replaces the folder's.")
    known = by_model_type()
    if model_type not in known or "model.diffusion_model.input_blocks.0.0.weight" not in shapes:
        raise DiffshipError(
            f"{path} is not a Stable Diffusion 1.x / 2.x / XL checkpoint diffship knows"
            + (f" (diffusers reads it as `{model_type}`)" if model_type else "")
            + ". For a non-standard architecture give its diffusers configuration folder with --model-config "
            f"(one of {', '.join(standard_config_names())}, or a folder with model_index.json and component configs).")
    return known[model_type]


def config_folder(model_config: str | Path | None, path: Path, allow_pickle: bool) -> Path:
    """The configuration folder to convert against: named, given, or detected from the tensors."""
    if model_config is None:
        return STANDARD_CONFIGS / detect_config(path, allow_pickle)
    if str(model_config) in standard_config_names():
        return STANDARD_CONFIGS / str(model_config)
    folder = Path(model_config).expanduser()
    if not (folder / "model_index.json").is_file():
        raise DiffshipError(f"--model-config {model_config} is neither a shipped configuration "
                            f"({', '.join(standard_config_names())}) nor a folder with a model_index.json.")
    return folder.resolve()


def convert(path: Path, model_config: str | Path | None = None, allow_pickle: bool = False,
            say: Any = None) -> Path:
    """The diffusers folder of checkpoint `path`, converted once and kept in the cache."""
    say = say or (lambda _: None)
    path = path.expanduser().resolve()
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        _shapes(path, allow_pickle)  # refuses it, saying why
    config = config_folder(model_config, path, allow_pickle)
    key = cache.key(stage="single-file", file=cache.file_hashes([path])[0], config=cache.folder_hash(config), revision=REVISION)
    folder = cache.cache_root() / "models" / f"single-file-{key[:16]}"
    if cache.unwritable_reason() is not None:
        folder = cache.scratch_root() / "models" / f"single-file-{key[:16]}"
    if (folder / "model_index.json").is_file():
        return folder
    with cache.locked(folder, say, f"conversion of {path.name}"):
        if not (folder / "model_index.json").is_file():
            say(f"Converting {path.name} to a diffusers folder (configuration {config.name}) ...")
            with staged_dir(folder, owned=True) as staging:
                _convert_into(path, config, staging)
    return folder


def _convert_into(path: Path, config: Path, out: Path) -> None:
    import diffusers  # start-up time: diffusers
    import torch  # start-up time: torch

    from diffship.models.loading import quiet_libraries  # start-up time: torch
    from diffship.models.tokenizer import build_clip_tokenizer, save_clip_tokenizer  # start-up time: transformers

    if detect_family(config).loop == "diffusers":
        _convert_transformer_file(path, config, out)
        return
    work = out / ".config"
    shutil.copytree(config, work)
    declared = read_json(work / DECLARATION) if (work / DECLARATION).is_file() else {}
    pads = declared.get("tokenizer_pads", {})
    index = read_json(work / "model_index.json")
    for name, entry in index.items():
        if name.startswith("tokenizer") and isinstance(entry, list) and entry[1] and not any((work / name).glob("*")):
            save_clip_tokenizer(build_clip_tokenizer(pad_token=pads.get(name, "<|endoftext|>")), work / name)
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # a configuration that names the hub must fail here, not download
    quiet_libraries()  # diffship prints its own line for the conversion
    try:
        pipeline_class = getattr(diffusers, index["_class_name"])
        pipe = pipeline_class.from_single_file(str(path), config=str(work), local_files_only=True,
                                               torch_dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise DiffshipError(f"diffusers could not convert {path} with the configuration {config}: {exc}") from None
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
    pipe.save_pretrained(out, safe_serialization=True)
    for name in index:  # diffusers saves tokenizers it loaded; keep the built ones where it did not
        if name.startswith("tokenizer") and (work / name).is_dir() and not (out / name).exists():
            shutil.copytree(work / name, out / name)
    shutil.rmtree(work)


def _convert_transformer_file(path: Path, config: Path, out: Path) -> None:
    """An SD3 / Flux transformer checkpoint over a diffusers folder of its family: the file's transformer replaces
    the folder's, every other component is the folder's (a file that also holds the encoders or the VAE gives only
    its transformer). Flux's BFL layout is converted by `flux_checkpoint` (diffusers' converter is fixed to
    Flux.1's widths), SD3's by diffusers' `from_single_file`; either is loaded strictly against the folder's
    configuration."""
    import diffusers  # start-up time: diffusers
    import torch  # start-up time: torch

    from diffship.models.loading import check_loading_info, quiet_libraries  # start-up time: torch
    from diffship.models.variants import link_tree  # start-up time: torch

    family = detect_family(config)
    unweighted = [name for name, entry in read_model_index(config).items()
                  if isinstance(entry, list) and entry[1] and name not in (family.denoiser.component, "scheduler")
                  and not name.startswith("tokenizer") and not any((config / name).glob("*.safetensors"))]
    if unweighted:
        raise DiffshipError(f"--model-config {config} has no weights for {', '.join(unweighted)}, which {path.name} "
                            f"does not hold: give a diffusers {family.short} folder with them (the file's transformer "
                            "replaces the folder's).")
    quiet_libraries()
    component = family.denoiser.component
    cls = getattr(diffusers, read_json(config / component / "config.json")["_class_name"])
    shapes = _shapes(path, allow_pickle=True)  # pickles were refused before this, unless allowed
    from diffship.models.flux_checkpoint import is_flux_checkpoint, to_diffusers  # start-up time: torch

    if is_flux_checkpoint(shapes):
        with torch.device("meta"):
            model = cls.from_config(cls.load_config(config / component))
        try:  # another width or depth than the folder's: a split, a module or a shape that does not fit
            state = to_diffusers(_tensors(path), model)
            info = model.load_state_dict(state, strict=False, assign=True)
        except (RuntimeError, AttributeError, ValueError) as exc:
            raise DiffshipError(f"{path.name} is not a transformer of {config}'s configuration: "
                                f"{' '.join(str(exc).split())[:300]}") from None
        left = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
        check_loading_info({"missing_keys": sorted({*info.missing_keys, *left}),
                            "unexpected_keys": info.unexpected_keys}, str(path))
    else:
        try:
            model = cls.from_single_file(str(path), config=str(config), subfolder=component, local_files_only=True,
                                         torch_dtype=torch.float32)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise DiffshipError(f"diffusers could not read {family.short}'s transformer from {path}: {exc}") from None
    link_tree(config, out, skip={component, "diffship_builtin.json"})
    model.to(torch.float32).save_pretrained(out / component, safe_serialization=True)
    (out / component / "config.json").unlink()  # the folder's configuration, byte for byte
    shutil.copyfile(config / component / "config.json", out / component / "config.json")


def _tensors(path: Path) -> dict[str, Any]:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        import torch  # start-up time: torch

        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("state_dict", state)
    from safetensors.torch import load_file  # start-up time: safetensors

    return load_file(str(path))
