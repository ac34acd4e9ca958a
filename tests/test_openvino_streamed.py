"""OpenVINO's weight-only precisions weight by weight (issue 45: a 12B transformer's path): the ONNX graph converted
with its weights as inputs, each weight read alone from the export's data file, compressed by NNCF on a one-layer
model and spliced in, gives NNCF's whole-model result (the same compressed weights and, computed in f32, the same
outputs), its INT4 policy included (embeddings and the last layer at the INT8 backup)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import pytest

from diffship.exporters.pipeline import ModuleLoader, export_one
from diffship.models.components import component_specs
from diffship.models.source import resolve
from diffship.targets import CompileContext, get_target


def _constants(xml: Path) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for op in ov.Core().read_model(str(xml)).get_ordered_ops():
        if op.get_type_name() == "Constant":
            kinds[op.get_element_type().get_type_name()] = kinds.get(op.get_element_type().get_type_name(), 0) + 1
    return kinds


@pytest.mark.parametrize(("model", "component"), [("tiny-flux", "transformer"), ("tiny-sd3", "text_encoder_3")])
def test_weight_only_compression_weight_by_weight_is_nncf_s_whole_model_result(tmp_path: Path, model: str,
                                                                               component: str):
    source = resolve(model)
    spec = next(s for s in component_specs(source.folder) if s.module == component)
    # streamed, so every weight is in the data file (a one-pass export of a tiny model keeps them inline)
    export_one(source, spec, tmp_path / "onnx", 17, ModuleLoader(source.folder, False), streamed=True)
    target = get_target("openvino")
    inputs = spec.sample_inputs(1, 64, 64, seed=4)
    for precision in ("int8-weights", "int4-weights"):
        xmls = {}
        for streamed in (False, True):
            options = target.parse_options({"streamed": streamed, "int4_group_size": 16})
            xmls[streamed] = target.compile(tmp_path / "onnx" / "model.onnx", precision, options,
                                            tmp_path / f"{precision}-{streamed}", CompileContext(spec))
        # the compressed weights, their scales and zero points alike (the float / index constants of shape
        # arithmetic differ: the converter folds less where weights were inputs; the CPU plugin folds the rest)
        kinds = [{k: v for k, v in _constants(xmls[s]).items() if k in ("u8", "i4", "u4", "i8", "f16")}
                 for s in (False, True)]
        assert kinds[0] == kinds[1], (precision, kinds)
        assert kinds[1].get("i4" if precision == "int4-weights" else "u8", 0) > 2, kinds  # compressed for real
        if precision == "int4-weights":
            assert kinds[1].get("u8", 0) >= 1  # the backup layer(s), as NNCF's whole-model pass keeps them
        # computed in f32, the two are the same numbers; in bf16 the CPU plugin's kernels for the two weight layouts
        # (the converter had the weights to transpose, the weightless graph did not) round differently
        f32 = target.parse_options({"inference_precision": "f32", "cache_dir": ""})
        runs = [target.load(xmls[s], f32, precision).run(inputs) for s in (False, True)]
        for name in runs[0]:
            assert np.array_equal(runs[0][name], runs[1][name]), (precision, name)
