"""What a loaded or built artifact is, as the report reads it: `Description` (a runner's `describe()` and a target's
`describe_artifact`), and the JSON record a target writes beside each artifact (how it was built)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffship.errors import DiffshipError
from diffship.store.artifacts import read_json


@dataclass(frozen=True)
class Description:
    """What runs: the fields the report and validation read, then the target's own facts (`details`: providers,
    device, versions, what it computes in), which the report shows beside them."""

    target: str
    summary: str  # one line: "ONNX Runtime CPU int8", "OpenVINO CPU bf16"
    precision: str = ""
    graph: dict[str, Any] = field(default_factory=dict)  # what was done to the graph: conversion, fusions, reason
    search: dict[str, Any] | None = None  # int8-auto's record, where a search chose the set
    latency_skipped: str | None = None  # why this component's latency says nothing here, if it does not
    details: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """As the report's JSON: the target's facts and the shared fields side by side (empty ones left out)."""
        shared = {"target": self.target, "precision": self.precision, "graph": self.graph, "search": self.search,
                  "latency_skipped": self.latency_skipped, "summary": self.summary}
        return {**{k: v for k, v in shared.items() if v not in (None, "", {})}, **self.details}


def read_record(artifact: Path, name: str, kind: str) -> dict[str, Any]:
    """The record `name` a target writes beside `artifact` (a `kind` artifact: "TensorRT engine"), or an error
    saying which of the two is missing."""
    if not artifact.exists():
        raise DiffshipError(f"No {kind} at {artifact}.")
    if not (artifact.parent / name).is_file():
        raise DiffshipError(f"{artifact} has no {name} beside it, so what it was built from is unknown; rebuild it.")
    return read_json(artifact.parent / name)
