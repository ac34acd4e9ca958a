"""`int8-auto` on OpenVINO and ONNX Runtime holds its gate on models it was not tuned on: differently seeded tiny SD
pipelines and one whose weights are scaled up for larger activations, validated at 20 steps, where full static
INT8 fails (tiny-sd: real-step cosine 0.978 against the gate's 0.99)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import Lazy
from safetensors.torch import load_file, save_file

from diffship.models.builtin import BUILTINS, write_builtin
from diffship.models.families.unet import UNET
from diffship.recipe import parse_recipe
from diffship.stages.build import build
from diffship.targets.accuracy_gate import Clock, Gate, score
from diffship.targets.int8_search import Site, _fewest, search

TARGETS = [{"name": "openvino", "precisions": ["int8-auto"]}, {"name": "onnxruntime", "precisions": ["int8-auto"]}]
SETS = ("openvino-int8-auto", "onnxruntime-int8-auto")
# seed, factor on the UNet's resnet convolution and feed-forward weights (larger activations, wider ranges)
MODELS = {"seed-4": (4, 1.0), "seed-5": (5, 1.0), "scaled": (6, 2.0)}  # no built-in uses these seeds
# seed-5 is also built with deep-feature caching: its two graphs are searched on their own, every output gated
DEEP_CACHE = {"seed-5": {"deep_cache": {"interval": 2, "depth": 1}}}


def _model(folder: Path, seed: int, factor: float) -> Path:
    write_builtin(replace(BUILTINS["tiny-sd"], name=f"tiny-sd-{seed}", seed=seed), folder)
    if factor != 1.0:
        path = folder / "unet" / "diffusion_pytorch_model.safetensors"
        weights = load_file(path)
        for key, value in weights.items():
            if key.endswith(("conv1.weight", "conv2.weight")) or (".ff.net." in key and key.endswith("weight")):
                weights[key] = value * factor
        save_file(weights, path)
    return folder


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Lazy:
    """label -> the build of that model, made on first use (`make test` reads seed-4 only)."""

    def make(label: str):
        seed, factor = MODELS[label]
        root = tmp_path_factory.mktemp(f"int8-auto-{label}")
        # The default recipe's validation at 20 steps and its calibration, latency on.
        accelerations = {"accelerations": DEEP_CACHE[label]} if label in DEEP_CACHE else {}
        recipe = parse_recipe({"model": str(_model(root / "model", seed, factor)), "targets": TARGETS,
                               "validation": {"prompts": ["a red bicycle"], "seeds": [0], "steps": 20},
                               **accelerations})
        return build(recipe, root / "out")

    return Lazy(make)


def _search(result, key: str, component: str = "unet") -> dict:
    unet = result.out / key / component
    if key.startswith("openvino"):
        return json.loads((unet / "diffship-search.json").read_text())
    return json.loads((unet / "diffship-graph.json").read_text())["search"]


@pytest.mark.parametrize("label", ["seed-4", *[pytest.param(m, marks=pytest.mark.slow) for m in MODELS if m != "seed-4"]])
def test_int8_auto_meets_its_gate_on_real_steps_on_every_model(builds, label):
    result = builds[label]
    for key in SETS:
        r = result.report["sets"][key]
        steps = r["parity"]["denoiser_steps"]
        threshold = r["parity"]["tolerance"]["min_cosine"]
        assert steps["min_cosine"] >= threshold, (label, key, steps["min_cosine"])
        assert r["passed"], (label, key)
        search = _search(result, key)
        gate = search["gate"]
        assert search["fell_back"] is None and search["chosen_score"] >= gate["target"]
        # The set ships the candidate with as many sites in float as it reports kept, which met the gate on both
        # measures, and no candidate with fewer sites in float did (the search's answer is the fewest).
        kept = len(search["kept_in_float"])
        chosen = [c for c in search["candidates"] if c["kept"] == kept]
        assert len(chosen) == 1 and chosen[0]["score"] == search["chosen_score"], (label, key, kept)
        assert chosen[0]["random_inputs"] >= gate["min_cosine"], (label, key, chosen[0])
        fewer = [c for c in search["candidates"] if c["kept"] < kept]
        assert all(c["score"] < gate["target"] or c["random_inputs"] < gate["min_cosine"] for c in fewer), fewer
    assert result.passed


def test_the_search_was_needed_full_int8_misses_the_gate(builds):
    """The check can fail: on seed-4 full static INT8 (the search's first candidate) is below the gate on both
    runtimes, so the search had to keep layers in float to pass."""
    first = [_search(builds["seed-4"], key)["candidates"][0] for key in SETS]
    assert all(c["label"] == "full INT8" for c in first)
    target = _search(builds["seed-4"], SETS[0])["gate"]["target"]
    assert all(c["score"] < target for c in first), [round(c["score"], 5) for c in first]


@pytest.mark.slow
def test_the_search_was_needed_full_int8_misses_the_gate_on_most_models(builds):
    first = [_search(builds[label], key)["candidates"][0] for label in MODELS for key in SETS]
    target = _search(builds["seed-4"], SETS[0])["gate"]["target"]
    assert sum(c["score"] < target for c in first) >= 3, [round(c["score"], 5) for c in first]


@pytest.mark.slow
def test_deep_cache_graphs_are_searched_on_their_own_with_every_output_gated(builds):
    """int8-auto's caching and shallow graphs each meet the gate on their own real steps, the caching graph's cached
    features too (the fixed int8-hybrid recipe it had before left digits-sd's features at cosine 0.966); the report
    lists what each kept in float."""
    result = builds["seed-5"]
    markdown = (result.out / "report" / "report.md").read_text()
    for key in SETS:
        parity = result.report["sets"][key]["parity"]
        for graph in ("caching_unet_d1", "shallow_unet_d1"):
            search = _search(result, key, graph)
            assert search["fell_back"] is None and search["chosen_score"] >= search["gate"]["target"], (key, graph)
            # needed: full static INT8 of each graph misses the target (0.972 to 0.984 against 0.991, 2026-12-07)
            assert search["candidates"][0]["score"] < search["gate"]["target"], (key, graph)
            assert parity["components"][graph]["passed"], (key, graph)
            assert f"## {key} {graph}: layers kept in float" in markdown, (key, graph)
        features = [c["outputs"]["cached_features"] for c in parity["components"]["caching_unet_d1"]["cases"]]
        assert min(f["cosine"] for f in features) >= parity["tolerance"]["min_cosine"], (key, features)
    assert result.passed


def test_a_graph_scores_its_worst_output():
    """A graph with several outputs (deep caching's noise prediction and cached features) is as good as its worst."""
    gate = Gate(0.99, 0.15)
    rng = np.random.default_rng(0)
    noise, features = rng.standard_normal(1000), rng.standard_normal(1000)
    good = score(noise, noise + 0.01 * rng.standard_normal(1000), gate)
    bad = score(features, features + 0.5 * rng.standard_normal(1000), gate)
    assert good > gate.min_cosine > bad
    assert score([noise, features], [noise + 0.01 * rng.standard_normal(1000),
                                     features + 0.5 * rng.standard_normal(1000)], gate) < gate.min_cosine
    assert score([noise], [noise], gate) == pytest.approx(1.0)


def test_kept_layers_and_the_frontier_are_in_the_report(builds):
    result = builds["seed-4"]
    markdown = (result.out / "report" / "report.md").read_text()
    assert "![speed-quality frontier](images/speed-quality_frontier.png)" in markdown
    assert (result.out / "report" / "images" / "speed-quality_frontier.png").stat().st_size > 10_000
    for key in SETS:
        search = _search(result, key)
        assert f"## {key}: layers kept in float" in markdown
        for row in search["kept_in_float"]:
            assert row["layer"] in markdown and "on real steps" in row["why"]
        runtime = result.report["sets"][key]["runtime"]["unet"]
        assert runtime["search"]["candidates"] == search["candidates"]


def _sites(n: int) -> list[Site]:
    return [Site(f"q{i}", (f"layer{i}",), 20.0 + i) for i in range(n)]


@pytest.mark.parametrize("needed", [0, 1, 5, 37, 100])
def test_the_search_finds_the_fewest_sites_in_log_steps(needed):
    tried = []

    def passes(k: int) -> bool:
        tried.append(k)
        return k >= needed

    assert _fewest(100, passes) == needed
    assert len(tried) <= 2 * 7 + 2


def test_a_search_that_cannot_meet_the_gate_falls_back_and_says_why():
    gate = Gate(0.99, 0.15, time_limit_s=600)
    kept, record = search(_sites(8), lambda kept: (0.5, 1.0, 0.01), gate, Clock(gate), 0.02, lambda _: None)
    assert kept is None and "every quantized activation in float" in record["fell_back"]
    assert [c["kept"] for c in record["candidates"]] == [0, 1, 2, 4, 8]


def test_a_search_out_of_time_keeps_its_best_passing_candidate_or_falls_back():
    gate = Gate(0.99, 0.15, time_limit_s=60)
    clock = Clock(gate)

    def trial(kept: list[Site]) -> tuple[float, float]:
        if len(kept) >= 3:
            clock.started -= 3600  # the limit passes while the first passing candidate (4 kept) is scored
        return (1.0 if len(kept) >= 3 else 0.9), 1.0, 0.01

    kept, record = search(_sites(8), trial, gate, clock, 0.02, lambda _: None)
    assert len(kept) == 4 and "time limit" in record["stopped"] and record["fell_back"] is None
    out_of_time = Gate(0.99, 0.15, time_limit_s=0.0)
    kept, record = search(_sites(8), trial, out_of_time, Clock(out_of_time), 0.02, lambda _: None)
    assert kept is None and "time limit" in record["fell_back"] and record["candidates"] == []


def test_recipe_sensitive_layers_are_tried_first_then_by_sqnr():
    """The denoiser's declared `searched_first` layers lead the ranking; without a declaration SQNR alone ranks."""
    sites = [Site("a", ("/unet/down/attn/MatMul",), 10.0), Site("b", ("/unet/conv_in/Conv",), 40.0),
             Site("c", ("/unet/mid/Conv",), 15.0)]
    gate = Gate(0.99, 0.15, time_limit_s=600)
    two = lambda kept: (1.0 if len(kept) >= 2 else 0.9, 1.0, 0.01)  # noqa: E731
    kept, _ = search(sites, two, gate, Clock(gate), 0.02, lambda _: None, UNET.sensitive.searched_first)
    assert [s.name for s in kept] == ["b", "a"]
    kept, _ = search(sites, two, gate, Clock(gate), 0.02, lambda _: None)
    assert [s.name for s in kept] == ["a", "c"]


def test_a_candidate_must_also_hold_validations_random_input_parity():
    """Real steps pass from 1 site on; validation's random-input cases only from 3 (at the threshold, no margin)."""
    gate = Gate(0.99, 0.15, time_limit_s=600)

    def trial(kept: list[Site]) -> tuple[float, float, float]:
        return (0.999 if kept else 0.9), (0.991 if len(kept) >= 3 else 0.985), 0.01

    kept, record = search(_sites(8), trial, gate, Clock(gate), 0.02, lambda _: None)
    assert len(kept) == 3 and record["candidates"][1]["random_inputs"] == 0.985


def test_a_site_with_no_measured_noise_is_tried_early_and_the_record_stays_strict_json():
    """digits-sd: the one site the gate needed measured no noise in the probe; ranked last it cost every site."""
    sites = [Site("a", ("/unet/down/Conv",), 12.0), Site("b", ("/unet/up/upsamplers/Conv",), float("inf")),
             Site("c", ("/unet/conv_in/Conv",), 40.0), Site("d", ("/unet/mid/Conv",), 30.0)]
    gate = Gate(0.99, 0.15, time_limit_s=600)
    needs_b = lambda kept: (1.0 if "b" in {s.name for s in kept} else 0.5, 1.0, 0.01)  # noqa: E731
    kept, record = search(sites, needs_b, gate, Clock(gate), 0.02, lambda _: None, UNET.sensitive.searched_first)
    assert [s.name for s in kept] == ["c", "b"]
    json.dumps(record, allow_nan=False)
    assert record["kept_in_float"][1]["sqnr_db"] is None and "no quantization noise" in record["kept_in_float"][1]["why"]
