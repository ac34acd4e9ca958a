"""The web target: onnxruntime-web graphs at pinned shapes under the browser's limits, and the static app, run in a
real headless Chromium (Debian's chromium + chromium-driver, installed by `make setup`)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from diffship.errors import DiffshipError
from diffship.runtime.pipeline import DeployedPipeline, initial_latents
from diffship.targets import web
from diffship.targets.webapp.browser import browser_unavailable, run_page
from diffship.validation.e2e import compare_images
from diffship.validation.quality import score_digits

SEVEN, THREE = "a handwritten digit seven", "a handwritten digit three"
STEPS, GUIDANCE = 8, 5.0
try:
    from diffship.targets.webapp.bundle import runtime_folder

    runtime_folder()
    NO_RUNTIME = None
except DiffshipError as exc:
    NO_RUNTIME = str(exc)
needs_runtime = pytest.mark.skipif(NO_RUNTIME is not None, reason=f"web runtime missing: {NO_RUNTIME}")
needs_browser = pytest.mark.skipif(browser_unavailable() is not None, reason=f"no browser: {browser_unavailable()}")


@pytest.fixture(scope="module")
def digits_web(digits_devices):
    """digits-sd's web fp32 + fp16 sets (shapes left as ranges: the web graphs pin the validation's), built with the
    mobile ones (conftest)."""
    if NO_RUNTIME:
        pytest.skip(NO_RUNTIME)
    return digits_devices


def _image(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@needs_runtime
def test_web_sets_hold_pinned_graphs_the_app_and_a_manifest_that_covers_them(digits_web):
    result, out = digits_web
    assert result.passed, json.dumps({k: v.get("passed") for k, v in result.report["sets"].items()})
    for precision in ("fp32", "fp16"):
        folder = out / f"web-{precision}"
        for name in ("index.html", "main.js", "pipeline.js", "schedulers/ddim.js", "runtime/ort.webgpu.min.mjs",
                     "runtime/ort-wasm-simd-threaded.asyncify.wasm", "runtime/tokenizers.min.mjs", "diffship-web.json"):
            assert (folder / name).is_file(), name
        config = json.loads((folder / "diffship-web.json").read_text())
        assert config["latents"] == [1, 4, 8, 8] and config["denoiser_batch"] == 2 and config["image"] == [32, 32]
        assert config["scheduler"]["_class_name"] == "DDIMScheduler"
        model = onnx.load(str(folder / "unet" / "model.onnx"), load_external_data=False)
        dims = [d for i in model.graph.input for d in i.type.tensor_type.shape.dim]
        assert all(d.HasField("dim_value") for d in dims), "every input dimension pinned"
        weights = {t.data_type for t in model.graph.initializer if len(t.dims) > 1}
        assert weights == ({onnx.TensorProto.FLOAT16} if precision == "fp16" else {onnx.TensorProto.FLOAT})
        # The export's LayerNormalization GroupNorms are InstanceNormalization again: WebGPU's kernel needs that.
        vae = {n.op_type for n in onnx.load(str(folder / "vae_decoder" / "model.onnx")).graph.node}
        assert "InstanceNormalization" in vae and "LayerNormalization" not in vae
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {f["path"] for f in manifest["artifacts"]["web-fp32"]["pipeline_files"]}
    assert {"web-fp32/index.html", "web-fp32/diffship-web.json", "web-fp32/runtime/ort.webgpu.min.mjs"} <= listed


@needs_runtime
@needs_browser
def test_the_build_runs_the_page_in_chromium_and_reports_its_image_and_time_per_step(digits_web):
    result, out = digits_web
    app = result.report["sets"]["web-fp32"]["app"]
    assert app["ran"] and app["execution_provider"] == "wasm" and len(app["step_ms"]) == STEPS, app
    assert app["identical"] or app["psnr_db"] >= 30, app
    assert (out / "report" / "images" / "grid-web-fp32_browser.png").is_file()
    # FP16 is for WebGPU with shader-f16; headless Chromium's SwiftShader adapter lacks it, and the page says so.
    fp16 = result.report["sets"]["web-fp16"]["app"]
    assert not fp16["ran"] and "shader-f16" in fp16["reason"] and fp16["passed"], fp16


@pytest.fixture(scope="module")
def python_images(digits_web):
    """The Python runtime's images of the web-fp32 graphs for two prompts from the same initial latents."""
    _, out = digits_web
    deployed = DeployedPipeline.load(out, "web", "fp32")
    latents = initial_latents(0, 1, 4, 8, 8)
    images = {p: deployed(p, None, 32, 32, STEPS, GUIDANCE, 0, latents=latents).images[0] for p in (SEVEN, THREE)}
    return images, latents


def _page_from(out: Path, latents, tmp_path: Path, ep: str):
    """The web-fp32 page run for SEVEN from the given initial latents, on `ep`."""
    np.save(tmp_path / "latents.npy", latents.numpy().astype(np.float32))
    params = {"prompt": SEVEN, "seed": 0, "steps": STEPS, "guidance": GUIDANCE, "latents": "check/latents.npy", "ep": ep}
    return run_page(out / "web-fp32", params, webgpu=ep == "webgpu", extra={"check": tmp_path})


@needs_runtime
@needs_browser
def test_the_page_draws_the_runtimes_image_and_the_digit_its_prompt_names(digits_web, python_images, tmp_path):
    _, out = digits_web
    images, latents = python_images
    page = _page_from(out, latents, tmp_path, "wasm")
    assert page.state == "done", (page.status, page.console)
    drawn = _image(page.png)
    metrics = compare_images(images[SEVEN], drawn)
    assert metrics["identical"] or metrics["psnr_db"] >= 30, metrics
    assert score_digits(drawn[None], [7])["prompt_accuracy"] == 1.0
    # The comparison can fail: the other prompt from the same latents is a different image.
    other = compare_images(images[THREE], drawn)
    assert not other["identical"] and other["psnr_db"] < 20, other


@needs_runtime
@needs_browser
@pytest.mark.slow
def test_webgpu_runs_the_fp32_graphs_on_swiftshader(digits_web, python_images, tmp_path):
    _, out = digits_web
    images, latents = python_images
    page = _page_from(out, latents, tmp_path, "webgpu")
    assert page.state == "done" and page.timings["backend"] == "webgpu", (page.backend, page.status, page.console)
    assert "swiftshader" in page.backend.lower()
    metrics = compare_images(images[SEVEN], _image(page.png))
    assert metrics["identical"] or metrics["psnr_db"] >= 30, metrics


def test_components_over_the_browsers_limits_are_refused_with_their_size(tmp_path: Path):
    web.check_size("unet", "fp16", {"model.onnx": int(1.72e9)})  # SD 1.5's FP16 UNet fits
    with pytest.raises(DiffshipError, match=r"unet in web fp16 needs a 5\.14 GB file .* limit of 2\.15 GB"):
        web.check_size("unet", "fp16", {"model.onnx_data": int(5.14e9)})  # SDXL's does not
    # Refused before any conversion: a 10.3 GB FP32 UNet (sparse here) is not read.
    export = tmp_path / "unet"
    export.mkdir()
    (export / "model.onnx").write_bytes(b"")
    with open(export / "model.onnx_data", "wb") as f:
        f.truncate(10_300_000_000)
    from diffship.models.components import component_specs
    from diffship.models.source import resolve
    from diffship.targets import CompileContext

    spec = next(s for s in component_specs(resolve("tiny-sd").folder) if s.is_denoiser)
    with pytest.raises(DiffshipError, match=r"unet in web fp16 needs a 5\.15 GB file"):
        web.compile(export / "model.onnx", "fp16", web.WebOptions(), tmp_path / "out", CompileContext(spec))
    assert not (tmp_path / "out").exists()


def test_web_options_are_checked():
    assert web.parse_options({"vae_precision": "fp32"}).vae_precision == "fp32"
    with pytest.raises(DiffshipError, match="Unknown web option"):
        web.parse_options({"shader": "f16"})
    with pytest.raises(DiffshipError, match="Unknown web vae_precision 'bf16'; choose auto, fp16 or fp32"):
        web.parse_options({"vae_precision": "bf16"})


@pytest.mark.skipif(shutil.which("node") is None or NO_RUNTIME is not None, reason="needs node and the web runtime")
def test_the_pages_tokenizer_and_npy_reader_match_python(tmp_path: Path, exported):
    from transformers import AutoTokenizer

    folder = exported("tiny-sd") / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    texts = ["a handwritten digit seven", "", "An ASTRONAUT, riding a horse!! " * 12]
    app = Path(web.__file__).parent / "webapp" / "app"
    np.save(tmp_path / "x.npy", np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7)
    script = tmp_path / "probe.mjs"
    script.write_text(f"""
import fs from "fs";
import {{ Tokenizer }} from "{runtime_folder() / '@huggingface/tokenizers/dist/tokenizers.min.mjs'}";
import {{ tokenize }} from "{app / 'pipeline.js'}";
import {{ parseNpy }} from "{app / 'latents.js'}";
const read = (f) => JSON.parse(fs.readFileSync("{folder}/" + f));
const pipeline = {{ tokenizer: new Tokenizer(read("tokenizer.json"), read("tokenizer_config.json")),
  config: {{ tokenizer: {{ max_length: 77, pad_id: {tokenizer.pad_token_id}, eos_id: {tokenizer.eos_token_id} }} }} }};
const bytes = fs.readFileSync("{tmp_path / 'x.npy'}");  // a view into Node's pooled buffer: copy out its bytes
const npy = parseNpy(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length));
console.log(JSON.stringify({{ ids: {json.dumps(texts)}.map((t) => Array.from(tokenize(pipeline, t))),
  npy: {{ shape: npy.shape, data: Array.from(npy.data) }} }}));
""")
    probe = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "NODE_NO_WARNINGS": "1"})
    assert probe.returncode == 0, probe.stderr
    got = json.loads(probe.stdout)
    expected = tokenizer(texts, padding="max_length", max_length=77, truncation=True).input_ids
    assert got["ids"] == expected
    assert len(tokenizer(texts[2]).input_ids) > 77  # the long prompt was cut, as diffusers cuts it
    assert got["npy"]["shape"] == [2, 3, 4]
    assert np.allclose(got["npy"]["data"], (np.arange(24, dtype=np.float32) / 7).tolist())


def test_a_web_build_without_the_npm_runtime_exits_2_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from typer.testing import CliRunner

    from diffship.cli.main import app

    monkeypatch.setenv("DIFFSHIP_WEB_RUNTIME", str(tmp_path / "empty"))
    result = CliRunner().invoke(app, ["build", "--model", "tiny-sd", "--targets", "web:fp32", "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "The web app needs onnxruntime-web and @huggingface/tokenizers from npm" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_a_web_build_of_an_sdxl_model_exits_2_before_any_export(tmp_path: Path):
    from typer.testing import CliRunner

    from diffship.cli.main import app

    result = CliRunner().invoke(app, ["build", "--model", "tiny-sdxl", "--targets", "web:fp32", "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "The web app runs SD 1.x / 2.x pipelines (one CLIP text encoder)" in result.output
    assert "app = false" in result.output and "[export" not in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
