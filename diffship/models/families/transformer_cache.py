"""Block caching over diffusers' SD3Transformer2DModel and FluxTransformer2DModel, as two exportable graphs: the
transformer counterpart of deep-feature caching (`unet_cache.py`).

A diffusion transformer has no nested skip connections; its blocks run one after another on the image tokens and the
text tokens. Its first and last blocks change most from step to step; the middle ones' contribution changes slowly
(Δ-DiT, Chen et al. 2024; FORA, Selvaraju et al. 2024; diffusers' FirstBlockCache caches the same kind of residual).
At `depth` d the *caching* graph is the whole transformer, also returning what its middle blocks (all but the first d
and the last d) add to the tokens: the text and image tokens after them minus before them, concatenated along the
tokens. The *shallow* graph runs the first d blocks, adds that cached residual in place of the middle ones, and runs
the last d blocks and the output layers.

Both run the model's own forward with its block lists swapped for the part they run, so every embedding, the rotary
positions and the output projection stay diffusers' code: the shallow graph fed the caching graph's residual of the
same call returns the transformer's output exactly (tests/test_accelerations.py). Flux's blocks are its double-stream
ones followed by its single-stream ones; depth counts the first d of the former and the last d of the latter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

# each model's block lists, in the order its forward runs them
BLOCK_LISTS = {"SD3Transformer2DModel": ("transformer_blocks",),
               "FluxTransformer2DModel": ("transformer_blocks", "single_transformer_blocks")}


def _lists(transformer: nn.Module) -> tuple[str, ...]:
    return BLOCK_LISTS[type(transformer).__name__]


class _Enter(nn.Module):
    """Before the middle blocks (caching): records the text and image tokens entering them."""

    def __init__(self) -> None:
        super().__init__()
        self.entering: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.entering = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        return encoder_hidden_states, hidden_states


class _Leave(nn.Module):
    """After the middle blocks (caching): the residual they added to the tokens."""

    def __init__(self, enter: _Enter):
        super().__init__()
        self.enter, self.residual = [enter], None  # a list: not a submodule

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.residual = torch.cat([encoder_hidden_states, hidden_states], dim=1) - self.enter[0].entering
        return encoder_hidden_states, hidden_states


class _Add(nn.Module):
    """In place of the middle blocks (shallow): the cached residual added to the tokens."""

    def __init__(self, residual: torch.Tensor):
        super().__init__()
        self.residual = residual

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
        text = encoder_hidden_states.shape[1]
        return encoder_hidden_states + self.residual[:, :text], hidden_states + self.residual[:, text:]


@contextmanager
def _blocks(transformer: nn.Module, depth: int, middle: Callable[[list[nn.Module]], list[nn.Module]]) -> Iterator[None]:
    """The transformer's block lists while `middle(the middle blocks)` stands between its first and last `depth`
    blocks (Flux: the first list ends with the middle, the last holds the last `depth` single-stream blocks)."""
    names = _lists(transformer)
    every = [block for name in names for block in getattr(transformer, name)]
    head, inner, tail = every[:depth], every[depth:len(every) - depth], every[len(every) - depth:]
    lists = [[*head, *middle(inner), *tail]] if len(names) == 1 else [[*head, *middle(inner)], tail]
    for name, blocks in zip(names, lists, strict=True):
        # an instance attribute, not a registered module: the model's parameters and state stay as they are
        object.__setattr__(transformer, name, nn.ModuleList(blocks))
    try:
        yield
    finally:
        for name in names:
            transformer.__dict__.pop(name, None)


class _Cached(nn.Module):
    """Either graph at `depth` (checked against the config by `transformer.cache_features`, which declares them)."""

    def __init__(self, transformer: nn.Module, inputs: tuple[str, ...], depth: int):
        super().__init__()
        # the transformer's own inputs (the shallow graph's cached features come last, apart)
        self.transformer, self.depth = transformer, depth
        self.names = tuple(n for n in inputs if n != "cached_features")

    def _run(self, tensors: tuple[torch.Tensor, ...], middle: Callable[[list[nn.Module]], list[nn.Module]]
             ) -> torch.Tensor:
        with _blocks(self.transformer, self.depth, middle):
            return self.transformer(**dict(zip(self.names, tensors, strict=True)), return_dict=False)[0]


class CachingTransformer(_Cached):
    """The whole transformer, returning its output and the middle blocks' residual: (its inputs) -> (out_sample,
    cached_features)."""

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enter = _Enter()
        leave = _Leave(enter)
        out = self._run(tensors, lambda inner: [enter, *inner, leave])
        return out, leave.residual


class ShallowTransformer(_Cached):
    """The transformer's first and last `depth` blocks around a cached residual: (its inputs, cached_features) ->
    out_sample."""

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self._run(tensors[:-1], lambda inner: [_Add(tensors[-1])])
