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


def test_per_block_parity_finds_the_block_where_the_graph_departs(model_copy, tmp_path):
    """tiny-flux's transformer exported, then one weight of its last single block changed in the folder the PyTorch
    chain reads: the blocks before it match the graph's tensors at their boundaries (ONNX Runtime and OpenVINO, by
    the export's node scopes), that block is the first to fail, and so does the final output."""
    import openvino

    from diffship.exporters.pipeline import ModuleLoader, export_one
    from diffship.targets import get_target
    from diffship.validation.blocks import block_parity, boundary_tensors, reference_chain

    folder = model_copy("tiny-flux")
    spec = next(s for s in component_specs(folder) if s.module == "transformer")
    export_one(resolve(str(folder)), spec, tmp_path / "onnx", 17, ModuleLoader(folder, False))
    onnx_path = tmp_path / "onnx" / "model.onnx"
    (tmp_path / "ov").mkdir()
    openvino.save_model(openvino.convert_model(str(onnx_path)), str(tmp_path / "ov" / "model.xml"), compress_to_fp16=False)
    inputs = spec.sample_inputs(1, 64, 64, seed=5)
    blocks = ["transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"]
    taps = boundary_tensors(onnx_path, blocks)
    assert all(taps[b] for b in blocks)
    names = [t for ts in taps.values() for t in ts]
    runners = {"onnxruntime": get_target("onnxruntime").load_tapped(onnx_path, None, "fp32", names),
               "openvino": get_target("openvino").load_tapped(tmp_path / "ov" / "model.xml", None, "fp32", names)}
    chain = reference_chain(StreamedComponent(folder, "transformer"), spec, inputs)
    for target, runner in runners.items():
        result = block_parity(chain, runner, taps, 0.9999)
        assert result["passed"] and [r["block"] for r in result["blocks"]] == blocks, (target, result)
        assert result["min_cosine"] > 0.99999

    from safetensors.torch import load_file, save_file

    path = next((folder / "transformer").glob("*.safetensors"))
    state = load_file(str(path))
    state["single_transformer_blocks.1.proj_out.weight"] *= -1
    save_file(state, str(path))
    chain = reference_chain(StreamedComponent(folder, "transformer"), spec, inputs)
    for target, runner in runners.items():
        result = block_parity(chain, runner, taps, 0.9999)
        assert not result["passed"] and result["first_failing_block"] == "single_transformer_blocks.1", target
        assert [r["status"] for r in result["blocks"]] == ["pass", "pass", "fail"], target
        assert result["final"]["out_sample"]["cosine"] < 0.9999, target


def test_a_baseline_whose_modules_run_block_by_block_draws_the_same_image():
    """[validation] streamed_reference: the diffusers pipeline over streamed modules (T5-XXL's and a 12B
    transformer's way on 24 GiB, forced here on tiny-flux) draws the image of the pipeline loaded whole."""
    from diffship.models.streamed_module import streams_reference
    from diffship.validation.baseline import load_baseline, run_baseline

    folder = resolve("tiny-flux").folder
    assert not streams_reference("auto", folder, "transformer") and streams_reference(True, folder, "transformer")
    images = []
    for streamed in (False, True):
        pipe = load_baseline(folder, streamed=streamed)
        assert (pipe.transformer.transformer_blocks[0].attn.to_q.weight.untyped_storage().nbytes() <= 4) == streamed
        images.append(run_baseline(pipe, "a red bicycle", None, 64, 64, 3, 3.5, 0, None).images[0])
    assert np.array_equal(images[0], images[1])
    other = run_baseline(load_baseline(folder), "a red bicycle", None, 64, 64, 3, 3.5, 1, None).images[0]
    assert not np.array_equal(images[0], other)


@pytest.mark.slow
def test_per_block_parity_taps_nested_blocks(tmp_path):
    """T5's layers sit under `encoder.block`: their scopes in the export are `/encoder/block.N/`."""
    from diffship.exporters.pipeline import ModuleLoader, export_one
    from diffship.targets import get_target
    from diffship.validation.blocks import block_parity, boundary_tensors, reference_chain

    source = resolve("tiny-sd3")
    spec = next(s for s in component_specs(source.folder) if s.module == "text_encoder_3")
    export_one(source, spec, tmp_path / "onnx", 17, ModuleLoader(source.folder, False))
    reference = StreamedComponent(source.folder, "text_encoder_3")
    taps = boundary_tensors(tmp_path / "onnx" / "model.onnx", [name for name, _ in reference.blocks])
    assert all(taps.values()), taps
    runner = get_target("onnxruntime").load_tapped(tmp_path / "onnx" / "model.onnx", None, "fp32",
                                                   [t for names in taps.values() for t in names])
    result = block_parity(reference_chain(reference, spec, spec.sample_inputs(1, 64, 64, seed=3)), runner, taps, 0.9999)
    assert result["passed"] and [r["status"] for r in result["blocks"]] == ["pass", "pass"], result
