"""onnxruntime's mobile usability checker, as numbers for the report: for NNAPI and Core ML (ML program and the
older NeuralNetwork format), how many nodes each provider takes, in how many partitions, which ops block it, and
the checker's own verdict. The checker's functions are called directly (`python -m
onnxruntime.tools.check_onnx_model_mobile_usability` prints the same analysis), on the model after ONNX Runtime's
basic optimizations, as the checker itself and an ORT-format conversion do."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import onnx

# provider -> (checker function name, its supported-ops table for Core ML)
PROVIDERS = {"NNAPI": ("check_nnapi_partitions", None),
             "CoreML MLProgram": ("check_coreml_partitions", "coreml_supported_mlprogram_ops.md"),
             "CoreML NeuralNetwork": ("check_coreml_partitions", "coreml_supported_neuralnetwork_ops.md")}
GOAL = {"min_node_share": 0.95, "max_partitions": 5}


def usability(model: Path) -> dict[str, Any]:
    """Per provider: nodes, nodes it takes, partitions, unsupported ops, the checker's verdict, and the goal met."""
    from onnxruntime.tools.mobile_helpers import usability_checker as checker  # start-up time: onnxruntime
    from onnxruntime.tools.onnx_model_utils import optimize_model  # start-up time: onnxruntime

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / model.name
        optimize_model(model, optimized, use_external_initializers=True)
        # The checker reads operators and shapes only: the graph without its weights, which onnxruntime's own loader
        # (ModelProtoWithShapeInfo) would read whole and fail to serialize for shape inference past 2 GB.
        graph = onnx.shape_inference.infer_shapes(onnx.load(str(optimized), load_external_data=False), strict_mode=True)
        results = {}
        for name, (function, table) in PROVIDERS.items():
            check = getattr(checker, function)
            info = check(graph, True, table) if table else check(graph, True)
            share = info.num_supported_nodes / max(info.num_nodes, 1)
            results[name] = {"nodes": info.num_nodes, "supported_nodes": info.num_supported_nodes,
                             "share": round(share, 4), "partitions": info.num_partitions,
                             "unsupported_ops": sorted(info.unsupported_ops),
                             "dynamic_input_nodes": info.nodes_unsupported_due_to_dynamic_input,
                             "verdict": info.suitability().name,
                             "goal_met": share >= GOAL["min_node_share"] and info.num_partitions <= GOAL["max_partitions"]
                             and info.suitability().name == "YES"}
    return results
