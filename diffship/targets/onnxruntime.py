"""ONNX Runtime target: an exported ONNX file is the artifact; a Runner over an InferenceSession.

Providers are chosen from what is installed (CUDA before CPU unless the options say otherwise) and
the Runner reports the providers the session actually uses, so a silent CPU fallback is visible.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from diffship.errors import DiffshipError

NAME = "onnxruntime"
PRECISIONS = ("fp32",)
GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class OrtOptions:
    """Session settings: providers (None: best installed), graph optimization level, intra-op threads (0: ORT's default)."""

    providers: tuple[str, ...] | None = None
    graph_optimization: str = "all"
    intra_op_threads: int = 0
    extra: dict[str, str] = field(default_factory=dict)


def parse_options(options: dict[str, Any]) -> OrtOptions:
    """The recipe's `[targets.options]` for ONNX Runtime, with unknown keys named."""
    known = {f.name for f in fields(OrtOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise DiffshipError(f"Unknown ONNX Runtime option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
    values = dict(options)
    if values.get("providers") is not None:
        values["providers"] = tuple(values["providers"])
    return OrtOptions(**values)


def default_providers() -> tuple[str, ...]:
    """CUDA first when the installed onnxruntime has it, then CPU."""
    available = ort.get_available_providers()
    return tuple(p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available)


def writes_artifacts(precision: str) -> bool:
    """Whether `compile` makes new files for `precision` (FP32 runs the exported ONNX as it is)."""
    return False


def needs_calibration(precision: str) -> bool:
    """Whether `precision` is calibrated on captured inputs."""
    return False


def compile(source: Path, precision: str = "fp32", options: OrtOptions | None = None, dest: Path | None = None,
            context: Any = None) -> Path:
    """The ONNX Runtime artifact for `source`. FP32 runs the exported file as it is."""
    if precision not in PRECISIONS:
        raise DiffshipError(f"ONNX Runtime precision {precision!r} is not available yet; choose {', '.join(PRECISIONS)}.")
    if not source.is_file():
        raise DiffshipError(f"No ONNX model at {source}.")
    return source


class OrtRunner:
    """A Runner over an onnxruntime.InferenceSession."""

    def __init__(self, path: Path, options: OrtOptions):
        if options.graph_optimization not in GRAPH_LEVELS:
            raise DiffshipError(
                f"Unknown graph optimization level {options.graph_optimization!r}; choose {', '.join(GRAPH_LEVELS)}."
            )
        requested = options.providers or default_providers()
        missing = [p for p in requested if p not in ort.get_available_providers()]
        if missing:
            raise DiffshipError(
                f"Execution provider(s) {', '.join(missing)} are not available in this onnxruntime "
                f"(available: {', '.join(ort.get_available_providers())})."
            )
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = GRAPH_LEVELS[options.graph_optimization]
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), session_options, providers=list(requested))
        except Exception as exc:  # onnxruntime raises its own untyped errors for a bad file
            raise DiffshipError(f"ONNX Runtime could not load {path}: {exc}") from exc
        self.path, self.options = path, options
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session on named arrays; missing or unexpected names are an error, not a guess."""
        if set(inputs) != set(self.input_names):
            raise DiffshipError(f"{self.path} takes inputs {list(self.input_names)}, got {sorted(inputs)}.")
        outputs = self.session.run(list(self.output_names), inputs)
        return dict(zip(self.output_names, outputs, strict=True))

    def describe(self) -> dict[str, object]:
        providers = self.session.get_providers()
        return {"target": NAME, "onnxruntime": ort.__version__, "providers": providers,
                "graph_optimization": self.options.graph_optimization,
                "summary": f"ONNX Runtime {providers[0].removesuffix('ExecutionProvider')} fp32"}


def load(artifact: Path, options: OrtOptions | None = None, precision: str | None = None) -> OrtRunner:
    """A Runner for an ONNX file."""
    return OrtRunner(artifact, options or OrtOptions())
