import json
from pathlib import Path

import numpy as np
import pytest

from diffship.models.builtin import BUILTINS, builtin_folder, write_builtin
from diffship.models.families import detect_family
from diffship.store.artifacts import sha256_file


@pytest.mark.parametrize(("name", "family"), [("tiny-sd", "sd1"), ("tiny-sd2", "sd2"), ("tiny-sdxl", "sdxl"),
                                              ("tiny-sdxl-refiner", "sdxl-refiner")])
def test_tiny_builtins_are_small_and_detected_as_their_family(name: str, family: str):
    folder = builtin_folder(name)
    assert detect_family(folder).name == family
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 40 * 2**20


def test_builtin_weights_are_deterministic(tmp_path: Path):
    write_builtin(BUILTINS["tiny-sd"], tmp_path)
    cached = builtin_folder("tiny-sd")
    for rel in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert sha256_file(tmp_path / rel) == sha256_file(cached / rel)


def test_sd2_builtin_predicts_v_and_sdxl_builtin_has_added_conditioning():
    sd2 = json.loads((builtin_folder("tiny-sd2") / "scheduler/scheduler_config.json").read_text())
    assert sd2["prediction_type"] == "v_prediction"
    unet = json.loads((builtin_folder("tiny-sdxl") / "unet/config.json").read_text())
    assert unet["addition_embed_type"] == "text_time"


def test_full_size_builtins_have_the_real_shapes():
    # Checked from the declarations (building them takes GBs: benchmarks/ does that).
    assert BUILTINS["sd15-arch"].denoiser["block_out_channels"] == [320, 640, 1280, 1280]
    assert BUILTINS["sd15-arch"].text_encoders[0]["hidden_size"] == 768
    xl = BUILTINS["sdxl-arch"]
    assert xl.denoiser["transformer_layers_per_block"] == [1, 2, 10]
    assert xl.denoiser["projection_class_embeddings_input_dim"] == 6 * 256 + 1280
    assert xl.text_encoders[1]["num_hidden_layers"] == 32


def test_full_size_transformer_builtins_have_their_parameter_counts():
    """Counted on `meta` (no memory): SD3.5-medium's MMDiT 2.24B, FLUX.1-schnell's 11.89B (dev's 11.90B less the
    guidance embedder), T5-XXL's encoder 4.76B (its embeddings counted once)."""
    import diffusers
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    counts = {}
    for name in ("sd35m-arch", "flux-arch"):
        model = BUILTINS[name]
        with init_empty_weights():
            counts[name] = sum(p.numel() for p in getattr(diffusers, model.denoiser_class)(**model.denoiser).parameters())
    assert 2.2e9 < counts["sd35m-arch"] < 2.3e9 and 11.85e9 < counts["flux-arch"] < 11.9e9
    t5 = {k: v for k, v in BUILTINS["flux-arch"].text_encoders[1].items() if k not in ("kind", "max_length")}
    with init_empty_weights():
        encoder = T5EncoderModel(T5Config(**t5))
    assert 4.76e9 < sum(p.numel() for p in encoder.parameters()) - encoder.shared.weight.numel() < 4.77e9


def test_a_builtin_stored_in_bf16_is_written_layer_by_layer_and_loads_as_written(tmp_path: Path, monkeypatch):
    """How sd35m-arch and flux-arch are written (never whole in memory), forced on tiny-sd3 with 64 KiB shards:
    diffusers' and transformers' sharded layout, every weight loads strictly, the libraries' own init (finite,
    norms at one), and a streamed export of it computes what the one-pass export does."""
    import dataclasses

    import torch

    from diffship.models import builtin_stream
    from diffship.models.loading import load_component

    monkeypatch.setattr(builtin_stream, "SHARD_BYTES", 64 * 1024)
    folder = tmp_path / "tiny-sd3-bf16"
    folder.mkdir()
    write_builtin(dataclasses.replace(BUILTINS["tiny-sd3"], dtype="bfloat16"), folder)
    index = json.loads((folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert (folder / "text_encoder_3" / "model.safetensors.index.json").is_file()
    for component in ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"):
        state = load_component(folder, component).state_dict()
        assert all(torch.isfinite(t).all() for t in state.values()), component
        for key, tensor in state.items():
            if tensor.is_floating_point():  # written in BF16: exactly representable
                assert torch.equal(tensor, tensor.to(torch.bfloat16).float()), key
    transformer = load_component(folder, "transformer")
    assert torch.equal(transformer.transformer_blocks[0].attn.norm_q.weight, torch.ones(8))
    assert transformer.transformer_blocks[0].attn.to_q.weight.std() > 0.01
    # BF16 shards through the streamed export, kept in BF16 with a Cast each: the one-pass export's outputs
    import onnxruntime as ort

    from diffship.exporters.pipeline import ModuleLoader, export_one
    from diffship.models.components import component_specs
    from diffship.models.source import resolve

    source = resolve(str(folder))
    for spec in (s for s in component_specs(folder) if s.module in ("transformer", "text_encoder_3")):
        outputs = []
        for streamed in (False, True):
            export_one(source, spec, tmp_path / f"{spec.name}-{streamed}", 17, ModuleLoader(folder, False), streamed,
                       stored_weights=streamed)
            inputs = spec.sample_inputs(batch=1, height=64, width=64, seed=1)
            session = ort.InferenceSession(str(tmp_path / f"{spec.name}-{streamed}" / "model.onnx"))
            outputs.append(session.run(None, {t.name: inputs[t.name] for t in spec.inputs}))
        assert all(np.array_equal(a, b) for a, b in zip(*outputs, strict=True)), spec.name
        import onnx

        graph = onnx.load(str(tmp_path / f"{spec.name}-True" / "model.onnx"), load_external_data=False).graph
        kept = [t for t in graph.initializer if t.data_type == onnx.TensorProto.BFLOAT16]
        assert len(kept) > 10 and all(t.name.endswith(".stored") for t in kept)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_diffusers_loads_builtin_as_a_pipeline_and_generates(name: str):
    import diffusers

    cls = diffusers.StableDiffusionXLPipeline if name == "tiny-sdxl" else diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(builtin_folder(name))
    image = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd2", "tiny-sdxl", "tiny-sdxl-refiner"])
def test_declared_family_of_each_builtin_is_what_detection_finds(name: str):
    assert BUILTINS[name].family == detect_family(builtin_folder(name)).name
