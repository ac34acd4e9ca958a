"""ONNX Runtime's dynamic INT8 of a text encoder one MatMul at a time (issue 45: T5-XXL's 19 GB): each MatMul
quantized by quantize_dynamic on a model of that one MatMul and spliced in, its weight read alone from the export's
data file, computes what quantize_dynamic on the whole one-pass export does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxruntime.quantization import QuantType, quantize_dynamic

from diffship.exporters.pipeline import ModuleLoader, export_one
from diffship.models.components import component_specs
from diffship.models.source import resolve
from diffship.targets import CompileContext, get_target


def test_t5_quantized_one_matmul_at_a_time_is_quantize_dynamic_s_result(tmp_path: Path):
    source = resolve("tiny-sd3")
    spec = next(s for s in component_specs(source.folder) if s.module == "text_encoder_3")
    export_one(source, spec, tmp_path / "one-pass", 17, ModuleLoader(source.folder, False))
    export_one(source, spec, tmp_path / "streamed", 17, ModuleLoader(source.folder, False), streamed=True)
    (tmp_path / "whole").mkdir()
    quantize_dynamic(tmp_path / "one-pass" / "model.onnx", tmp_path / "whole" / "model.onnx",
                     op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
    target = get_target("onnxruntime")
    xml = target.compile(tmp_path / "streamed" / "model.onnx", "int8", target.parse_options({"streamed": True}),
                         tmp_path / "int8", CompileContext(spec))
    graph = onnx.load(str(xml), load_external_data=False).graph
    integer = [n for n in graph.node if n.op_type == "MatMulInteger"]
    whole = onnx.load(str(tmp_path / "whole" / "model.onnx")).graph
    assert len(integer) == len([n for n in whole.node if n.op_type == "MatMulInteger"]) > 4
    weights = {t.name for t in graph.initializer}
    assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]  # every weight quantized
    inputs = spec.sample_inputs(1, 64, 64, seed=2)
    feed = {t.name: inputs[t.name] for t in spec.inputs}
    runs = [ort.InferenceSession(str(path)).run(None, feed)
            for path in (tmp_path / "whole" / "model.onnx", xml, tmp_path / "one-pass" / "model.onnx")]
    assert all(np.array_equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(runs[0], runs[2], strict=True))  # INT8 for real: not the FP32 numbers


@pytest.mark.slow
def test_weights_kept_in_bf16_are_quantized_by_default_as_the_fp32_export_s_are(tmp_path: Path):
    """quantize_dynamic itself passes weights read through a Cast by (constant weights only): "auto" sends such an
    export one MatMul at a time, which quantizes them as quantize_dynamic does the FP32 export's."""
    import dataclasses

    from diffship.models.builtin import BUILTINS, write_builtin

    folder = tmp_path / "tiny-sd3-bf16"
    folder.mkdir()
    write_builtin(dataclasses.replace(BUILTINS["tiny-sd3"], dtype="bfloat16"), folder)
    source = resolve(str(folder))
    spec = next(s for s in component_specs(folder) if s.module == "text_encoder_3")
    export_one(source, spec, tmp_path / "one-pass", 17, ModuleLoader(folder, False))
    export_one(source, spec, tmp_path / "stored", 17, ModuleLoader(folder, False), streamed=True, stored_weights=True)
    (tmp_path / "whole").mkdir()
    quantize_dynamic(tmp_path / "one-pass" / "model.onnx", tmp_path / "whole" / "model.onnx",
                     op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
    target = get_target("onnxruntime")
    xml = target.compile(tmp_path / "stored" / "model.onnx", "int8", target.parse_options({}), tmp_path / "int8",
                         CompileContext(spec))
    assert sum(n.op_type == "MatMulInteger" for n in onnx.load(str(xml), load_external_data=False).graph.node) > 4
    inputs = spec.sample_inputs(1, 64, 64, seed=2)
    feed = {t.name: inputs[t.name] for t in spec.inputs}
    runs = [ort.InferenceSession(str(path)).run(None, feed) for path in (tmp_path / "whole" / "model.onnx", xml)]
    assert all(np.array_equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))


def test_a_session_keeps_16_bit_weights_stored_where_fp32_would_crowd_the_budget(tmp_path: Path):
    """ONNX Runtime's constant folding upcasts every weight behind a Cast at load (T5-XXL: 9.5 GB stored, 19 GB
    folded); where that FP32 form would take half the memory budget, the session keeps them stored and casts per
    call, computing the same outputs."""
    import dataclasses

    from diffship.host.memory import memory_limit
    from diffship.models.builtin import BUILTINS, write_builtin
    from diffship.targets.ort_session import OrtOptions, OrtRunner

    folder = tmp_path / "tiny-sd3-bf16"
    folder.mkdir()
    write_builtin(dataclasses.replace(BUILTINS["tiny-sd3"], dtype="bfloat16"), folder)
    spec = next(s for s in component_specs(folder) if s.module == "text_encoder_3")
    export_one(resolve(str(folder)), spec, tmp_path / "stored", 17, ModuleLoader(folder, False), streamed=True,
               stored_weights=True)
    path = tmp_path / "stored" / "model.onnx"
    feed = spec.sample_inputs(2, 64, 64, seed=1)
    runners = {}
    for gib in (64.0, 1e-4):
        with memory_limit(gib):
            runners[gib] = OrtRunner(path, OrtOptions())
    folded, kept = runners[64.0], runners[1e-4]
    assert not folded.kept_stored and folded.describe().details["disabled_optimizers"] == []
    assert kept.kept_stored and kept.describe().details["disabled_optimizers"] == ["ConstantFolding"]
    a, b = folded.run(feed)["last_hidden_state"], kept.run(feed)["last_hidden_state"]
    assert np.allclose(a, b, atol=1e-5) and np.abs(a).max() > 0.1


def test_stored_weights_upcast_one_at_a_time_compute_what_the_stored_graph_does(tmp_path: Path):
    """Static INT8 folds and quantizes the graph whole: from a stored-weights export it would hold the BF16 weights and
    their FP32 form at once (sd35m-arch's transformer: killed at 20 GiB). Written as FP32 initializers one tensor at a
    time first, the graph has no Cast left on a weight and computes what the stored graph computes."""
    import dataclasses

    from diffship.models.builtin import BUILTINS, write_builtin
    from diffship.targets.onnx_weights import fp32_bytes, upcast_bytes, upcast_stored

    folder = tmp_path / "tiny-sd3-bf16"
    folder.mkdir()
    write_builtin(dataclasses.replace(BUILTINS["tiny-sd3"], dtype="bfloat16"), folder)
    spec = next(s for s in component_specs(folder) if s.is_denoiser)
    export_one(resolve(str(folder)), spec, tmp_path / "stored", 17, ModuleLoader(folder, False), streamed=True,
               stored_weights=True)
    stored = tmp_path / "stored" / "model.onnx"
    (tmp_path / "fp32").mkdir()
    upcast = upcast_stored(stored, tmp_path / "fp32" / "model.onnx")
    assert upcast_bytes(stored) > 0 and upcast_bytes(upcast) == 0
    graph = onnx.load(str(upcast), load_external_data=False).graph
    assert not any(t.data_type == onnx.TensorProto.BFLOAT16 for t in graph.initializer)
    assert upcast_bytes(stored) <= (tmp_path / "fp32" / "model.onnx_data").stat().st_size <= fp32_bytes(stored)
    feed = spec.sample_inputs(2, 64, 64, seed=3)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graphs as written
    a, b = (ort.InferenceSession(str(p), options).run(None, feed)[0] for p in (stored, upcast))
    assert np.array_equal(a, b) and np.abs(a).max() > 0.1
