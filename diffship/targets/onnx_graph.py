"""ONNX graph preparation shared by targets: ONNX Runtime's transformer fusions, constant folding, FP16 conversion.

Fusions come from `onnxruntime.transformers.optimizer` (attention, LayerNorm, SkipLayerNorm, Gelu patterns for
the UNet, VAE and CLIP graphs). Constant folding is polygraphy's (`fold_constants`, onnx-graphsurgeon underneath):
it evaluates constant subgraphs with ONNX Runtime itself and is the same preparation TensorRT needs. It runs after
the fusions, because the fusion patterns match the exporter's shape subgraphs that folding would rewrite.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, save_external_data, set_external_data, uses_external_data

if TYPE_CHECKING:
    from diffship.models.components import ComponentSpec

# The optimizer's model types per component role; the denoising roles take their denoiser's declared type.
MODEL_TYPES = {"vae_decoder": "vae", "vae_encoder": "vae", "text_encoder": "clip"}
# Fusions whose ops only CUDA (or DirectML) implements; on a CPU session they would fail to load.
GPU_ONLY_FUSIONS = ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                    "enable_packed_qkv", "enable_packed_kv", "enable_bias_add", "group_norm_channels_last")
TWO_GB = 2**31
# Beside each compiled ONNX graph of the ONNX Runtime, web and mobile targets: how it was made (its pinned shapes).
GRAPH_FILE = "diffship-graph.json"


def weight_bytes(source: Path) -> int:
    """An ONNX file's size with its external data (`model.onnx_data`, `model.onnx.data`)."""
    return sum(p.stat().st_size for p in source.parent.iterdir() if p.name.startswith(source.name))


def load(path: Path) -> onnx.ModelProto:
    """An ONNX model with its external weights."""
    return onnx.load(str(path), load_external_data=True)


def save(model: onnx.ModelProto, path: Path, replace: bool = False) -> None:
    """Save `model`, with its weights in one `<name>_data` file when it is over protobuf's 2 GB limit.

    replace: remove a model already at `path` first (onnx appends to an existing external data file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if replace:
        path.unlink(missing_ok=True)
        path.with_name(f"{path.name}_data").unlink(missing_ok=True)
    large = model.ByteSize() >= TWO_GB if small_enough_to_measure(model) else True
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=f"{path.name}_data", size_threshold=1024)


def load_graph(path: Path) -> onnx.ModelProto:
    """The model at `path` with large weights left in their external file (only the graph and small tensors read)."""
    return onnx.load(str(path), load_external_data=False)


def model_type(spec: ComponentSpec) -> str | None:
    """onnxruntime.transformers' optimizer model type for `spec`'s graph (None: no fusions for it)."""
    return spec.denoiser.onnx_model_type if spec.in_denoising_loop else MODEL_TYPES.get(spec.role)


def prepare(model: onnx.ModelProto, folder: Path, kind: str | None, gpu: bool) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A graph from `load_graph` (its weights in `folder`) fused (`fuse`) and folded (`fold_constants`), its
    weights left on disk.

    Only the tensors a pass reads (attention weights the fusion packs, small constants it folds) come into
    memory: on sd15-arch's UNet 1.0 GiB at the peak instead of 16.5 with every weight loaded, and the same graph
    (benchmarks/ort_prepare_memory.py). The passes resolve external data against the working directory (the
    optimizer's checker, onnx-graphsurgeon's lazy values), so they run from the model's folder."""
    with contextlib.chdir(folder.resolve()):
        model, fused = fuse(model, kind, gpu)
        return fold_constants(model), fused


def save_prepared(model: onnx.ModelProto, source_dir: Path, path: Path) -> None:
    """Save a graph from `prepare` as a new model at `path`: weights still in `source_dir`'s external file are
    copied one tensor at a time into `path`'s own `<name>_data`, then the tensors the passes made are appended.

    A fresh file rather than a link to the export's: the export's file also holds the weights the passes replaced
    (packed attention, folded constants), which would ship as dead bytes."""
    external = [t for t in _tensors(model) if uses_external_data(t)]
    if not external:
        save(model, path, replace=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    location = f"{path.name}_data"
    path.unlink(missing_ok=True)
    (path.parent / location).unlink(missing_ok=True)
    for tensor in external:
        load_external_data_for_tensor(tensor, str(source_dir))
        set_external_data(tensor, location)
        save_external_data(tensor, str(path.parent))
        tensor.ClearField("raw_data")
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=1024)


def _tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    # Initializers and Constant nodes' values: where an exported or prepared UNet keeps its weights.
    constants = [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.HasField("t")]
    return [*model.graph.initializer, *constants]


def small_enough_to_measure(model: onnx.ModelProto) -> bool:
    # ByteSize itself fails above 2 GB on some protobuf builds; count the weights first.
    return sum(len(t.raw_data) for t in model.graph.initializer) < TWO_GB


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each op type the graph holds."""
    return dict(Counter(node.op_type for node in model.graph.node))


def fuse(model: onnx.ModelProto, kind: str | None, gpu: bool) -> tuple[onnx.ModelProto, dict[str, int]]:
    """ONNX Runtime's transformer fusions for a graph of optimizer model type `kind` (`model_type`); only ops the CPU
    provider runs unless `gpu`.

    Returns the fused model and the number of fused nodes per fused op type (the ones that applied)."""
    from onnxruntime.transformers.fusion_options import FusionOptions  # start-up time: onnxruntime
    from onnxruntime.transformers.optimizer import optimize_model  # start-up time: onnxruntime

    if kind is None:
        return model, {}
    options = FusionOptions(kind)
    if not gpu:
        for name in GPU_ONLY_FUSIONS:
            setattr(options, name, False)
    # The optimizer warns that the producer is not "pytorch" and logs every fusion; our own step lines say enough.
    quiet = [logging.getLogger(n) for n in ("onnxruntime.transformers", "onnx_model", "fusion_base", "onnx_model_mmdit")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:  # the transformers' (mmdit) fusions draw a tqdm bar on stderr
        with contextlib.redirect_stderr(io.StringIO()):
            optimized = optimize_model(model, model_type=kind, optimization_options=options, opt_level=0,
                                       use_gpu=gpu)
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    stats = optimized.get_fused_operator_statistics()
    if not gpu and (split := split_self_attention(optimized.model)):
        stats["Attention"] -= split
        stats["MultiHeadAttention"] = stats.get("MultiHeadAttention", 0) + split
    return optimized.model, {op: n for op, n in stats.items() if n}


def split_self_attention(model: onnx.ModelProto) -> int:
    """Rewrite each fused self-`Attention` node (packed QKV weights inside the op) as three MatMuls feeding a
    `MultiHeadAttention` node, in place; returns how many.

    The optimizer's UNet fusion offers only these two forms for self-attention on the CPU (its packed-QKV
    MultiHeadAttention is CUDA-only). MultiHeadAttention's CPU kernel is faster at long sequences (a 4096-token
    SD 1.5 block: 0.13 s against 0.19 s unfused), and separate projections stay visible to INT8 quantization.
    """
    import numpy as np  # start-up time: numpy

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    rewritten, nodes = 0, []
    for node in graph.node:
        if node.op_type != "Attention" or node.domain != "com.microsoft" or len(node.input) < 2 or \
                node.input[1] not in weights:
            nodes.append(node)
            continue
        packed = numpy_helper.to_array(weights[node.input[1]])
        bias = numpy_helper.to_array(weights[node.input[2]]) if len(node.input) > 2 and node.input[2] in weights else None
        q_w, k_w, v_w = np.split(packed, 3, axis=1)  # the fusion stacks q, k, v along the output axis
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        projected = []
        for part, w in zip("qkv", (q_w, k_w, v_w), strict=True):
            name = f"{node.name}/{part}"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), f"{name}_weight"))
            nodes.append(helper.make_node("MatMul", [node.input[0], f"{name}_weight"], [f"{name}_out"],
                                          name=f"{name}/MatMul"))
            projected.append(f"{name}_out")
        inputs = projected
        if bias is not None and np.any(bias):
            graph.initializer.append(numpy_helper.from_array(bias, f"{node.name}/qkv_bias"))
            inputs = [*projected, f"{node.name}/qkv_bias"]
        nodes.append(helper.make_node("MultiHeadAttention", inputs, [node.output[0]], name=f"{node.name}/mha",
                                      domain="com.microsoft", num_heads=attrs["num_heads"]))
        rewritten += 1
    if rewritten:
        used = {i for n in nodes for i in n.input}
        kept = [t for t in graph.initializer if t.name in used]
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return rewritten


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constant subgraphs (shape arithmetic, constant casts) until nothing changes."""
    import onnxruntime as ort  # start-up time: onnxruntime
    from polygraphy.backend.onnx import fold_constants as polygraphy_fold  # start-up time: polygraphy
    from polygraphy.logger import G_LOGGER  # start-up time: polygraphy

    G_LOGGER.module_severity = G_LOGGER.ERROR
    ort.set_default_logger_severity(3)  # its evaluation sessions warn about every Unsqueeze they cannot remove
    return polygraphy_fold(model, num_passes=None, fold_shapes=True, error_ok=False, do_shape_inference=False)


def to_fp16(model: onnx.ModelProto, keep_io_types: bool, op_block_list: list[str] | None = None) -> onnx.ModelProto:
    """FP16 weights and compute, except the ops ONNX Runtime's converter keeps in FP32 by default (and `op_block_list`)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16  # start-up time: onnxruntime

    blocked = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(op_block_list or []))
    # Its shape inference serializes the model, which protobuf refuses above 2 GB (a full-size UNet).
    return convert_float_to_float16(model, keep_io_types=keep_io_types, op_block_list=blocked,
                                    disable_shape_infer=not small_enough_to_measure(model))


def summary(before: dict[str, int], after: dict[str, int], fused: dict[str, int], extra: dict[str, Any]) -> dict[str, Any]:
    """What preparation did to a graph, for the report: node counts before/after and the fusions that applied."""
    return {"nodes_before": sum(before.values()), "nodes_after": sum(after.values()), "fused": fused, **extra}


def input_shapes(artifact: Path) -> dict[str, tuple[int, ...]]:
    """The pinned input shapes recorded beside a compiled graph (web and mobile graphs)."""
    record = json.loads((artifact.parent / GRAPH_FILE).read_text(encoding="utf-8"))
    return {k: tuple(v) for k, v in record["shapes"].items()}
