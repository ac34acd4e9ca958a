"""Per-block parity: a component's PyTorch blocks, run in the memory of one (models/streamed_module.py), against the
deployed graph's tensors at the same block boundaries, on the same inputs.

Where a whole PyTorch baseline does not fit (a 12B transformer), this is what validates the export block by block:
each PyTorch block is fed the previous PyTorch block's real outputs, each compared with the graph's own tensor there
(found by the export's node scopes, `/transformer_blocks.3/...`), then the graph's final output against the chain's.
The first block that drifts is where an export or a compression went wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from diffship.models.components import ComponentSpec, run_torch, wrap
from diffship.models.streamed_module import StreamedComponent
from diffship.validation.parity import compare as compare_outputs


def boundary_tensors(onnx_path: Path, blocks: list[str]) -> dict[str, list[str]]:
    """For each block, the tensors its nodes make that nodes outside it (or the graph's outputs) read: its outputs
    in the exported graph. A block the export left no scope for (inlined away) has none."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    markers = {block: scope_marker(block) for block in blocks}
    scope_of: dict[str, str] = {}
    for block, marker in markers.items():
        for node in graph.node:
            if marker in node.name:
                for name in node.output:
                    scope_of[name] = block
    read_outside: dict[str, list[str]] = {block: [] for block in blocks}
    graph_outputs = {o.name for o in graph.output}
    for node in graph.node:
        for name in node.input:
            owner = scope_of.get(name)
            if owner is not None and markers[owner] not in node.name and name not in read_outside[owner]:
                read_outside[owner].append(name)
    for name in graph_outputs:
        if (owner := scope_of.get(name)) is not None and name not in read_outside[owner]:
            read_outside[owner].append(name)
    return read_outside


def scope_marker(block: str) -> str:
    """The piece of an exported node's name that says it belongs to `block`: torch's TorchScript exporter names a
    node by its module path with `/` between modules and `.` before a list index (`encoder.block.0` ->
    `/encoder/block.0/`)."""
    parent, _, index = block.rpartition(".")
    return "/" + "/".join(parent.split(".")) + f".{index}/" if parent else f"/{block}/"


@dataclass(frozen=True)
class Chain:
    """The PyTorch chain's outputs on one input: each block's (as the block returned them) and the component's."""

    inputs: dict[str, np.ndarray]
    blocks: dict[str, Any]
    final: dict[str, np.ndarray]


def reference_chain(reference: StreamedComponent, spec: ComponentSpec, inputs: dict[str, np.ndarray]) -> Chain:
    """Run the PyTorch chain once on `inputs`, keeping each block's outputs: computed before any graph is loaded, so
    the reference's blocks and a deployed 12 GB graph are never in memory together, and shared by every graph
    compared with it."""
    with reference.block_outputs() as outputs:
        final = run_torch(wrap(spec, reference.module), spec, inputs)
    return Chain(inputs, dict(outputs), final)


def block_parity(chain: Chain, runner: Any, taps: dict[str, list[str]], min_cosine: float) -> dict[str, Any]:
    """Run the tapped graph on the chain's inputs; per block, each PyTorch output against the graph's boundary tensor
    of its shape that matches it best (cosine, relative L2), then the final outputs."""
    got = runner.run(chain.inputs)
    rows: list[dict[str, Any]] = []
    for block, output in chain.blocks.items():
        tensors = [t for t in (output if isinstance(output, tuple | list) else (output,)) if isinstance(t, torch.Tensor)]
        candidates = [got[name] for name in taps.get(block, []) if name in got]
        if not candidates:
            rows.append({"block": block, "status": "no tensor", "reason": "the graph kept no tensor at its boundary"})
            continue
        worst: dict[str, float] | None = None
        for tensor in tensors:
            want = tensor.float().numpy()
            matches = [compare_outputs(want, c) for c in candidates if c.shape == want.shape]
            if not matches:
                continue
            best = max(matches, key=lambda m: m["cosine"])
            if worst is None or best["cosine"] < worst["cosine"]:
                worst = best
        if worst is None:
            rows.append({"block": block, "status": "no tensor", "reason": "no boundary tensor of the block's shapes"})
            continue
        rows.append({"block": block, "status": "pass" if worst["cosine"] >= min_cosine else "fail",
                     "cosine": worst["cosine"], "rel_l2": worst["rel_l2"]})
    final = {name: compare_outputs(chain.final[name], got[name]) for name in chain.final}
    compared = [r for r in rows if "cosine" in r]
    first_off = next((r["block"] for r in compared if r["status"] == "fail"), None)
    return {"blocks": rows, "final": final, "min_cosine": min(r["cosine"] for r in compared) if compared else None,
            "first_failing_block": first_off,
            "passed": bool(compared) and first_off is None
            and all(f["cosine"] >= min_cosine for f in final.values())}
