"""Load one pipeline component from a diffusers folder, refusing weights that do not match the architecture.

transformers and diffusers only *log* missing or unexpected keys and go on with randomly initialised
layers (a text encoder saved by one transformers release can load as random weights in another),
so every load here asks for the loading info and fails on any mismatch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffship.errors import DiffshipError
from diffship.models.compressed import is_compressed, load_compressed
from diffship.models.families import read_model_index
from diffship.store.artifacts import read_json

SAFE_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")


def quiet_libraries() -> None:
    """Silence the libraries' own progress bars and load reports: diffship checks and reports loads itself."""
    import diffusers  # start-up time: diffusers
    import transformers  # start-up time: transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def check_weight_files(folder: Path, component: str, allow_pickle: bool) -> None:
    """Require safetensors weights; pickle files (arbitrary code on load) only when the user allows them."""
    sub = folder / component
    files = [p for p in sub.iterdir() if p.is_file()] if sub.is_dir() else []
    if any(p.name.endswith(SAFE_SUFFIX) for p in files):
        return
    pickles = [p.name for p in files if p.name.endswith(PICKLE_SUFFIXES)]
    if pickles and not allow_pickle:
        raise DiffshipError(
            f"{sub} has weights only in pickle files ({', '.join(sorted(pickles))}), which can run arbitrary code "
            "when loaded. Convert them to safetensors, or pass --allow-pickle if you trust the source."
        )
    if not pickles:
        raise DiffshipError(f"{sub} holds no weights (no *.safetensors file).")


def check_loading_info(info: dict[str, Any], where: str) -> None:
    """Fail if any weight was missing, unexpected or of the wrong shape."""
    problems = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        values = sorted(str(v) for v in (info.get(key) or []))
        if values:
            shown = ", ".join(values[:5]) + (f" (+{len(values) - 5} more)" if len(values) > 5 else "")
            problems.append(f"{len(values)} {key.replace('_', ' ')}: {shown}")
    problems += [str(e) for e in info.get("error_msgs") or []]
    if problems:
        raise DiffshipError(
            f"The weights in {where} do not match the architecture in its config.json: " + "; ".join(problems) + ". "
            "The libraries would silently fill these with random values; diffship refuses. The checkpoint may "
            "come from a different model or library release: re-save it with the matching library version."
        )


def diffusers_model_class(name: str, path: Path) -> type:
    """diffusers' model class `name`, refusing anything that is not one (the name comes from a user's file)."""
    import diffusers  # start-up time: diffusers

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise DiffshipError(f"{path / 'config.json'} names {name!r}, which is not a diffusers model class.")
    return cls


def load_component(folder: Path, component: str, allow_pickle: bool = False) -> torch.nn.Module:
    """Load `component` (the denoiser, vae, text_encoder, text_encoder_2, a ControlNet) in FP32 eval mode, strictly."""
    quiet_libraries()

    if is_compressed(folder / component):  # only a denoiser is ever stored compressed
        return load_compressed(folder / component, allow_pickle)
    check_weight_files(folder, component, allow_pickle)
    class_name = (read_model_index(folder).get(component) or [None, None])[1]
    return load_folder(folder / component, component, class_name, allow_pickle)


def load_folder(path: Path, component: str, class_name: str | None = None, allow_pickle: bool = False,
                dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load one module saved by `save_pretrained` at `path` (a diffusers model, the class its config.json names, or
    the CLIP text encoder `class_name`) in `dtype`, eval mode, failing on any missing, unexpected or mismatched
    weight."""
    quiet_libraries()
    use_safetensors = None if allow_pickle else True
    try:
        if diffusers_class := read_json(path / "config.json").get("_class_name"):  # diffusers writes it in each
            cls = diffusers_model_class(diffusers_class, path)
            model, info = cls.from_pretrained(path, output_loading_info=True, use_safetensors=use_safetensors,
                                              torch_dtype=dtype, low_cpu_mem_usage=True)
        else:
            import transformers  # start-up time: transformers

            if class_name not in TEXT_ENCODER_CLASSES:
                raise DiffshipError(f"{path} holds a {class_name}; diffship loads CLIP and T5 text encoders "
                                    f"({', '.join(TEXT_ENCODER_CLASSES)}).")
            cls = getattr(transformers, class_name)
            model, info = cls.from_pretrained(path, output_loading_info=True, use_safetensors=use_safetensors,
                                              dtype=dtype)
    except DiffshipError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise DiffshipError(f"Could not load {path}: {exc}") from exc
    except Exception as exc:  # the libraries build the module from config.json: a wrong type fails anywhere inside
        detail = " ".join(str(exc).split())
        raise DiffshipError(f"Could not build the {component} from {path / 'config.json'}: {type(exc).__name__}: "
                            f"{detail}. Check the config's values and types.") from exc
    check_loading_info(info, str(path))
    model.eval().requires_grad_(False)
    return model
