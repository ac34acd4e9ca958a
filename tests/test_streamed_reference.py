"""The PyTorch reference in the memory of one block (issue 45): a component whose repeated blocks get their weights
from the folder as each is called computes the whole module's outputs bit for bit, and keeps each block's outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffship.models.components import component_specs, run_torch, wrap
from diffship.models.loading import load_component
from diffship.models.source import resolve
from diffship.models.streamed_module import StreamedComponent, repeated_blocks


@pytest.mark.parametrize(("model", "component", "blocks"), [
    ("tiny-flux", "transformer", ["transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"]),
    ("tiny-sd3", "text_encoder_3", ["encoder.block.0", "encoder.block.1"]),  # T5, its embeddings tied to `shared`
])
def test_a_streamed_component_computes_the_whole_module_holding_one_block(model: str, component: str,
                                                                          blocks: list[str]):
    source = resolve(model)
    spec = next(s for s in component_specs(source.folder) if s.module == component)
    inputs = spec.sample_inputs(1, 64, 64, seed=2)
    whole = run_torch(wrap(spec, load_component(source.folder, component)), spec, inputs)
    streamed = StreamedComponent(source.folder, component)
    assert [name for name, _ in streamed.blocks] == blocks
    holding: list[int] = []

    def real_blocks(*_) -> None:  # blocks whose weights are loaded while one runs
        holding.append(sum(any(p.untyped_storage().nbytes() > 4 for p in b.parameters()) for _, b in streamed.blocks))

    for _, block in streamed.blocks:  # after the component's own pre-hook, which loads the block
        block.register_forward_pre_hook(real_blocks)
    with streamed.block_outputs() as outputs:
        result = run_torch(wrap(spec, streamed.module), spec, inputs)
    assert all(np.array_equal(whole[k], result[k]) for k in whole)
    assert holding == [1] * len(blocks)  # one block at a time, none kept after
    assert all(p.untyped_storage().nbytes() <= 4 for _, b in streamed.blocks for p in b.parameters())
    assert list(outputs) == blocks
    # the last block's output is what the head reads: not the input, not a constant
    last = outputs[blocks[-1]]
    last = last[0] if isinstance(last, tuple) else last
    assert torch.isfinite(last).all() and last.std() > 0


def test_the_blocks_are_the_outermost_module_lists_items():
    """A UNet's down / up blocks and its middle block's layers (declaration order; outputs come in call order)."""
    module = load_component(resolve("tiny-sdxl").folder, "unet")
    names = [name for name, _ in repeated_blocks(module)]
    assert names == ["down_blocks.0", "down_blocks.1", "down_blocks.2", "up_blocks.0", "up_blocks.1", "up_blocks.2",
                     "mid_block.attentions.0", "mid_block.resnets.0", "mid_block.resnets.1"]
