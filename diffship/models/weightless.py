"""A component built from its config.json with weightless parameters, and where its real weights lie on disk.

A streamed export (exporters/streamed.py) traces such a module: every parameter is a distinct scalar expanded to its
shape (no memory behind it), so a 12B transformer traces in the memory of its activations, and its weights are then
copied from the folder's safetensors into the ONNX data file one tensor at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffship.errors import DiffshipError
from diffship.models.families import read_model_index
from diffship.models.loading import TEXT_ENCODER_CLASSES, diffusers_model_class, quiet_libraries
from diffship.store.artifacts import read_json


def weightless_component(folder: Path, component: str) -> nn.Module:
    """`component` of the pipeline at `folder` built from its config, in eval mode, each parameter a distinct
    scalar expanded to its shape (ties kept: a parameter shared by two modules stays one); buffers are real."""
    from accelerate import init_empty_weights  # start-up time: accelerate

    quiet_libraries()
    path = folder / component
    with init_empty_weights(include_buffers=False):  # parameters on `meta`, buffers computed as usual
        if name := read_json(path / "config.json").get("_class_name"):
            cls = diffusers_model_class(name, path)
            module = cls.from_config(cls.load_config(path))
        else:
            import transformers  # start-up time: transformers

            class_name = (read_model_index(folder).get(component) or [None, None])[1]
            if class_name not in TEXT_ENCODER_CLASSES:
                raise DiffshipError(f"{path} holds a {class_name}; diffship loads CLIP and T5 text encoders "
                                    f"({', '.join(TEXT_ENCODER_CLASSES)}).")
            cls = getattr(transformers, class_name)
            module = cls(cls.config_class.from_pretrained(path))
    stand_ins: dict[int, nn.Parameter] = {}
    for _, owner in list(module.named_modules(remove_duplicate=False)):
        for name, param in list(owner.named_parameters(recurse=False)):
            if id(param) not in stand_ins:
                # distinct values: the exporter merges initializers that are equal, and these become graph inputs
                value = torch.full((1,), float(len(stand_ins) + 1), dtype=torch.float32)
                stand_ins[id(param)] = nn.Parameter(value.expand(param.shape), requires_grad=False)
            setattr(owner, name, stand_ins[id(param)])
    return module.eval()


@dataclass(frozen=True)
class WeightFiles:
    """Which safetensors file of a component folder holds each tensor (the index, or every file's header)."""

    folder: Path
    files: dict[str, Path]

    @classmethod
    def of(cls, path: Path) -> WeightFiles:
        index = sorted(path.glob("*.safetensors.index.json"))
        if index:
            weight_map = json.loads(index[0].read_text(encoding="utf-8"))["weight_map"]
            return cls(path, {key: path / name for key, name in weight_map.items()})
        files: dict[str, Path] = {}
        for file in sorted(path.glob("*.safetensors")):
            if file.name.count(".") > 1:  # a variant (`*.fp16.safetensors`): the folder's default weights are others
                continue
            for key in _header(file):
                files[key] = file
        if not files:
            raise DiffshipError(f"{path} has no safetensors weights to stream (a streamed export reads only those).")
        return cls(path, files)

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor, read alone, floating point in FP32 (as the one-pass export loads every weight)."""
        tensor = self.stored(key)
        return tensor.to(torch.float32) if tensor.is_floating_point() else tensor

    def stored(self, key: str) -> torch.Tensor:
        """One tensor, read alone, in the dtype it is stored in."""
        from safetensors import safe_open  # start-up time: safetensors

        with safe_open(str(self.files[key]), framework="pt") as f:
            return f.get_tensor(key)

    def fp32_bytes(self) -> int:
        """What the component's weights take in FP32."""
        total = 0
        for file in set(self.files.values()):
            for entry in _header(file).values():
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                total += 4 * count
        return total


def _header(file: Path) -> dict[str, dict]:
    try:
        with file.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= file.stat().st_size - 8:  # a damaged file's first bytes read as any length
                raise ValueError(f"its header length {size} does not fit in the file")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as exc:
        raise DiffshipError(f"{file} is not a readable safetensors file ({exc}).") from exc
    if not isinstance(header, dict):
        raise DiffshipError(f"{file} is not a readable safetensors file (its header is not a table).")
    header.pop("__metadata__", None)
    return header


def fp32_bytes_or_none(path: Path) -> int | None:
    """A component folder's weights in FP32, or None where its safetensors cannot be read (a damaged folder: the
    stage that loads it says what is wrong)."""
    try:
        return WeightFiles.of(path).fp32_bytes()
    except DiffshipError:
        return None


def parameter_keys(wrapper: nn.Module, module: nn.Module, available: set[str]) -> dict[str, str]:
    """For each name in `wrapper`'s state dict (what a parameter-less export names its inputs), the key of the same
    tensor among `available` (the folder's keys, named from `module`): tied tensors resolve to whichever name the
    file kept."""
    aliases: dict[int, list[str]] = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        aliases.setdefault(id(tensor), []).append(key)
    for owner_name, owner in module.named_modules(remove_duplicate=False):  # tied names state_dict leaves out
        for name, param in owner.named_parameters(recurse=False):
            full = f"{owner_name}.{name}" if owner_name else name
            if full not in aliases.setdefault(id(param), []):
                aliases[id(param)].append(full)
    tied = tied_targets(module)
    keys: dict[str, str] = {}
    for name, tensor in wrapper.state_dict(keep_vars=True).items():
        names = aliases.get(id(tensor), [])
        found = [key for key in (*names, *(tied[n] for n in names if n in tied)) if key in available]
        if found:
            keys[name] = found[0]
    return keys


def tied_targets(module: nn.Module) -> dict[str, str]:
    """Tensors transformers ties only when it loads weights, target -> source (T5's encoder embeddings -> `shared`):
    its files hold the source alone."""
    tied = getattr(module, "_tied_weights_keys", None)
    config = getattr(module, "config", None)
    return dict(tied) if isinstance(tied, dict) and getattr(config, "tie_word_embeddings", False) else {}
