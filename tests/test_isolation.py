"""A full-size compile runs in a spawned child process (`[compile] isolate`), so its heap goes back to the system
before the next stage: the same artifacts, byte for byte, as compiling in the build's own process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from diffship.errors import DiffshipError
from diffship.models.components import component_specs
from diffship.models.source import resolve
from diffship.stages.isolation import ISOLATE_ABOVE, compile_isolated, should_isolate
from diffship.targets import CompileContext, onnxruntime, openvino
from diffship.targets.calibration import CalibrationData, CalibrationFile


def _unet(exported) -> tuple[Path, object]:
    spec = next(s for s in component_specs(resolve("tiny-sd").folder) if s.is_denoiser)
    return exported("tiny-sd") / "unet" / "model.onnx", spec


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_an_isolated_compile_runs_in_a_child_and_writes_the_same_ir(exported, tmp_path: Path):
    source, spec = _unet(exported)
    context = CompileContext(spec, say=lambda _: None)
    # OpenVINO numbers unnamed nodes from one counter per process: advance this process's, as earlier tests do.
    openvino.ov.Core().read_model(str(source))
    here = openvino.compile(source, "bf16", openvino.OvOptions(), tmp_path / "here", context)
    there, pid = compile_isolated(openvino.__name__, source, "bf16", openvino.OvOptions(), tmp_path / "there", context)
    assert pid != os.getpid()
    assert there.name == here.name and _files(there.parent) == _files(here.parent)


@pytest.mark.slow
def test_a_calibrated_compile_gets_the_capture_by_its_file_and_quantizes_identically(exported, tmp_path: Path):
    source, spec = _unet(exported)
    data = CalibrationData(inputs={"unet": [spec.sample_inputs(2, 64, 64, seed=i) for i in range(4)]})
    data.save(tmp_path / "inputs.npz")
    context = CompileContext(spec, calibration=CalibrationFile(tmp_path / "inputs.npz", {}), probe_size=(64, 64),
                             guided=True)
    options = onnxruntime.OrtOptions()
    here = onnxruntime.compile(source, "int8", options, tmp_path / "here", context)
    there, pid = compile_isolated(onnxruntime.__name__, source, "int8", options, tmp_path / "there", context)
    assert pid != os.getpid()
    ranges = "calibration-ranges.json"  # its key order follows set iteration, which differs between processes
    assert {k: v for k, v in _files(there.parent).items() if k != ranges} == \
        {k: v for k, v in _files(here.parent).items() if k != ranges}
    assert json.loads((there.parent / ranges).read_text()) == json.loads((here.parent / ranges).read_text())
    # A capture that cannot be handed over (a closure) is refused, not silently dropped.
    unpicklable = CompileContext(spec, calibration=lambda: data)
    with pytest.raises(DiffshipError, match="cannot be handed to a child process"):
        compile_isolated(onnxruntime.__name__, source, "int8", options, tmp_path / "closure", unpicklable)


def test_a_refusal_in_the_child_is_the_same_clear_error_in_the_build(exported, tmp_path: Path):
    source, spec = _unet(exported)
    with pytest.raises(DiffshipError, match="OpenVINO precision 'int3' is unknown"):
        compile_isolated(openvino.__name__, source, "int3", openvino.OvOptions(), tmp_path / "x", CompileContext(spec))


def test_auto_isolates_components_of_2_gib_or_more(tmp_path: Path):
    (tmp_path / "model.onnx").write_bytes(b"x" * 1000)
    assert not should_isolate("auto", tmp_path / "model.onnx") and should_isolate(True, tmp_path / "model.onnx")
    with open(tmp_path / "model.onnx_data", "wb") as f:
        f.truncate(ISOLATE_ABOVE)  # sparse: the size is what counts
    assert should_isolate("auto", tmp_path / "model.onnx") and not should_isolate(False, tmp_path / "model.onnx")


def test_a_build_with_isolate_true_compiles_every_component_in_a_child(tmp_path: Path, model_cache: Path):
    from conftest import tiny_recipe

    from diffship.stages.build import build

    lines: list[str] = []
    # A calibration of its own, so no other test's compiles are found in the cache: every one must run, in a child.
    recipe = tiny_recipe("tiny-sd", "onnxruntime:int8", compile={"isolate": True},
                         calibration={"prompts": ["a red bicycle"], "samples": 4, "steps": 2})
    result = build(recipe, tmp_path / "out", say=lines.append)
    assert result.passed and result.report["sets"]["onnxruntime-int8"]["latency"]["components"]["unet"]["speedup"] > 0
    compiling = [line for line in lines if line.endswith("compiling ... (in a child process)")]
    assert len(compiling) == 4, lines  # text encoder, UNet (calibrated from the capture's file), both VAE halves
