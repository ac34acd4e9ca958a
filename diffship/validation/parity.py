"""Numerical parity of each exported component against PyTorch on the same inputs.

Every component runs at several batch sizes and resolutions (proving the dynamic axes), and each
output is compared with max / mean absolute error, relative L2 error and cosine similarity,
computed in float64. Relative L2 and cosine decide pass/fail: random-weight and real models have
very different output scales, and absolute errors are reported for the reader.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffship import __version__
from diffship.accelerations import AccelerationGrid
from diffship.errors import DiffshipError
from diffship.models.components import ComponentSpec, component_specs, run_torch, with_cache_specs, wrap
from diffship.models.decoder_folder import MODULE, decoder_spec
from diffship.models.source import resolve
from diffship.models.streamed_module import reference_component
from diffship.recipe import Recipe, Threshold
from diffship.store.artifacts import MANIFEST_NAME, atomic_write_json, read_json
from diffship.store.manifest import open_artifacts, read_manifest
from diffship.targets import Case, get_target
from diffship.targets.runner import Runner

PARITY_FILE = "parity.json"
PARITY_SCHEMA = 1


@dataclass(frozen=True)
class Tolerance:
    """The bar an output must clear: cosine at least `min_cosine`, relative L2 at most `max_rel_l2`."""

    min_cosine: float
    max_rel_l2: float


DEFAULT_CASES = (Case(1, 64, 64), Case(2, 128, 192))


def default_threshold(precision: str) -> Threshold:
    """The default bar for `precision` (a mode such as `int8-hybrid` uses its family's, `int8`)."""
    return Recipe().threshold(precision)


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Error metrics of `candidate` against `reference` (same shape), in float64."""
    if reference.shape != candidate.shape:
        raise DiffshipError(f"Shape mismatch: PyTorch gave {reference.shape}, the artifact gave {candidate.shape}.")
    ref = reference.astype(np.float64).ravel()
    out = candidate.astype(np.float64).ravel()
    finite = bool(np.isfinite(out).all())
    diff = np.abs(ref - out)
    ref_norm, out_norm = np.linalg.norm(ref), np.linalg.norm(out)
    denominator = ref_norm * out_norm
    return {
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "rel_l2": float(np.linalg.norm(ref - out) / ref_norm) if ref_norm else float(np.linalg.norm(out)),
        "cosine": float(ref @ out / denominator) if denominator else float(ref_norm == out_norm),
        "finite": finite,
    }


def within(metrics: dict[str, float], tolerance: Tolerance) -> bool:
    """Whether one output's metrics clear the tolerance (NaN or Inf never does)."""
    return bool(metrics["finite"]) and metrics["cosine"] >= tolerance.min_cosine and metrics["rel_l2"] <= tolerance.max_rel_l2


# The baseline's outputs for one parity case: (case, seed) -> outputs on `spec.sample_inputs(..., seed=seed)`.
Reference = Callable[[Case, int], dict[str, np.ndarray]]


def module_reference(spec: ComponentSpec, wrapper: torch.nn.Module) -> Reference:
    """The reference of a PyTorch module: run it on the case's seeded inputs."""
    return lambda case, seed: run_torch(wrapper, spec, spec.sample_inputs(case.batch, case.height, case.width,
                                                                         seed=seed))


def check_component(spec: ComponentSpec, reference: Reference, runner: Runner, tolerance: Tolerance,
                    cases: tuple[Case, ...] = DEFAULT_CASES, seed: int = 0) -> dict[str, Any]:
    """Run the reference and the Runner on identical inputs for each case and compare every output (each gated one
    against the tolerance)."""
    ungated = {t.name for t in spec.outputs if not t.gated}
    results = []
    for i, case in enumerate(cases):
        inputs = spec.sample_inputs(case.batch, case.height, case.width, seed=seed + i)
        expected = reference(case, seed + i)
        candidate = runner.run(inputs)
        outputs = {name: compare(expected[name], candidate[name]) | ({"gated": False} if name in ungated else {})
                   for name in expected}
        results.append({**asdict(case), "outputs": outputs,
                        "passed": all(within(m, tolerance) for name, m in outputs.items() if name not in ungated)})
    return {"passed": all(r["passed"] for r in results), "cases": results}


def artifact_cases(backend: Any, spec: ComponentSpec, artifact: Path, cases: tuple[Case, ...]) -> tuple[Case, ...]:
    """The cases an artifact is checked at: the target's choice where it was built for a few exact shapes (Core ML
    packages, static AOTInductor packages), else `cases`."""
    return backend.parity_cases(spec, artifact, cases)


def validate_folder(folder: Path, target: str | None = None, components: list[str] | None = None,
                    cases: tuple[Case, ...] = DEFAULT_CASES, allow_pickle: bool = False,
                    on_step: Callable[[str, str, dict[str, Any]], None] | None = None,
                    precision: str | None = None) -> dict[str, Any]:
    """Check one artifact set of an export or build folder against its PyTorch source; write and return parity.json."""
    step = on_step or (lambda *_: None)
    folder = folder.resolve()
    # Hashes are not enforced here: measuring what a changed file does is exactly this command's job.
    artifacts = open_artifacts(folder, target, precision, verify=False)
    threshold = default_threshold(artifacts.precision)
    tolerance = Tolerance(threshold.min_cosine, threshold.max_rel_l2)
    recorded = read_manifest(folder).source
    if recorded is None:
        raise DiffshipError(f"{folder / 'manifest.json'} does not say which model it was built from (no source.model); "
                            "parity needs the PyTorch model to compare with.")
    # The folder it was built from, where it still is: it holds what re-resolving the name alone would lose (a
    # variant, a converted single file, merged LoRAs, ControlNets).
    kept = Path(recorded.folder) if recorded.folder else None
    model_folder = kept if kept and (kept / "model_index.json").is_file() else \
        resolve(recorded.model, allow_pickle=allow_pickle).folder
    exported = list(artifacts.components)
    wanted = components or exported
    missing = [c for c in wanted if c not in exported]
    if missing:
        raise DiffshipError(f"{folder} has no {', '.join(missing)} artifact (it has {', '.join(exported)}).")
    built_with = (read_json(folder / MANIFEST_NAME).get("recipe") or {}).get("accelerations") or {}
    specs = [s for s in accelerated_specs(model_folder, AccelerationGrid.model_validate(built_with)) if s.name in wanted]
    if unknown := [c for c in wanted if c not in {s.name for s in specs}]:
        raise DiffshipError(f"No PyTorch module to check {', '.join(unknown)} against in {model_folder}.")
    backend = get_target(artifacts.target)
    options = backend.parse_options(artifacts.options) if artifacts.options else None  # run it as the build did
    report: dict[str, Any] = {
        "schema": PARITY_SCHEMA,
        "diffship": __version__,
        "baseline": {"framework": "pytorch", "precision": "fp32", "device": "cpu",
                     "note": "PyTorch FP32 on the CPU (parity reference)"},
        "target": None,
        "precision": artifacts.precision,
        "tolerance": asdict(tolerance),
        "components": {},
    }
    loaded: dict[str, torch.nn.Module] = {}
    for i, spec in enumerate(specs):
        step(spec.name, "start", {"index": i + 1, "total": len(specs)})
        if spec.module not in loaded:
            loaded = {spec.module: reference_component(model_folder, spec.module, allow_pickle)}
            gc.collect()
        runner = backend.load(artifacts.components[spec.name], options, artifacts.precision)
        report["target"] = runner.describe().record()
        result = check_component(spec, module_reference(spec, wrap(spec, loaded[spec.module])), runner, tolerance,
                                 artifact_cases(backend, spec, artifacts.components[spec.name], cases))
        report["components"][spec.name] = result
        step(spec.name, "done", result)
        del runner
    report["passed"] = all(c["passed"] for c in report["components"].values())
    atomic_write_json(folder / PARITY_FILE, report)
    return report


def accelerated_specs(model_folder: Path, accelerations: AccelerationGrid) -> list[ComponentSpec]:
    """The model's components and those the build's accelerations added (deep-feature caching's graphs, a smaller
    decoder, whose module the recorded folder holds)."""
    specs = with_cache_specs(component_specs(model_folder), model_folder, accelerations.cache_depth)
    if accelerations.vae_decoder is not None and (model_folder / MODULE).is_dir():
        specs.append(decoder_spec(next(s for s in specs if s.role == "vae_decoder")))
    return specs
