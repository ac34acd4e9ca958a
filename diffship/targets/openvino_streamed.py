"""OpenVINO's weight-only precisions (int8-weights, int4-weights, int8-hybrid's weight-only components) and its
FP16-stored IRs (fp16, bf16) for a component whose FP32 weights do not fit in memory: the ONNX graph is converted with
its external weights as inputs, then each weight is read alone from the export's data file, compressed by NNCF on a
one-layer model as its layer reads it (or stored in FP16 by OpenVINO's own pass), and spliced in.

OpenVINO's ONNX converter holds up to 1.9x the FP32 weights (openvino.py), 90 GB for a 12B transformer; here the peak
is the compressed weights (12 GB INT8, 6.5 GB INT4) and one FP32 tensor. NNCF compresses each weight on its own in
data-free weight-only modes, so this gives its whole-model result exactly, its policy included: in INT4 the
embeddings and the last layer keep the INT8 backup (tests/test_openvino_streamed.py compares both).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import openvino as ov
from onnx.external_data_helper import uses_external_data

from diffship.errors import DiffshipError
from diffship.targets.onnx_weights import StoredTensor, stored_tensor

# the layers NNCF's weight-only modes compress, and which input of each is the weight; every other constant (a bias,
# a norm's scale) stays as it is; a grouped or transposed convolution's weight is not reproduced here
WEIGHT_INPUT = {"MatMul": 1, "Gather": 0, "Convolution": 1}
NOT_HANDLED = ("GroupConvolution", "ConvolutionBackpropData")


def external_weights(onnx_path: Path) -> tuple[onnx.ModelProto, dict[str, StoredTensor]]:
    """The graph with each external initializer turned into an input of its name, and where each one's data is."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    stored: dict[str, StoredTensor] = {}
    kept = []
    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            kept.append(tensor)
            continue
        stored[tensor.name] = stored_tensor(tensor, onnx_path.parent)
        model.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model, stored


def compressed_model(onnx_path: Path, compress: dict[str, Any] | None, backup: dict[str, Any]) -> ov.Model:
    """The component's IR with every external weight compressed as NNCF's `compress_weights(**compress)` would on the
    whole model; `backup` is how it compresses the embeddings and the last layer where `compress` spares them. With
    `compress` None, every weight is stored in FP16 as `save_model(compress_to_fp16=True)` stores it (the fp16 and
    bf16 IRs), each made by that very pass on a model of the one constant."""
    import nncf  # optional: openvino

    proto, stored = external_weights(onnx_path)
    with tempfile.TemporaryDirectory(prefix=".weightless-", dir=onnx_path.parent.parent) as scratch:
        weightless = Path(scratch) / "model.onnx"
        weightless.write_bytes(proto.SerializeToString())
        model = ov.convert_model(str(weightless))
    parameters = {p.get_friendly_name(): p for p in model.get_parameters() if p.get_friendly_name() in stored}
    # a weight the export kept in 16 bits reaches its layer through a Convert to f32: the layer reads that
    outputs = {name: _upcast(p) for name, p in parameters.items()}
    readers = {name: _weight_reader(out) for name, out in outputs.items()}
    if unknown := [name for name, reader in readers.items() if reader is None]:
        raise NotStreamable(f"weights read by layers NNCF does not compress one by one: {', '.join(unknown[:3])}")
    spared = set() if compress is None else _spared(
        model, {outputs[name].get_node().get_friendly_name(): name for name in outputs}, readers, compress)
    nncf.set_log_level(40)  # one progress table per layer otherwise
    with _one_telemetry_session():
        _compress_each(model, parameters, outputs, readers, stored, spared, compress, backup)
    model.validate_nodes_and_infer_types()
    return model


@contextlib.contextmanager
def _one_telemetry_session() -> Iterator[None]:
    """NNCF sends a telemetry event per `compress_weights` call, each from a forked process that may wait 3 s
    (openvino_telemetry's GA4 backend): one call per weight made tiny-flux's INT8 2.9x slower (26 s against 9 s) and
    forked a multi-GB process hundreds of times (each fork counted again in a process tree's resident memory). The
    per-weight calls of one compile send nothing; a whole-model compile sends NNCF's one event as before."""
    from nncf.telemetry import decorator  # start-up time: nncf
    from nncf.telemetry.wrapper import NNCFTelemetryStub  # start-up time: nncf

    sender = decorator.telemetry
    decorator.telemetry = NNCFTelemetryStub()
    try:
        yield
    finally:
        decorator.telemetry = sender


def _compress_each(model: ov.Model, parameters: dict[str, Any], outputs: dict[str, ov.Output],
                   readers: dict[str, str | None], stored: dict[str, Any], spared: set[str],
                   compress: dict[str, Any] | None, backup: dict[str, Any]) -> None:
    for name, parameter in parameters.items():
        targets = list(outputs[name].get_target_inputs())
        value = stored[name].read()
        if value.dtype.itemsize == 2 and value.dtype.kind != "i":  # BF16 / FP16 as stored: its exact FP32 value
            value = value.astype(np.float32)
        settings = backup if name in spared else compress
        if settings is None:  # FP16 storage
            weight = _half(value) if value.dtype == np.float32 else ov.op.Constant(value).output(0)
        elif readers[name] == "constant":
            weight = ov.op.Constant(value).output(0)
        elif readers[name] == "MatMul" and value.ndim == 2 and not _attribute(targets, "transpose_b"):
            # laid out [out, in] with transpose_b, as the converter lays out a constant weight: NNCF then groups
            # along the last axis, and the CPU plugin compiles the result (a [1, in, out] INT4 weight it does not)
            value = np.ascontiguousarray(value.T)
            weight = _compressed(value.astype(np.float32, copy=False), targets[0].get_node(), settings, True)
            for target in targets:
                _transposed_b(target.get_node(), weight)
            targets = []
        else:
            weight = _compressed(value.astype(np.float32, copy=False), targets[0].get_node(), settings)
        for target in targets:
            target.replace_source_output(weight)
        model.remove_parameter(parameter)
        del value


def _half(value: np.ndarray) -> ov.Output:
    """`value` as `save_model(compress_to_fp16=True)` stores it: an FP16 constant and a Convert marked as
    decompression, which the CPU plugin keeps compressed. The mark cannot be set from Python, so the pass itself
    makes it, on a model of this one constant written and read back."""
    with tempfile.TemporaryDirectory(prefix=".fp16-") as scratch:
        xml = Path(scratch) / "one.xml"
        ov.save_model(ov.Model([ov.opset13.result(ov.op.Constant(value))], []), str(xml), compress_to_fp16=True)
        one = ov.Core().read_model(str(xml))
        # the constant's bytes live in the .bin, which goes with the folder: bring them into memory first
        result = one.get_results()[0].input(0).get_source_output()
        node = result.get_node()
        if node.get_type_name() == "Convert":
            half = ov.op.Constant(node.input(0).get_source_output().get_node().get_data().copy())
            node.input(0).replace_source_output(half.output(0))
        else:  # kept in FP32 by the pass (out of FP16's range)
            result = ov.op.Constant(node.get_data().copy()).output(0)
    return result


def _attribute(targets: list[ov.Input], name: str) -> bool:
    return bool(targets[0].get_node().get_attributes()[name])


def _transposed_b(reader: ov.Node, weight: ov.Output) -> None:
    """Put a MatMul reading `weight` ([out, in]) transposed in place of `reader`, its name and output names kept."""
    new = ov.opset13.matmul(reader.input(0).get_source_output(), weight, reader.get_attributes()["transpose_a"], True)
    new.set_friendly_name(reader.get_friendly_name())
    names = reader.output(0).get_names()
    reader.output(0).replace(new.output(0))
    new.output(0).get_tensor().set_names(names)


class NotStreamable(DiffshipError):
    """A graph this path cannot compress weight by weight (the caller compiles it whole)."""


def _upcast(parameter: ov.Node) -> ov.Output:
    """The output layers read a weight from: the parameter's, or its only reader's where that is a Convert."""
    targets = list(parameter.output(0).get_target_inputs())
    if len(targets) == 1 and (node := targets[0].get_node()).get_type_name() == "Convert":
        return node.output(0)
    return parameter.output(0)


def _weight_reader(weight: ov.Output) -> str | None:
    """"MatMul" or "Gather" for a weight NNCF compresses (every reader of that one kind, reading it as its weight),
    "constant" for one it leaves alone, None for one this path cannot reproduce."""
    targets = list(weight.get_target_inputs())
    kinds = {(t.get_node().get_type_name(), t.get_index()) for t in targets}
    weights = {kind for kind in kinds if WEIGHT_INPUT.get(kind[0]) == kind[1]}
    if any(kind[0] in NOT_HANDLED for kind in kinds) or (weights and len(kinds) > 1):
        return None
    return weights.pop()[0] if weights else "constant"


def _spared(model: ov.Model, weight_of: dict[str, str], readers: dict[str, str | None],
            compress: dict[str, Any]) -> set[str]:
    """The weights NNCF gives the backup mode unless `all_layers`: embeddings and the last weighted MatMul.
    `weight_of` names the weight behind each node layers read weights from (a parameter, or its Convert)."""
    import nncf  # optional: openvino

    if compress.get("all_layers") or compress["mode"] not in (nncf.CompressWeightsMode.INT4_SYM,
                                                             nncf.CompressWeightsMode.INT4_ASYM):
        return set()
    matmuls = [weight_of.get(op.input(1).get_source_output().get_node().get_friendly_name())
               for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"]
    weighted = [name for name in matmuls if name is not None and readers.get(name) == "MatMul"]
    return {name for name, kind in readers.items() if kind == "Gather"} | set(weighted[-1:])


def _compressed(value: np.ndarray, reader: ov.Node, settings: dict[str, Any], transpose_b: bool | None = None
                ) -> ov.Output:
    """NNCF's compressed form of `value` as `reader` reads it (a MatMul's with `transpose_b` if given), made on a
    model of that one layer."""
    import nncf  # optional: openvino

    kind = reader.get_type_name()
    if kind == "MatMul":
        rank = reader.get_input_partial_shape(0).rank.get_length()
        x = ov.opset13.parameter(ov.PartialShape([-1] * rank), ov.Type.f32)
        attributes = reader.get_attributes()
        layer = ov.opset13.matmul(x, ov.op.Constant(value), attributes["transpose_a"],
                                  attributes["transpose_b"] if transpose_b is None else transpose_b)
        weight_input = 1
    elif kind == "Convolution":  # a patch embedding
        x = ov.opset13.parameter(ov.PartialShape([-1] * reader.get_input_partial_shape(0).rank.get_length()),
                                 ov.Type.f32)
        a = reader.get_attributes()
        layer = ov.opset13.convolution(x, ov.op.Constant(value), a["strides"], a["pads_begin"], a["pads_end"],
                                       a["dilations"], a["auto_pad"].upper())
        weight_input = 1
    else:  # Gather: an embedding table
        x = ov.opset13.parameter(ov.PartialShape([-1, -1]), ov.Type.i64)
        axis = reader.input(2).get_source_output().get_node().get_data()
        layer = ov.opset13.gather(ov.op.Constant(value), x, ov.op.Constant(np.asarray(axis)))
        weight_input = 0
    four_bits = settings["mode"] in (nncf.CompressWeightsMode.INT4_SYM, nncf.CompressWeightsMode.INT4_ASYM)
    # the one layer would be the model's "last" one: NNCF is told it is not spared (`_spared` decided that)
    one = nncf.compress_weights(ov.Model([layer.output(0)], [x]), **settings, **({"all_layers": True} if four_bits else {}))
    compressed = next(op for op in one.get_ordered_ops() if op.get_type_name() == kind)
    return compressed.input(weight_input).get_source_output()
