"""`diffship build`: export -> compile -> validate -> report -> manifest, cached, with exit codes 0 / 1 / 2."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffship.cli.main import app
from diffship.store.manifest import open_artifacts

runner = CliRunner()

RECIPE = """
model = "tiny-sd"
[shapes]
batch = [1, 2]
height = [64, 128]
width = [64, 128]
[validation]
prompts = ["a red bicycle", "a bowl of fruit"]
seeds = [0]
steps = 3
[validation.latency]
warmup = 0
runs = 2
pipeline_runs = 1
"""


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of its own, so hits and misses are this test's alone."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFSHIP_CACHE", str(cache))
    return cache


def recipe_file(tmp_path: Path, text: str = RECIPE, name: str = "recipe.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def build(*args: str):
    return runner.invoke(app, ["build", *args])


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, object]:
    """RECIPE built once from an empty cache of the module's own: (cache, recipe, out, the command's result). The
    tests after it build again on that cache, each into a folder of its own."""
    root = tmp_path_factory.mktemp("first")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFSHIP_CACHE", str(root / "cache"))
        result = build(str(recipe_file(root)), "--out", str(root / "out"))
    return root / "cache", root / "recipe.toml", root / "out", result


def test_tiny_sd_builds_validates_and_reports_on_onnxruntime(first):
    _, _, out, result = first
    assert result.exit_code == 0, result.output
    for i, name in enumerate(["text_encoder", "unet", "vae_encoder", "vae_decoder"], start=1):
        assert f"[export {i}/4] {name}: exporting" in result.output
    assert "build passed" in result.stdout and "onnxruntime-fp32" in result.stdout

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "build" and manifest["passed"] is True
    assert manifest["source"]["sha256"] and set(manifest["source"]["modules"]) >= {"unet", "vae", "text_encoder"}
    assert {"torch", "onnx", "onnxruntime", "diffusers"} <= set(manifest["versions"])
    artifacts = manifest["artifacts"]["onnxruntime-fp32"]
    assert artifacts["status"] == "passed"
    assert artifacts["components"]["unet"]["path"] == "onnx/unet/model.onnx"  # on the CPU, FP32 runs the export
    assert all(f["sha256"] for c in artifacts["components"].values() for f in c["files"])
    assert open_artifacts(out).status == "passed"  # every recorded hash verifies
    assert open_artifacts(out / "onnx").components["unet"] == out / "onnx" / "unet" / "model.onnx"  # so does the export's

    report = json.loads((out / "report" / "report.json").read_text())
    e2e = report["sets"]["onnxruntime-fp32"]["e2e"]
    assert e2e["images"] == 3 and e2e["passed"]  # two prompts from text, the first from the default init image
    assert {t: v["images"] for t, v in e2e["tasks"].items()} == {"text2img": 2, "img2img": 1}
    assert all(s["identical"] or s["psnr_db"] >= 40 for s in e2e["samples"])
    assert report["baseline"]["device"] == "cpu" and report["baseline"]["precision"] == "fp32"
    latency = report["sets"]["onnxruntime-fp32"]["latency"]
    assert set(latency["components"]) == {"text_encoder", "unet", "vae_encoder", "vae_decoder"}
    assert latency["components"]["unet"]["batch"] == 2  # classifier-free guidance doubles the UNet batch
    assert latency["components"]["unet"]["target"]["runs"] == 2 and latency["pipeline"]["target"]["total"]["p50_s"] > 0
    assert report["sets"]["onnxruntime-fp32"]["memory"]["peak_rss_bytes"] > 0

    # the default recipe's clients step: optimum-onnx draws the first sample from the folder (a skip that says why
    # where its environment is not made)
    [client] = report["sets"]["onnxruntime-fp32"]["clients"]["rows"]
    assert client["client"] == "optimum-onnx" and (client["status"] == "pass" or "not installed" in client["reason"])
    drawn = client["status"] == "pass"
    html = (out / "report" / "report.html").read_text()
    # a grid per task, the client's grid, the latency chart
    assert html.count("data:image/png;base64,") == 3 + drawn and "PASSED" in html
    markdown = (out / "report" / "report.md").read_text()
    assert "| component | batch | resolution | output |" in markdown and "images/latency.png" in markdown
    assert (out / "report" / "images" / "grid-onnxruntime-fp32.png").stat().st_size > 1000
    assert (out / "report" / "images" / "grid-onnxruntime-fp32_img2img.png").stat().st_size > 1000
    assert "| img2img | 1 |" in markdown


def test_a_second_identical_build_does_no_work_and_says_so(first, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cache, recipe, first_out, _ = first
    monkeypatch.setenv("DIFFSHIP_CACHE", str(cache))
    out = tmp_path / "out"
    result = build(str(recipe), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "Nothing was rebuilt" in result.stdout
    assert "exporting" not in result.output and "Loading the PyTorch baseline" not in result.output
    second = json.loads((out / "manifest.json").read_text())
    assert set(second["cache"].values()) == {"hit"}
    assert second["artifacts"] == json.loads((first_out / "manifest.json").read_text())["artifacts"]


def test_changing_one_input_reruns_only_what_depends_on_it(first, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DIFFSHIP_CACHE", str(first[0]))
    out = tmp_path / "out"
    new_prompts = RECIPE.replace('"a bowl of fruit"', '"a green door"')
    result = build(str(recipe_file(tmp_path, new_prompts, "other.toml")), "--out", str(out))
    assert result.exit_code == 0, result.output
    cache = json.loads((out / "manifest.json").read_text())["cache"]
    assert all(v == "hit" for k, v in cache.items() if k.startswith("export:"))
    assert cache["validate:onnxruntime-fp32"] == "miss"
    assert "Nothing was rebuilt" not in result.stdout

    result = build(str(recipe_file(tmp_path, new_prompts, "other.toml")), "--out", str(out), "--force")
    assert result.exit_code == 0
    assert set(json.loads((out / "manifest.json").read_text())["cache"].values()) == {"miss"}


@pytest.mark.parametrize(("model", "encoders", "family"), [
    ("tiny-sd2", {"text_encoder"}, "sd2"), ("tiny-sdxl", {"text_encoder", "text_encoder_2"}, "sdxl")])
def test_sd2_and_sdxl_build_end_to_end(built, model: str, encoders: set[str], family: str):
    """SD 2.x (OpenCLIP encoder, v-prediction) and SDXL (two encoders, text_embeds and time_ids) through the default
    recipe's validation; SD 1.x is the build above, the refiner and inpainting models are test_task_builds'."""
    result = built(model)
    assert result.passed and result.manifest["source"]["family"] == family
    artifacts = result.manifest["artifacts"]["onnxruntime-fp32"]
    assert encoders | {"unet", "vae_decoder"} <= set(artifacts["components"])
    r = result.report["sets"]["onnxruntime-fp32"]
    assert r["e2e"]["passed"] and (r["e2e"]["min_psnr_db"] is None or r["e2e"]["min_psnr_db"] >= 40)
    assert set(r["e2e"]["tasks"]) == {"text2img", "img2img"} and r["parity"]["denoiser_steps"]["passed"]
    assert r["latency"]["pipeline"]["target"]["total"]["p50_s"] > 0


def test_a_build_that_fails_validation_exits_1_and_still_writes_report_and_manifest(tmp_path: Path):
    strict = RECIPE + "[thresholds.fp32]\nmin_cosine = 0.99999\nmax_rel_l2 = 0.0\nmin_psnr = 40\nmin_ssim = 0.98\n"
    out = tmp_path / "out"
    result = build(str(recipe_file(tmp_path, strict)), "--out", str(out))
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.stdout and "build FAILED validation" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["passed"] is False and manifest["artifacts"]["onnxruntime-fp32"]["status"] == "failed"
    assert "FAILED" in (out / "report" / "report.html").read_text()
    image = tmp_path / "x.png"
    result = runner.invoke(app, ["generate", str(out), "-p", "a cat", "--steps", "1", "--out", str(image)])
    assert result.exit_code == 0 and "FAILED validation in their build" in result.output and image.is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["--targets", "tensorrt"], "pip install 'diffship[tensorrt]'"),
    (["--targets", "onnxruntime:int4"], "cannot build int4"),
    (["--targets", "tflite"], "Unknown target 'tflite'"),
    (["--model", "no/such-model-anywhere"], "'no/such-model-anywhere' looks like a hub id, but the hub cannot be "
                                            "reached from here (HF_HUB_OFFLINE is set) and it is not in the local hub cache"),
])
def test_bad_targets_and_models_exit_2_before_any_work(tmp_path: Path, args: list[str], message: str,
                                                       monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    result = build("--out", str(out), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()


@pytest.mark.parametrize(("text", "message"), [
    ("[validation]\nsetps = 2\n", "validation.setps: unknown key"),
    ("[shapes]\nheight = [72, 128]\n", "shapes.height 72 is not a multiple of 32"),  # digits-sd: VAE factor 4
    ("[validation]\nprompts = []\n", "validation.prompts"),
    ("[validation.quality]\nmin_prompt_accuracy = 1.5\n", "validation.quality.min_prompt_accuracy"),
    ("[validation.quality]\nseeds = []\n", "validation.quality.seeds"),
    ("[[targets]]\nname = 'onnxruntime'\noptions = { threads = 2 }\n", "Unknown ONNX Runtime option(s) threads"),
    ("components = ['unet']\n", "the recipe leaves out text_encoder, vae_decoder"),
])
def test_bad_recipes_exit_2_with_the_reason(tmp_path: Path, text: str, message: str):
    out = tmp_path / "out"
    result = build(str(recipe_file(tmp_path, text)), "--out", str(out))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()


@pytest.mark.slow
def test_a_build_killed_midway_leaves_nothing_half_done_and_the_next_one_finishes(tmp_path: Path, fresh_cache: Path):
    out, recipe = tmp_path / "out", recipe_file(tmp_path)
    env = {**os.environ, "DIFFSHIP_CACHE": str(fresh_cache)}
    child = subprocess.Popen([sys.executable, "-m", "diffship.cli", "build", str(recipe), "--out", str(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    exports = fresh_cache / "artifacts" / "export"
    deadline = time.monotonic() + 120
    # Kill it once the first component is in the cache and the next is being written.
    while time.monotonic() < deadline and child.poll() is None:
        if len(list(exports.glob("*/entry.json"))) >= 1 and list(exports.glob(".*.partial")):
            break
        time.sleep(0.05)
    assert child.poll() is None, "the build finished before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not out.exists()  # the output is renamed into place only when complete
    assert list(tmp_path.glob(".out.*.partial"))  # what the killed build left is hidden and unfinished

    result = build(str(recipe), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "cached (no work)" in result.output and "exporting" in result.output
    assert not list(tmp_path.glob(".out.*.partial")) and not list(exports.glob(".*.partial"))
    assert open_artifacts(out).status == "passed"
