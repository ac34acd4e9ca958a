"""LoRA files (diffusers / PEFT, kohya, LoCon) read into one form and merged into a pipeline's weights.

Reading and merging are written here rather than through diffusers' `load_lora_weights` + `fuse_lora`: that path
needs peft, and with transformers 5 peft >= 0.22 for the text encoders (the registry has 0.21.2); its key conversion
also leaves kohya files in several legacy layouts. The merge itself is linear algebra: W += scale * alpha / rank *
(B @ A), with A and B reshaped for convolutions. Every key of a file must land on a module of the pipeline; one that
does not is an error naming it, never a silent no-op. The tests check the UNet merge against diffusers + peft's.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffship.errors import DiffshipError
from diffship.models.families import detect_family
from diffship.models.flux_checkpoint import bfl_modules, in_diffusers_order, swaps_halves
from diffship.models.loading import load_component
from diffship.models.variants import link_tree
from diffship.store import cache
from diffship.store.artifacts import staged_dir

LORA_RECORD = "diffship_loras.json"  # in a merged folder: what was merged into it
REVISION = 2  # 2: merged components keep the base's config.json

DENOISER = "denoiser"  # stands for the family's denoiser component, whatever its folder is called
# file prefix -> the pipeline component it patches (kohya underscore names, diffusers / PEFT dotted names); both
# layouts write the denoiser's keys under the UNet's name
PREFIXES = (("lora_unet_", DENOISER), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
            ("lora_te_", "text_encoder"), ("unet.", DENOISER), ("transformer.", DENOISER),
            ("lora_transformer_", DENOISER), ("diffusion_model.", DENOISER), ("text_encoder_2.", "text_encoder_2"),
            ("text_encoder.", "text_encoder"))
# tensor suffix -> which matrix it is
PARTS = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_A.weight", "down"),
         (".lora_B.weight", "up"), (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
         (".lora.down.weight", "down"), (".lora.up.weight", "up"), ("_lora.down.weight", "down"),
         ("_lora.up.weight", "up"), (".alpha", "alpha"))
# diffusers' attention-processor LoRA names -> the module they patch
PROCESSOR = {"processor.to_q": "to_q", "processor.to_k": "to_k", "processor.to_v": "to_v",
             "processor.to_out": "to_out.0", "self_attn.to_q": "self_attn.q_proj", "self_attn.to_k": "self_attn.k_proj",
             "self_attn.to_v": "self_attn.v_proj", "self_attn.to_out": "self_attn.out_proj"}


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file and the scale it is merged at."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """`PATH[:SCALE]` as on the command line."""
        path, sep, scale = text.rpartition(":")
        if sep and path:
            try:
                return cls(Path(path).expanduser(), float(scale))
            except ValueError:
                pass
        return cls(Path(text).expanduser())


@dataclass
class LoraLayer:
    """One module's low-rank update: down (A, rank x in), up (B, out x rank), alpha (None: the rank)."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    keys: list[str] = field(default_factory=list)

    def delta(self, weight_shape: torch.Size) -> torch.Tensor:
        """The update to add to a weight of `weight_shape`, at scale 1."""
        rank = self.down.shape[0]
        factor = (self.alpha if self.alpha is not None else rank) / rank
        # A LoCon's down is k x k over the input channels and its up 1 x 1: the product, reshaped, is the kernel's update.
        update = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return (factor * update).reshape(weight_shape)


def check_file(path: Path, allow_pickle: bool = False) -> None:
    """A LoRA file diffship will read: present, and .safetensors unless pickles are allowed."""
    if not path.is_file():
        raise DiffshipError(f"LoRA {path} does not exist.")
    if path.suffix.lower() != ".safetensors" and not allow_pickle:
        raise DiffshipError(f"LoRA {path} is not a .safetensors file; pickle files can run code when loaded: "
                            "convert it, or pass --allow-pickle if you trust it.")


def read_lora(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file (.safetensors; pickles only when allowed)."""
    check_file(path, allow_pickle)
    if path.suffix.lower() != ".safetensors":
        return torch.load(path, map_location="cpu", weights_only=True)
    from safetensors import SafetensorError  # start-up time: safetensors
    from safetensors.torch import load_file  # start-up time: safetensors

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise DiffshipError(f"LoRA {path} is not a readable .safetensors file: {exc}") from None


def group_layers(tensors: dict[str, torch.Tensor], source: str, denoiser: str) -> dict[tuple[str, str], LoraLayer]:
    """(component, module name as written in the file) -> its layer, the denoiser's keys under its component name
    `denoiser`; unknown keys are an error."""
    layers: dict[tuple[str, str], LoraLayer] = {}
    unknown = []
    for key, tensor in tensors.items():
        component, rest = next(((c, key[len(p):]) for p, c in PREFIXES if key.startswith(p)), (None, key))
        part, module = next(((kind, rest[: -len(s)]) for s, kind in PARTS if rest.endswith(s)), (None, rest))
        if component is None or part is None:
            unknown.append(key)
            continue
        layer = layers.setdefault((denoiser if component == DENOISER else component, module), LoraLayer())
        layer.keys.append(key)
        if part == "alpha":
            layer.alpha = float(tensor)
        else:
            setattr(layer, part, tensor)
    incomplete = [k for (c, m), layer in layers.items() if layer.down is None or layer.up is None
                  for k in layer.keys]
    if unknown or incomplete:
        shown = sorted(unknown + incomplete)
        raise DiffshipError(f"LoRA {source}: {len(shown)} key(s) are not LoRA weights diffship reads (kohya "
                            "lora_down / lora_up / alpha, PEFT lora_A / lora_B, diffusers lora.down / lora.up), or lack "
                            f"their pair: {', '.join(shown[:8])}" + (" ..." if len(shown) > 8 else ""))
    return layers


def module_index(model: torch.nn.Module) -> dict[str, str]:
    """Every way a file may name one of `model`'s weighted modules -> its name: dotted, kohya's underscores, with and
    without transformers 4's `text_model.` prefix (transformers 5 dropped it), diffusers' processor names."""
    index = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            continue
        for written in (name, f"text_model.{name}"):
            index[written] = name
            index[written.replace(".", "_")] = name
    return index


def split_layer(layer: LoraLayer, widths: list[int]) -> list[LoraLayer]:
    """A fused projection's LoRA as one per projection: the same down (A) and alpha, the up (B) rows cut by the
    projections' output widths (diffusers' conversion of BFL's qkv and linear1 does the same)."""
    if sum(widths) != layer.up.shape[0]:
        raise DiffshipError(f"LoRA layer {layer.keys[0]}: its update has {layer.up.shape[0]} rows, the modules it "
                            f"stands for {sum(widths)} ({' + '.join(map(str, widths))}).")
    return [LoraLayer(layer.down, up, layer.alpha, layer.keys) for up in torch.split(layer.up, widths)]


def _resolve(written: str, index: dict[str, str]) -> str | None:
    if written in index:
        return index[written]
    for old, new in PROCESSOR.items():
        if old in written:
            candidate = re.sub(re.escape(old) + r"$", new, written)
            if candidate in index:
                return index[candidate]
    return None


def lora_targets(modules: dict[str, torch.nn.Module], spec: LoraSpec, denoiser: str,
                 allow_pickle: bool = False) -> list[tuple[str, str, LoraLayer]]:
    """(component, module name, layer) for every layer of one LoRA (`denoiser`: the family's denoiser component); a
    LoRA for a component the pipeline lacks, or with modules it does not have, is an error listing them."""
    layers = group_layers(read_lora(spec.path, allow_pickle), str(spec.path), denoiser)
    indexes = {name: module_index(module) for name, module in modules.items()}
    missing, targets = [], []
    for (component, written), layer in layers.items():
        name = _resolve(written, indexes[component]) if component in indexes else None
        fused = [indexes[component].get(m) for m in bfl_modules(written)] if name is None and component in indexes else []
        if name is not None:
            targets.append((component, name, layer))
        elif fused and None not in fused:
            if swaps_halves(written):  # diffusers' converter swaps the up matrix's halves the same way
                layer = LoraLayer(layer.down, in_diffusers_order(layer.up), layer.alpha, layer.keys)
            widths = [modules[component].get_submodule(m).weight.shape[0] for m in fused]
            targets += [(component, m, part) for m, part in zip(fused, split_layer(layer, widths), strict=True)]
        else:
            missing.append(f"{component}:{written}")
    if missing:
        matched = "none" if not targets else f"{len(targets)} of {len(layers)}"
        raise DiffshipError(f"LoRA {spec.path} does not fit this pipeline: {matched} of its layers match; no module for "
                            + ", ".join(sorted(missing)[:8]) + (" ..." if len(missing) > 8 else "")
                            + f". Components here: {', '.join(sorted(modules))}.")
    return targets


def merge(modules: dict[str, torch.nn.Module], spec: LoraSpec, denoiser: str,
          allow_pickle: bool = False) -> dict[str, int]:
    """Merge one LoRA into `modules` (component -> loaded module) in place; the count of patched layers per component."""
    targets = lora_targets(modules, spec, denoiser, allow_pickle)
    counts: dict[str, int] = {}
    with torch.no_grad():
        for component, name, layer in targets:
            weight = modules[component].get_submodule(name).weight
            try:
                weight += (spec.scale * layer.delta(weight.shape)).to(weight.dtype)
            except RuntimeError as exc:
                raise DiffshipError(f"LoRA {spec.path}: {component}:{name} has weight {tuple(weight.shape)}, the "
                                    f"LoRA's update does not fit it ({exc}).") from None
            counts[component] = counts.get(component, 0) + 1
    return counts


def with_loras(folder: Path, specs: list[LoraSpec], allow_pickle: bool = False,
               say: Callable[[str], None] | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """A cached diffusers folder holding `folder`'s pipeline with `specs` merged in order, and what was merged (file
    hashes, scales, layers per component) for the manifest. Components no LoRA touches are linked, not copied."""
    say = say or (lambda _: None)
    for spec in specs:  # before any work: a missing file or a refused pickle
        check_file(spec.path, allow_pickle)
    hashes = cache.file_hashes([s.path for s in specs])
    record = [{"path": str(s.path), "sha256": h, "scale": s.scale} for s, h in zip(specs, hashes, strict=True)]
    key = cache.key(stage="lora-merge", folder=cache.folder_hash(folder), loras=[(r["sha256"], r["scale"]) for r in record],
                    revision=REVISION)
    root = cache.scratch_root() if cache.unwritable_reason() is not None else cache.cache_root()
    merged = root / "models" / f"lora-{key[:16]}"
    if (merged / "model_index.json").is_file():
        return merged, _record(merged)
    family = detect_family(folder)
    names = [family.denoiser.component, *family.encoders_in(folder)]
    modules = {name: load_component(folder, name, allow_pickle) for name in names}
    for spec, entry in zip(specs, record, strict=True):
        say(f"Merging LoRA {spec.path.name} at scale {spec.scale:g} ...")
        entry["layers"] = merge(modules, spec, family.denoiser.component, allow_pickle)
    with cache.locked(merged, say, "LoRA merge"), staged_dir(merged, owned=True) as staging:
        touched = {c for entry in record for c in entry["layers"]}
        link_tree(folder, staging, skip=touched)
        for name in sorted(touched):
            modules[name].save_pretrained(staging / name, safe_serialization=True)
            # A merge changes weights only: keep the base's config byte for byte (save_pretrained would add the
            # base's path as `_name_or_path`), so a build with --lora equals `lora apply` on the base's build.
            (staging / name / "config.json").unlink()
            shutil.copyfile(folder / name / "config.json", staging / name / "config.json")
        (staging / LORA_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return merged, record


def _record(merged: Path) -> list[dict[str, Any]]:
    return json.loads((merged / LORA_RECORD).read_text(encoding="utf-8"))
