"""Writing a full-size built-in component whose weights are not held in memory at once: the module is built with
weightless parameters, each layer is given its seeded random weights, written into the current safetensors shard
and dropped again, so a 12B transformer is written in the memory of one shard.

diffusers' and transformers' `save_pretrained` need the whole module materialised first (48 GB for Flux.1's
transformer in FP32); their shard layout and index (`*-0000i-of-0000n.safetensors` + `*.safetensors.index.json`)
is kept, so the folder loads with their own `from_pretrained`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from diffship.models.weightless import tied_targets

SHARD_BYTES = 2 * 2**30


def save_streamed(module: nn.Module, folder: Path, weights_name: str, seed: int,
                  dtype: torch.dtype = torch.bfloat16, shard_bytes: int | None = None) -> int:
    """Write `module`'s weights (its parameters on `meta`, from `init_empty_weights`) into `folder` as shards named
    after `weights_name` ("model.safetensors", "diffusion_pytorch_model.safetensors") with their index; returns the
    bytes written. Each layer gets its own `reset_parameters` (the libraries' default init), other parameters
    the same rule (norm scales one, biases zero, weights U(+-1/sqrt(fan_in)))."""
    from safetensors.torch import save_file  # start-up time: safetensors

    skipped = set(tied_targets(module))  # written once, under the name the library saves
    layers = [(name, layer) for name, layer in module.named_modules() if _own_tensors(layer, name, skipped)]
    sizes = [sum(t.numel() * _size(t, dtype) for _, t in _own_tensors(layer, name, skipped)) for name, layer in layers]
    shards = _plan(sizes, shard_bytes or SHARD_BYTES)
    stem, suffix = weights_name.rsplit(".", 1)
    names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{suffix}" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    total = 0
    torch.manual_seed(seed)
    for shard, file_name in zip(shards, names, strict=True):
        tensors: dict[str, torch.Tensor] = {}
        for index in shard:
            name, layer = layers[index]
            for key, tensor in _materialise(layer, name, skipped, dtype):
                tensors[key] = tensor
                weight_map[key] = file_name
                total += tensor.numel() * tensor.element_size()
            layer.to_empty(device="meta", recurse=False)  # drop them again
        save_file(tensors, str(folder / file_name), metadata={"format": "pt"})
        del tensors
    index_name = f"{weights_name}.index.json"
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return total


def _own_tensors(layer: nn.Module, prefix: str, skipped: set[str]) -> list[tuple[str, torch.Tensor]]:
    """The layer's own parameters and persistent buffers, by their state-dict keys."""
    own = [*layer.named_parameters(recurse=False),
           *((n, b) for n, b in layer.named_buffers(recurse=False) if n not in layer._non_persistent_buffers_set)]
    keyed = [(f"{prefix}.{n}" if prefix else n, t) for n, t in own]
    return [(k, t) for k, t in keyed if k not in skipped]


def _size(tensor: torch.Tensor, dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype if tensor.is_floating_point() else tensor.dtype).element_size()


def _plan(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive layers grouped into shards of at most `limit` bytes (a larger layer alone)."""
    shards: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    return shards


def _materialise(layer: nn.Module, prefix: str, skipped: set[str],
                 dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    buffers = {n: b.clone() for n, b in layer.named_buffers(recurse=False)}  # real already: keep their values
    layer.to_empty(device="cpu", recurse=False)
    for n, b in buffers.items():
        setattr(layer, n, b)
    reset = getattr(layer, "reset_parameters", None)
    with torch.no_grad():
        if callable(reset):
            reset()
        else:
            for name, param in layer.named_parameters(recurse=False):
                _default_init(name, param)
    return [(k, t.detach().to(dtype) if t.is_floating_point() else t.detach())
            for k, t in _own_tensors(layer, prefix, skipped)]


def _default_init(name: str, param: torch.Tensor) -> None:
    """For a parameter no layer initialises (RMSNorm's scale, T5's LayerNorm, a learned embedding)."""
    if param.dim() <= 1:
        param.fill_(1.0 if name == "weight" or "scale" in name else 0.0)
    else:
        fan_in = param[0].numel()
        param.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
