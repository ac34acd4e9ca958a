"""OpenVINO's weight-only precisions, and the FP16-stored IRs of fp16 / bf16, weight by weight (issue 45: a 12B
transformer's and T5-XXL's path): the ONNX graph converted with its weights as inputs, each weight read alone from the
export's data file (FP32, or BF16 as the checkpoint stores it), compressed by NNCF on a one-layer model (or by
OpenVINO's FP16 pass on a model of the one constant) and spliced in, gives the whole-model result on the one-pass
export (the same compressed weights and, computed in f32, the same outputs), NNCF's INT4 policy included (embeddings
and the last layer at the INT8 backup)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import openvino as ov
import pytest

from diffship.exporters.pipeline import ModuleLoader, export_one
from diffship.models.builtin import BUILTINS, write_builtin
from diffship.models.components import component_specs
from diffship.models.source import resolve
from diffship.targets import CompileContext, get_target


@pytest.fixture(scope="module")
def bf16_sd3(tmp_path_factory) -> Path:
    """tiny-sd3 written as the full-size built-ins are: BF16, layer by layer."""
    folder = tmp_path_factory.mktemp("bf16") / "tiny-sd3-bf16"
    folder.mkdir()
    write_builtin(dataclasses.replace(BUILTINS["tiny-sd3"], dtype="bfloat16"), folder)
    return folder


def _compressed_kinds(xml: Path) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for op in ov.Core().read_model(str(xml)).get_ordered_ops():
        if op.get_type_name() == "Constant" and (kind := op.get_element_type().get_type_name()) in (
                "u8", "i4", "u4", "i8", "f16"):
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


@pytest.mark.parametrize(("model", "component", "stored", "precisions"), [
    # FP32 in the data file; INT4 has NNCF's policy (the backup layer) and the layout the CPU plugin needs
    ("tiny-flux", "transformer", False, ("int4-weights",)),
    pytest.param("tiny-flux", "transformer", False, ("int8-weights", "bf16"), marks=pytest.mark.slow),
    # BF16 as stored, a Cast each; SD3's patch embedding is a convolution
    pytest.param("bf16", "transformer", True, ("int8-weights", "int4-weights", "bf16"), marks=pytest.mark.slow),
    # T5: its embedding table is an INT4 backup layer
    pytest.param("bf16", "text_encoder_3", True, ("int8-weights", "int4-weights", "bf16"), marks=pytest.mark.slow),
])
def test_weight_only_compression_weight_by_weight_is_nncf_s_whole_model_result(tmp_path: Path, bf16_sd3: Path,
                                                                               model: str, component: str,
                                                                               stored: bool, precisions: tuple[str]):
    folder = bf16_sd3 if model == "bf16" else resolve(model).folder
    source = resolve(str(folder))
    spec = next(s for s in component_specs(folder) if s.module == component)
    export_one(source, spec, tmp_path / "one-pass", 17, ModuleLoader(folder, False))
    export_one(source, spec, tmp_path / "streamed", 17, ModuleLoader(folder, False), streamed=True,
               stored_weights=stored)
    target = get_target("openvino")
    inputs = spec.sample_inputs(1, 64, 64, seed=4)
    # computed in f32, the two are the same numbers; in bf16 the CPU plugin's kernels for the two weight layouts
    # (the converter had the weights to transpose, the weightless graph did not) round differently
    f32 = target.parse_options({"inference_precision": "f32", "cache_dir": ""})
    for precision in precisions:  # bf16: FP16-stored weights
        xmls = {streamed: target.compile(tmp_path / ("streamed" if streamed else "one-pass") / "model.onnx", precision,
                                         target.parse_options({"streamed": streamed, "int4_group_size": 16 if stored else 128}),
                                         tmp_path / f"{precision}-{streamed}", CompileContext(spec))
                for streamed in (False, True)}
        kinds = [_compressed_kinds(xmls[s]) for s in (False, True)]
        if precision != "bf16":  # the converter reshapes biases before the FP16 pass: the same values, other constants
            assert kinds[0] == kinds[1], (precision, kinds)
        kept = {"int4-weights": "i4", "int8-weights": "u8", "bf16": "f16"}[precision]
        assert kinds[1].get(kept, 0) > 2, kinds  # compressed for real
        if precision == "int4-weights":
            assert kinds[1].get("u8", 0) >= 1  # the backup layer(s), as NNCF's whole-model pass keeps them
        runs = [target.load(xmls[s], f32, precision).run(inputs) for s in (False, True)]
        for name in runs[0]:
            assert np.array_equal(runs[0][name], runs[1][name]), (precision, name)
