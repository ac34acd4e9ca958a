"""A component that runs in the memory of one block: its repeated blocks' weights are read from the folder's
safetensors as each block is called and dropped when it returns.

This is the PyTorch reference for models whose weights do not fit (a 12B transformer is 48 GB in FP32): the forward is
the library's own, each block fed the previous block's real outputs, so the result is the whole module's, bit for bit.
Each block's outputs can be kept as it runs (`BlockOutputs`): the per-block parity of a streamed validation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffship.host.memory import budget
from diffship.models.compressed import is_compressed
from diffship.models.loading import load_component
from diffship.models.weightless import WeightFiles, fp32_bytes_or_none, parameter_keys, weightless_component

# A reference component runs block by block when its FP32 weights exceed this share of the memory budget (80 % of
# the machine's by default): T5-XXL (19 GB) and a 12B transformer (48 GB) on 24 GiB, not SDXL's UNet (10.3 GB) or
# SD3.5-medium's MMDiT (9 GB).
STREAMED_SHARE = 0.6


def repeated_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The items of the outermost `ModuleList`s, by name, in declaration order: a transformer's blocks, T5's layers,
    a UNet's down / up blocks and its middle block's layers."""
    blocks: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, node: nn.Module) -> None:
        for name, child in node.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, nn.ModuleList):
                blocks.extend((f"{full}.{i}", item) for i, item in enumerate(child))
            else:
                visit(full, child)

    visit("", module)
    return blocks


class StreamedComponent:
    """`component` of the pipeline at `folder`, weightless but for what lies outside its repeated blocks; each block
    gets its weights (FP32) for the length of its call."""

    def __init__(self, folder: Path, component: str):
        self.module = weightless_component(folder, component)
        self.files = WeightFiles.of(folder / component)
        self.keys = parameter_keys(self.module, self.module, set(self.files.files))
        self.blocks = repeated_blocks(self.module)
        self.outputs: dict[str, Any] | None = None
        in_blocks = tuple(f"{name}." for name, _ in self.blocks)
        self._load([key for key in self.keys if not key.startswith(in_blocks)])
        for name, block in self.blocks:
            block.register_forward_pre_hook(lambda _m, _a, name=name: self._enter(name))
            block.register_forward_hook(lambda _m, _a, out, name=name: self._leave(name, out))
        self._stand_ins: dict[str, dict[str, torch.Tensor]] = {}

    def _load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Give the tensors named `keys` their values from the folder; return what they replaced."""
        replaced: dict[str, torch.Tensor] = {}
        for key in keys:
            owner_name, _, attr = key.rpartition(".")
            owner = self.module.get_submodule(owner_name)
            value = self.files.tensor(self.keys[key])
            replaced[key] = getattr(owner, attr)
            if attr in owner._parameters:
                owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
            else:
                owner._buffers[attr] = value
        return replaced

    def _enter(self, name: str) -> None:
        prefix = f"{name}."
        self._stand_ins[name] = self._load([key for key in self.keys if key.startswith(prefix)])

    def _leave(self, name: str, output: Any) -> None:
        for key, stand_in in self._stand_ins.pop(name).items():
            owner_name, _, attr = key.rpartition(".")
            owner = self.module.get_submodule(owner_name)
            (owner._parameters if attr in owner._parameters else owner._buffers)[attr] = stand_in
        if self.outputs is not None:
            self.outputs[name] = _detached(output)

    @contextmanager
    def block_outputs(self) -> Iterator[dict[str, Any]]:
        """`with component.block_outputs() as outputs:` each block's outputs (tensors, tuples of them) by name, for
        the calls made inside."""
        self.outputs = {}
        try:
            yield self.outputs
        finally:
            self.outputs = None


def _detached(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    if isinstance(output, tuple | list):
        return type(output)(_detached(o) for o in output)
    return output


def streams_reference(setting: bool | str, folder: Path, component: str) -> bool:
    """Whether the PyTorch reference of `component` runs block by block: the recipe's `[validation]
    streamed_reference`, or for "auto" whether its FP32 weights exceed STREAMED_SHARE of memory. Only safetensors
    weights of a component with repeated blocks stream."""
    path = folder / component
    if setting is False or is_compressed(path) or not any(path.glob("*.safetensors")):
        return False
    if setting == "auto":
        weights = fp32_bytes_or_none(path)
        return weights is not None and weights > STREAMED_SHARE * budget()
    return True


def reference_component(folder: Path, component: str, allow_pickle: bool, setting: bool | str = "auto") -> nn.Module:
    """The PyTorch module of `component` for the baseline: loaded whole, or streamed block by block (its weights read
    at each call) when `streams_reference` says so."""
    if streams_reference(setting, folder, component) and repeated_blocks(weightless_component(folder, component)):
        return StreamedComponent(folder, component).module
    return load_component(folder, component, allow_pickle)
