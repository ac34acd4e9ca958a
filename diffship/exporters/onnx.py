"""Export one component wrapper to a checked, shape-inferred ONNX file at a fixed opset.

Route: torch's TorchScript exporter (`dynamo=False`). torch 2.13's default dynamo exporter ignores
`opset_version=17`, exports at 18 and down-converts to a model ONNX Runtime rejects (Split's
`num_outputs`); the TorchScript exporter writes a valid opset-17 graph that matches PyTorch.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data
from torch import nn

from diffship import __version__
from diffship.errors import DiffshipError
from diffship.exporters import precise_norms
from diffship.exporters.streamed import StreamedWeights, attach_weights
from diffship.models.components import ComponentSpec

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
DEFAULT_OPSET = 17
SUPPORTED_OPSETS = range(14, 21)  # scaled_dot_product_attention needs 14; ONNX Runtime 1.32 runs up to 21+
ALIGNMENT = 1 << 16  # external tensors start on 64 KiB boundaries so ONNX Runtime can memory-map them


def export_component(spec: ComponentSpec, wrapper: nn.Module, folder: Path, opset: int = DEFAULT_OPSET,
                     metadata: dict[str, str] | None = None, streamed: StreamedWeights | None = None) -> Path:
    """Export `wrapper` to folder/model.onnx (+ model.onnx_data when the weights exceed protobuf's 2 GB). With
    `streamed`, `wrapper` is weightless (models/weightless.py): traced without its parameters, whose values are then
    written into model.onnx_data one tensor at a time (exporters/streamed.py)."""
    if opset not in SUPPORTED_OPSETS:
        raise DiffshipError(f"Opset {opset} is not supported; choose {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}.")
    folder.mkdir(parents=True, exist_ok=True)
    # Trace at batch 2, a small resolution and few text tokens where their axis is dynamic: a batch of 1 could be
    # specialised away, and the axes are dynamic anyway (parity checks other batches, resolutions and lengths).
    trace = spec.sample_inputs(batch=2, height=spec.vae_scale * 8, width=spec.vae_scale * 8,
                               sequence=spec.trace_sequence)
    args = tuple(torch.from_numpy(trace[t.name]) for t in spec.inputs)
    dynamic_axes = {t.name: t.dynamic_axes for t in (*spec.inputs, *spec.outputs)}
    with tempfile.TemporaryDirectory(prefix=".export-", dir=folder) as raw_dir:
        raw = Path(raw_dir) / MODEL_FILE
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad(), spec.export_patches():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(
                wrapper, args, str(raw), input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs], dynamic_axes=dynamic_axes,
                opset_version=opset, do_constant_folding=streamed is None, export_params=streamed is None,
                dynamo=False,
            )
        model = onnx.load(str(raw), load_external_data=False)
        _check_opset(model, opset)
        model.producer_name, model.producer_version = "diffship", __version__
        onnx.helper.set_model_props(model, {"diffship.component": spec.name, **(metadata or {})})
        if spec.norms_at_image_resolution and opset >= precise_norms.FIRST_OPSET:
            precise_norms.instance_norms_as_layer_norms(model)
        final = folder / MODEL_FILE
        if streamed is not None:
            attach_weights(model, streamed, folder / DATA_FILE, ALIGNMENT, _point_to)
            if unknown := [v.name for v in model.graph.input if v.name not in {t.name for t in spec.inputs}]:
                raise DiffshipError(f"A streamed export of {spec.name} found no weights in its folder for "
                                    f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}.")
        elif any(uses_external_data(t) for t in _get_all_tensors(model)):
            _gather_external_data(model, Path(raw_dir), folder / DATA_FILE)
        _save_proto(model, final)
    onnx.checker.check_model(str(final))
    # Path-based inference works for models over 2 GB; strict mode fails on any shape conflict.
    onnx.shape_inference.infer_shapes_path(str(final), str(final), strict_mode=True)
    return final


def _check_opset(model: onnx.ModelProto, opset: int) -> None:
    found = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    if found.get("ai.onnx") != opset:
        raise DiffshipError(f"The exporter wrote opset {found.get('ai.onnx')} instead of {opset}.")


def _gather_external_data(model: onnx.ModelProto, raw_dir: Path, data_path: Path) -> None:
    """Stream every external tensor into one data file, tensor by tensor.

    onnx's own `convert_model_to_external_data` needs all weights loaded in memory first (10 GB for
    the SDXL UNet); copying file to file keeps the peak at one tensor.
    """
    with data_path.open("wb") as out:
        for tensor in _get_all_tensors(model):
            if not uses_external_data(tensor):
                continue
            info = ExternalDataInfo(tensor)
            length = info.length or (raw_dir / info.location).stat().st_size - (info.offset or 0)
            pad = -out.tell() % ALIGNMENT
            out.write(b"\0" * pad)
            offset = out.tell()
            with (raw_dir / info.location).open("rb") as src:
                src.seek(info.offset or 0)
                out.write(src.read(length))
            _point_to(tensor, offset, length)


def _point_to(tensor: onnx.TensorProto, offset: int, length: int) -> None:
    # onnx's set_external_data insists on the tensor's bytes being loaded; here they never are.
    del tensor.external_data[:]
    for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _save_proto(model: onnx.ModelProto, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, path)


def onnx_io(path: Path) -> dict[str, list[dict[str, object]]]:
    """Names, element types and shapes (dim names for dynamic axes) of a saved model's inputs and outputs."""
    model = onnx.load(str(path), load_external_data=False)

    def describe(values) -> list[dict[str, object]]:
        rows = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            rows.append({"name": v.name, "dtype": str(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)), "shape": dims})
        return rows

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def opset_of(path: Path) -> int:
    """The default-domain opset a saved model declares."""
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))

