"""Staged validation (the baseline recorded once and freed before each set loads) against interleaved validation
(the baseline beside each set): the same parity values and the same images, with latency timed in blocks."""

import copy
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_VALIDATION, Lazy

from diffship.models.components import component_specs
from diffship.models.source import resolve
from diffship.recipe import Recipe, ValidationRecipe, parse_recipe
from diffship.stages.build import build
from diffship.validation.baseline import Baseline
from diffship.validation.e2e import LatentSpace, sample_arguments
from diffship.validation.parity import Case
from diffship.validation.reference import LiveReference, RecordedReference, choose_staged
from diffship.validation.suite import Plan, task_samples


@pytest.fixture(scope="module")
def builds(tiny_build):
    """tiny-sd through ONNX Runtime FP32 and INT8 (the suite's sets, from the cache), validated interleaved and
    staged: parity, two images (text2img and img2img) and latency each."""
    return Lazy(lambda staged: tiny_build("tiny-sd", "onnxruntime:fp32+int8",
                                          validation={**TINY_VALIDATION, "staged": staged}))


def test_staged_validation_gives_the_interleaved_parity_values_and_images(builds):
    interleaved, staged = builds[False], builds[True]
    for key in ("onnxruntime-fp32", "onnxruntime-int8"):
        a, b = interleaved.report["sets"][key], staged.report["sets"][key]
        assert a["parity"] == b["parity"]
        assert a["e2e"]["samples"] == b["e2e"]["samples"] and a["passed"] == b["passed"]
        grid = Path("report") / "images" / f"grid-{key}.png"
        assert (interleaved.out / grid).read_bytes() == (staged.out / grid).read_bytes()
    # INT8 differs from PyTorch, so equal values above are not two identical-image shortcuts.
    assert staged.report["sets"]["onnxruntime-int8"]["parity"]["denoiser_steps"]["min_cosine"] < 0.99999
    assert not staged.report["sets"]["onnxruntime-int8"]["e2e"]["samples"][0]["identical"]


def test_staged_latency_is_timed_in_blocks_and_says_so(builds):
    staged = builds[True].report["sets"]["onnxruntime-fp32"]
    interleaved = builds[False].report["sets"]["onnxruntime-fp32"]
    assert staged["latency"]["method"] == "blocks" and "method" not in interleaved["latency"]
    unet = staged["latency"]["components"]["unet"]
    runs = TINY_VALIDATION["latency"]["runs"]
    assert unet["baseline"]["runs"] == runs and unet["target"]["runs"] == runs and unet["speedup"] > 0  # B, T T, B
    assert set(staged["latency"]["components"]) == set(interleaved["latency"]["components"])
    assert staged["latency"]["pipeline"]["baseline"]["total"]["runs"] == 1
    assert staged["baseline_held"].startswith("recorded once") and "baseline_held" not in interleaved


def test_a_large_component_s_latency_blocks_each_run_in_a_child_of_its_own(builds, monkeypatch):
    """At full size one process's blocks stacked what glibc kept of the PyTorch transformer under its ONNX Runtime
    session (issue 45: killed at 20 GiB); a component of ISOLATE_ABOVE of weights times each block in a child. The
    tiny UNet is made large by lowering the bar: three children, each side's runs, a speedup; in process by default."""
    from diffship.store.manifest import open_artifacts
    from diffship.validation import latency_blocks
    from diffship.validation.baseline import baseline_device

    build = builds[True]
    artifacts = open_artifacts(build.out, "onnxruntime", "fp32")
    folder = resolve("tiny-sd").folder
    spec = next(s for s in component_specs(folder) if s.name == "unet")
    block = latency_blocks.Block(spec, spec.sample_inputs(2, 64, 64), folder, False, "auto", *baseline_device(),
                                 "onnxruntime", artifacts.components["unet"], None, "fp32")
    times, in_child = latency_blocks.time_blocks(block, 1, 2)
    assert not in_child and [len(times["baseline"]), len(times["target"])] == [2, 2]
    monkeypatch.setattr(latency_blocks, "ISOLATE_ABOVE", 0)
    times, in_child = latency_blocks.time_blocks(block, 1, 2)
    assert in_child and [len(times["baseline"]), len(times["target"])] == [2, 2]
    assert all(t > 0 for side in times.values() for t in side)


def test_a_later_build_reads_the_recorded_baseline_from_the_cache_and_times_the_pipeline_again(
        builds, tmp_path: Path):
    first = builds[True]
    data = copy.deepcopy(first.manifest["recipe"])
    # Other latency settings: every set is validated again, against the baseline the first build recorded.
    data["validation"]["latency"]["runs"] = 1
    recipe = parse_recipe(data)
    lines: list[str] = []
    again = build(recipe, tmp_path / "again", say=lines.append)
    assert any("recorded by an earlier run" in line for line in lines), lines
    assert not any("recording the baseline" in line or "capturing the unet's inputs" in line for line in lines)
    for key in ("onnxruntime-fp32", "onnxruntime-int8"):
        a, b = first.report["sets"][key], again.report["sets"][key]
        assert not b["cached"] and a["parity"] == b["parity"] and a["e2e"]["samples"] == b["e2e"]["samples"]
        grid = Path("report") / "images" / f"grid-{key}.png"
        assert (first.out / grid).read_bytes() == (again.out / grid).read_bytes()
        # The pipeline's timings are never reused: measured in this run (after one warm-up of the fresh pipeline).
        assert b["latency"]["pipeline"]["baseline"]["total"]["runs"] == 1
        assert b["latency"]["components"]["unet"]["target"]["runs"] == 1
    assert again.report["sets"]["onnxruntime-fp32"]["latency"]["pipeline"]["baseline"] != \
        first.report["sets"]["onnxruntime-fp32"]["latency"]["pipeline"]["baseline"]


def test_the_recorded_baseline_answers_with_the_pipeline_freed(model_cache: Path):
    folder = resolve("tiny-sd").folder
    specs = component_specs(folder)
    validation = ValidationRecipe(prompts=["a red bicycle"], seeds=[3], steps=2, latency={"enabled": False})
    plan = Plan(64, 64, (Case(1, 64, 64),), validation, Recipe().threshold("fp32"))
    lines: list[str] = []
    baseline = Baseline(folder, False, lines.append)
    recorded = RecordedReference(baseline, folder, plan)
    recorded.record(specs, task_samples(plan), lines.append)
    assert baseline.pipe is None and sum(line.startswith("Loading the PyTorch baseline") for line in lines) == 1
    live = LiveReference(Baseline(folder, False, print).get(), folder, plan)
    for spec in specs:
        got, expected = recorded.outputs(spec, Case(1, 64, 64), 0), live.outputs(spec, Case(1, 64, 64), 0)
        assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in got)
    sample = task_samples(plan)[0]
    latents, _ = sample_arguments(sample, LatentSpace.of_folder(folder), None)
    assert np.array_equal(recorded.generation(sample, latents).images, live.generation(sample, latents).images)
    assert baseline.pipe is None  # all of it recorded: nothing loaded again
    recorded.outputs(specs[0], Case(2, 64, 64), 7)  # not recorded: asked of the pipeline, loaded again for it
    assert baseline.pipe is not None
    recorded.release()
    assert baseline.pipe is None


def test_auto_stages_only_what_would_not_fit_beside_its_baseline(model_cache: Path):
    staged, why = choose_staged("auto", resolve("tiny-sd").folder)
    assert not staged and "fits in" in why
    assert choose_staged(True, resolve("tiny-sd").folder) == (True, "the recipe sets staged = true")
