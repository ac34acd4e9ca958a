"""A compressed pipeline on disk: the source pipeline's folder with the denoiser replaced by the compressed one.

The denoiser's folder keeps diffusers' config.json (the model's inputs and outputs are unchanged) and adds
`diffship_compressed.json`, which says how to rebuild it:
- `structure: "diffusers"`: the weights are a normal diffusers save (safetensors), loadable anywhere;
- `structure: "module"`: pruning changed layer widths that diffusers' config cannot express, so the module is
  a torch.save pickle (`diffship_unet.pt`, named when only UNets were compressed), loaded only with allow_pickle
  (diffship's own builds allow it);
- `modelopt`: Model Optimizer's quantizer state (`modelopt_state.pth`) applied on top;
- `quanto`: optimum-quanto's quantized weights and quantization map applied on top.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffship.errors import DiffshipError
from diffship.store.cache import scratch_root, store_root

MARKER = "diffship_compressed.json"
MODULE_FILE = "diffship_unet.pt"
QUANTO_WEIGHTS = "quanto.safetensors"
QUANTO_MAP = "quanto_map.json"


def is_compressed(component_folder: Path) -> bool:
    """Whether a component folder holds a diffship-compressed module."""
    return (component_folder / MARKER).is_file()


def write_pipeline(source: Path, dest: Path, component: str, model: nn.Module, structure: nn.Module | None,
                   quantizer: str | None, record: dict[str, Any]) -> None:
    """Write `dest`: every file of `source` except the denoiser `component`'s weights, and the compressed `model`.

    `structure` is the float model the quantizer was inserted into, when pruning changed its shape (else None).
    """
    for item in source.iterdir():
        if item.name == component:
            continue
        if item.is_dir():
            shutil.copytree(item, dest / item.name)
        else:
            shutil.copy2(item, dest / item.name)
    folder = dest / component
    folder.mkdir(parents=True)
    shutil.copy2(source / component / "config.json", folder / "config.json")
    reshaped = record.get("reshaped", False)
    if reshaped:
        torch.save(structure if structure is not None else model, folder / MODULE_FILE)
    elif quantizer is None:
        model.save_pretrained(folder)
    if quantizer == "modelopt":
        from diffship.compress.qat import STATE_FILE, save_state  # start-up time: numpy

        save_state(model, folder / STATE_FILE)
    elif quantizer == "quanto":
        from safetensors.torch import save_file  # start-up time: safetensors

        from diffship.compress.quantize import quanto_map  # start-up time: numpy

        save_file(model.state_dict(), str(folder / QUANTO_WEIGHTS))
        (folder / QUANTO_MAP).write_text(json.dumps(quanto_map(model)), encoding="utf-8")
    meta = {"structure": "module" if reshaped else "diffusers", "quantizer": quantizer, "steps": record["steps"]}
    tmp = folder / f".{MARKER}.partial"
    tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    os.replace(tmp, folder / MARKER)


def load_compressed(component_folder: Path, allow_pickle: bool) -> nn.Module:
    """Rebuild a compressed denoiser in FP32 eval mode from what `write_pipeline` saved."""
    meta = json.loads((component_folder / MARKER).read_text(encoding="utf-8"))
    quantizer = meta.get("quantizer")
    if meta["structure"] == "module":
        # A pickle inside diffship's own cache (or its scratch folder) was written by diffship's compress stage.
        where = component_folder.resolve()
        if not allow_pickle and not any(where.is_relative_to(r.resolve()) for r in (store_root(), scratch_root())):
            raise DiffshipError(
                f"{component_folder} holds a pruned denoiser whose layer widths diffusers' config cannot express, saved "
                "as a torch pickle (it can run code when loaded). diffship's own build loads it; to load it "
                "yourself, pass --allow-pickle if you trust where it came from.")
        model = torch.load(component_folder / MODULE_FILE, weights_only=False, map_location="cpu")
    else:
        import diffusers  # start-up time: diffusers

        # diffusers writes its model class into config.json
        model_class = getattr(diffusers, json.loads((component_folder / "config.json").read_text())["_class_name"])
        if quantizer is None:
            model = model_class.from_pretrained(component_folder, torch_dtype=torch.float32)
        else:  # the quantizer's own file carries the weights: start from the architecture alone
            model = model_class.from_config(model_class.load_config(component_folder))
    if quantizer == "modelopt":
        from diffship.compress.qat import STATE_FILE, restore_state  # start-up time: numpy

        model = restore_state(model, component_folder / STATE_FILE)
    elif quantizer == "quanto":
        from safetensors.torch import load_file  # start-up time: safetensors

        from diffship.compress.quantize import requanto  # start-up time: numpy

        qmap = json.loads((component_folder / QUANTO_MAP).read_text(encoding="utf-8"))
        model = requanto(model, load_file(str(component_folder / QUANTO_WEIGHTS)), qmap)
    return model.float().eval().requires_grad_(False) if quantizer != "quanto" else model.eval().requires_grad_(False)
