"""Every registered target follows the protocol in targets/base.py, and the protocol's defaults stand in for the
hooks a target does not define."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest

from diffship.targets import TARGETS, get_target
from diffship.targets.base import DECLARATIONS, HOOKS, Target, conformance
from diffship.targets.records import Description


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_registered_target_conforms_to_the_protocol(name: str):
    module = importlib.import_module(TARGETS[name].module)  # the modules import their heavy packages lazily
    assert conformance(module) == []
    target = get_target(name, installed=False)
    assert set(target.PRECISIONS) and all(isinstance(p, str) for p in target.PRECISIONS)
    for precision in target.PRECISIONS:
        assert isinstance(target.needs_calibration(precision), bool)
    assert set(target.PATCHABLE) <= set(target.PRECISIONS)
    assert target.can_patch == (target.PATCHABLE != ())  # a target patches some precisions, or says why not
    if not target.can_patch:
        assert "rebuild" in target.PATCH_REFUSAL


def test_conformance_names_a_missing_function_and_a_hook_with_other_arguments():
    broken = ModuleType("broken")
    broken.PRECISIONS = ("fp32",)
    broken.finish_set = lambda set_dir, components: None  # the protocol passes six arguments
    problems = conformance(broken)
    assert "missing compile" in problems and "missing load" in problems
    assert any(p.startswith("finish_set") for p in problems)


def test_a_target_without_a_hook_gets_the_protocols_default():
    bare = ModuleType("bare")
    target = Target("bare", bare)
    assert target.parity_cases(None, None, ("a", "b")) == ("a", "b")
    target.release_resident()  # nothing resident: nothing to do
    assert target.prediction_unavailable() is None and target.environment(None) is None
    assert target.STAGE_RESOURCES == {} and target.CLIENT_OUTPUTS_KEPT is True and not target.can_patch
    assert DECLARATIONS["PATCH_REFUSAL"] == target.PATCH_REFUSAL
    with pytest.raises(NotImplementedError):
        target.patch_weights(None, None, [])
    assert set(HOOKS) >= {"finish_set", "app_run", "parity_cases"}
    described = target.describe_artifact(Path("set/unet/model.onnx"))
    assert isinstance(described, Description) and described.record() == {
        "target": "bare", "summary": "bare artifact (not loaded)", "path": "set/unet/model.onnx"}


def test_a_description_keeps_the_fields_the_report_reads_beside_the_targets_own():
    described = Description("onnxruntime", "ONNX Runtime CPU int8", "int8", {"fused": {"Attention": 2}},
                            search={"kept_in_float": []}, details={"providers": ["CPUExecutionProvider"]})
    assert described.record() == {"target": "onnxruntime", "precision": "int8", "graph": {"fused": {"Attention": 2}},
                                  "search": {"kept_in_float": []}, "summary": "ONNX Runtime CPU int8",
                                  "providers": ["CPUExecutionProvider"]}
