"""The mobile target: ORT-format models at pinned shapes, rewritten so NNAPI and Core ML take the UNet whole, with
QNN-configured INT8 for the UNet; run here on ONNX Runtime's CPU provider and checked with onnxruntime's own mobile
usability checker (NNAPI, Core ML and QNN cannot run on this machine)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from diffship.errors import DiffshipError
from diffship.models.components import component_specs
from diffship.models.source import resolve
from diffship.targets import mobile, mobile_graph

BLOCKERS = {"Sin", "Cos", "Erf", "InstanceNormalization", "LayerNormalization", "Expand", "Where", "Equal"}


@pytest.fixture(scope="module")
def digits_mobile(digits_devices):
    """digits-sd's mobile fp32 + int8 sets (QNN INT8 calibrated on 8 captured UNet calls), built with the web ones
    (conftest)."""
    return digits_devices


def test_every_component_is_an_ort_model_with_its_operators_and_rewritten_onnx(digits_mobile):
    result, out = digits_mobile
    assert result.passed, {k: v["passed"] for k, v in result.report["sets"].items()}
    for precision in ("fp32", "int8"):
        for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
            folder = out / f"mobile-{precision}" / name
            assert {"model.ort", "model.onnx", "required_operators.config", "diffship-graph.json"} <= \
                {p.name for p in folder.iterdir()}, name
            session = ort.InferenceSession(str(folder / "model.ort"), providers=["CPUExecutionProvider"])
            assert all(all(isinstance(d, int) for d in i.shape) for i in session.get_inputs()), "pinned shapes"
            assert "ai.onnx;" in (folder / "required_operators.config").read_text()


def test_the_unets_blocking_ops_are_gone_and_nnapi_and_core_ml_take_it_whole(digits_mobile):
    result, out = digits_mobile
    model = onnx.load(str(out / "mobile-fp32" / "unet" / "model.onnx"))
    assert not {n.op_type for n in model.graph.node} & BLOCKERS
    assert mobile_graph.EMBEDDING_INPUT in {i.name for i in model.graph.input}
    usability = json.loads((out / "mobile-fp32" / "unet" / "diffship-graph.json").read_text())["usability"]
    for provider in ("NNAPI", "CoreML MLProgram"):
        u = usability[provider]
        assert u["share"] >= 0.95 and u["partitions"] <= 5 and u["verdict"] == "YES" and u["goal_met"], u
    # The report carries it, per set and component.
    runtime = result.report["sets"]["mobile-fp32"]["runtime"]["unet"]
    assert "1 partition(s), YES" in runtime["usability"]["NNAPI"]


def test_the_rewritten_graph_computes_the_export_and_the_host_embedding_matters(digits_mobile, tmp_path: Path):
    _, out = digits_mobile
    spec = next(s for s in component_specs(resolve("digits-sd").folder) if s.is_denoiser)
    export = ort.InferenceSession(str(out / "onnx" / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    runner = mobile.load(out / "mobile-fp32" / "unet" / "model.ort")
    inputs = spec.sample_inputs(2, 32, 32, seed=3)
    inputs["timestep"] = np.full_like(inputs["timestep"], 641.0)
    want = export.run(None, inputs)[0].ravel()
    got = runner.run(inputs)["out_sample"].ravel()
    assert float(want @ got / np.linalg.norm(want) / np.linalg.norm(got)) > 0.99999
    # The check can fail: another timestep's embedding gives another prediction.
    other = runner.run({**inputs, "timestep": np.full_like(inputs["timestep"], 41.0)})["out_sample"].ravel()
    assert float(want @ other / np.linalg.norm(want) / np.linalg.norm(other)) < 0.999


def test_int8_is_qnn_qdq_on_the_unet_with_uint16_activations(digits_mobile):
    result, out = digits_mobile
    record = json.loads((out / "mobile-int8" / "unet" / "diffship-graph.json").read_text())
    assert record["quantization"]["activations"] == "uint16" and record["quantization"]["calibration_calls"] == 8
    model = onnx.load(str(out / "mobile-int8" / "unet" / "model.onnx"))
    ops = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(ops) > 100
    steps = result.report["sets"]["mobile-int8"]["parity"]["denoiser_steps"]
    fp32 = result.report["sets"]["mobile-fp32"]["parity"]["denoiser_steps"]
    assert steps["passed"] and steps["min_cosine"] < fp32["min_cosine"]  # INT8 is not FP32: the check can tell
    kept = json.loads((out / "mobile-int8" / "text_encoder" / "diffship-graph.json").read_text())
    assert kept["kept"] == "fp32" and "text encoder" in kept["reason"]


def test_mobile_options_are_checked():
    assert mobile.parse_options({"int8_activations": "uint8"}).int8_activations == "uint8"
    with pytest.raises(DiffshipError, match="Unknown mobile option"):
        mobile.parse_options({"npu": True})
    with pytest.raises(DiffshipError, match="Unknown mobile int8_activations 'int4'; choose uint16 or uint8"):
        mobile.parse_options({"int8_activations": "int4"})


def test_a_component_over_2_gb_is_refused_before_it_is_loaded(tmp_path: Path):
    from diffship.errors import DiffshipError
    from diffship.models.components import component_specs
    from diffship.models.source import resolve
    from diffship.targets import CompileContext

    export = tmp_path / "unet"
    export.mkdir()
    (export / "model.onnx").write_bytes(b"")  # not even a model: loading it would fail differently
    with open(export / "model.onnx_data", "wb") as f:
        f.truncate(10_300_000_000)  # SDXL's FP32 UNet, sparse
    spec = next(s for s in component_specs(resolve("tiny-sd").folder) if s.is_denoiser)
    with pytest.raises(DiffshipError, match=r"unet is 10\.30 GB, over 2 GB: the ORT format"):
        mobile.compile(export / "model.onnx", "fp32", mobile.MobileOptions(), tmp_path / "out", CompileContext(spec))
    assert not (tmp_path / "out").exists()
