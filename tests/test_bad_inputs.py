"""Broken inputs: each exits 2 with one line that says what is wrong, never a traceback; only DiffshipError ever
escapes recipe parsing and manifest reading (fuzzed); anything else is an internal error, exit 3, with a log file."""

import contextlib
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from diffship.cli.main import app
from diffship.errors import DiffshipError
from diffship.recipe import DEFAULT_THRESHOLDS, load_recipe, parse_recipe
from diffship.store.manifest import open_artifacts, read_manifest

runner = CliRunner()

def refused(args: list[str], message: str) -> None:
    """The command exits 2, its last line is the one error line naming `message`, and no traceback is shown."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    assert message in errors[0], result.output
    assert "Traceback" not in result.output


@pytest.fixture
def export_copy(exported, tmp_path: Path) -> Path:
    folder = tmp_path / "export"
    shutil.copytree(exported("tiny-sd"), folder)
    return folder


@pytest.mark.parametrize(("content", "message"), [
    (lambda text: text[: len(text) // 2], "is not valid JSON"),
    (lambda text: json.dumps({"schema": 1, "components": {"unet": {"files": 5}}}), "is not a valid diffship manifest"),
    (lambda text: json.dumps([1, 2, 3]), "holds a JSON list"),
])
def test_a_broken_manifest_is_refused(export_copy: Path, tmp_path: Path, content, message: str):
    manifest = export_copy / "manifest.json"
    manifest.write_text(content(manifest.read_text()))
    refused(["generate", str(export_copy), "-p", "a cat", "--out", str(tmp_path / "x.png")], message)
    refused(["validate", str(export_copy)], message)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda text: "model = 'tiny-sd\n[validation\n", "is not valid TOML"),
    (lambda text: text.replace("seeds = [0], steps = 3", "seeds = [0], steps = -3"),
     "validation.steps: Input should be greater than or equal to 1"),
    (lambda text: text + "[[targets]]\nname = 'tflite'\n", "Unknown target 'tflite'"),
    (lambda text: text.replace("height = [64, 128]", "height = [100, 128]"),
     "shapes.height: Value error, height 100 is not a multiple of 8 pixels"),
    (lambda text: text.replace("seeds = [0]", "seeds = 'zero'"), "validation.seeds: Input should be a valid list"),
    (lambda text: text + "[int8_auto]\nmargin = 1.5\n", "int8_auto.margin: Input should be less than 1"),
    (lambda text: text + "[int8_auto]\ntime_limit_minutes = 0\n",
     "int8_auto.time_limit_minutes: Input should be greater than 0"),
    (lambda text: text.replace("samples = 6, steps = 3", "samples = 6, steps = 0"),
     "calibration.steps: Input should be greater than or equal to 1"),
])
def test_a_bad_recipe_is_refused_before_any_work(tmp_path: Path, fast_recipe: Path, edit, message: str):
    text = fast_recipe.read_text()
    assert edit(text) != text, "the edit no longer finds what it changes in the suite's recipe"
    fast_recipe.write_text(edit(text))
    out = tmp_path / "out"
    refused(["build", str(fast_recipe), "--out", str(out)], message)
    assert not out.exists()


def _break_model_index(folder: Path) -> None:
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline",')


def _truncate_unet_weights(folder: Path) -> None:
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])


def _mistype_unet_config(folder: Path) -> None:
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": "four"}))


@pytest.mark.parametrize(("damage", "message"), [
    (_break_model_index, "model_index.json is not valid JSON"),
    (_truncate_unet_weights, "Could not load"),
    (_mistype_unet_config, "Could not build the unet from"),
])
def test_a_damaged_model_folder_is_refused_and_leaves_no_output(model_copy, tmp_path: Path, fast_recipe: Path, damage,
                                                               message: str):
    folder = model_copy("tiny-sd")
    damage(folder)
    out = tmp_path / "out"
    refused(["build", str(fast_recipe), "--model", str(folder), "--out", str(out)], message)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize(("args", "message"), [
    (["--out", "picture.jpg"], "must be a .png file"),
    (["--height", "100"], "must be positive multiples of"),
])
def test_generate_refuses_a_bad_request(export_copy: Path, tmp_path: Path, args: list[str], message: str):
    refused(["generate", str(export_copy), "-p", "a cat", "--steps", "1", *args], message)


def test_a_ten_thousand_character_prompt_is_cut_like_diffusers_does_with_a_warning(export_copy: Path, tmp_path: Path):
    image = tmp_path / "long.png"
    prompt = ("a lighthouse at dusk " * 500)[:10_000]
    result = runner.invoke(app, ["generate", str(export_copy), "-p", prompt, "--steps", "1", "--out", str(image)])
    assert result.exit_code == 0, result.output
    assert "warning: a prompt of" in result.output and "was cut to the 77 the text encoder reads" in result.output
    assert image.is_file()
    result = runner.invoke(app, ["generate", str(export_copy), "-p", "a lighthouse", "--steps", "1", "--out", str(image)])
    assert result.exit_code == 0 and "warning" not in result.output


def test_an_unexpected_exception_is_an_internal_error_with_its_traceback_in_a_log(tmp_path: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch):
    import diffship.stages.build

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in a stage")

    monkeypatch.setattr(diffship.stages.build, "build", broken)
    result = runner.invoke(app, ["build", "--out", str(tmp_path / "out")])
    assert result.exit_code == 3, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("internal error:"))
    assert "RuntimeError: a bug in a stage" in line and "Traceback" not in result.output
    log = Path(line.split("the traceback is in ")[1].split(": please")[0])
    logged = log.read_text()
    assert "Traceback" in logged and "in broken" in logged and "RuntimeError: a bug in a stage" in logged


# --- fuzzing: nothing but DiffshipError escapes ---------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)


def _paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _paths(value, (*prefix, i))


def _replaced(tree, path, value):
    if not path:
        return value
    copy = dict(tree) if isinstance(tree, dict) else list(tree)
    copy[path[0]] = _replaced(tree[path[0]], path[1:], value)
    return copy


VALID_RECIPE = {
    "model": "tiny-sd", "components": ["text_encoder", "unet", "vae_decoder"],
    "targets": [{"name": "onnxruntime", "precisions": ["fp32", "int8"], "options": {}}],
    "export": {"opset": 17}, "shapes": {"batch": [1, 2], "height": [64, 128], "width": [64, 128]},
    "validation": {"prompts": ["a cat"], "seeds": [0, 1], "steps": 2, "height": 64, "width": 64,
                   "parity_cases": [{"batch": 1, "height": 64, "width": 64}], "latency": {"runs": 2},
                   "quality": {"seeds": [0]}},
    "thresholds": {"fp32": DEFAULT_THRESHOLDS["fp32"].model_dump()},
    "calibration": {"prompts": ["a dog"], "samples": 4, "steps": 2},
    "compress": [{"step": "prune-magnitude", "sparsity": 0.5}],
}


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_recipe_parsing_raises_nothing_but_diffship_errors(data):
    path = data.draw(st.sampled_from(list(_paths(VALID_RECIPE))))
    mutated = _replaced(VALID_RECIPE, path, data.draw(json_values))
    try:
        parsed = parse_recipe(mutated if isinstance(mutated, dict) else {"model": mutated})
        parsed.threshold(data.draw(st.sampled_from(["fp32", "int8-hybrid", "fp16", "palette4", "bf16"])))
    except DiffshipError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_recipe_files_of_any_text_raise_nothing_but_diffship_errors(tmp_path: Path, text: str):
    path = tmp_path / "fuzzed.toml"
    path.write_text(text, encoding="utf-8")
    with contextlib.suppress(DiffshipError):
        load_recipe(path)


@pytest.fixture(scope="module")
def real_manifest(exported) -> tuple[Path, dict]:
    folder = exported("tiny-sd")
    return folder, json.loads((folder / "manifest.json").read_text())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_manifest_reading_raises_nothing_but_diffship_errors(real_manifest, tmp_path_factory, data):
    source, manifest = real_manifest
    folder = tmp_path_factory.mktemp("fuzzed")
    for name in ("unet", "scheduler"):
        shutil.copytree(source / name, folder / name)
    path = data.draw(st.sampled_from(list(_paths(manifest))))
    mutated = _replaced(manifest, path, data.draw(json_values))
    (folder / "manifest.json").write_text(json.dumps(mutated))
    try:
        read_manifest(folder)
        open_artifacts(folder, verify=data.draw(st.booleans()))
    except DiffshipError:
        pass
    finally:
        shutil.rmtree(folder)


def test_a_build_a_stage_of_which_would_not_fit_in_memory_is_refused_before_any_work(tmp_path: Path,
                                                                                     fast_recipe: Path):
    """Each stage's peak is estimated from the weights before anything runs (stages/preflight.py): over the memory
    the build may use (the recipe's memory_gib here, the machine's available memory by default) it exits 2 naming
    the stage and its estimate, and writes nothing."""
    from diffship.recipe import Recipe
    from diffship.stages.context import prepare
    from diffship.stages.preflight import GIB, check_memory, needs

    recipe = tmp_path / "small.toml"
    recipe.write_text(fast_recipe.read_text() + "\nmemory_gib = 0.5\n")
    out = tmp_path / "out"
    refused(["build", str(recipe), "--out", str(out)], "Not enough memory: the ")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    # the estimates decide: a limit a MiB under the largest one refuses that stage by name, a MiB over it builds
    recipe_of = lambda gib: Recipe(model="tiny-sd", memory_gib=gib,  # noqa: E731
                                   targets=[{"name": "openvino", "precisions": ["int8-weights"]}])
    estimates = needs(prepare(recipe_of(None), False, lambda _: None))
    assert {n.stage for n in estimates} >= {"export of unet", "openvino int8-weights compile of unet",
                                            "PyTorch baseline"}
    assert all(GIB <= n.bytes < 1.2 * GIB for n in estimates), estimates
    largest = max(estimates, key=lambda n: n.bytes)
    with pytest.raises(DiffshipError, match=f"the {largest.stage} needs about"):
        check_memory(prepare(recipe_of((largest.bytes - 2**20) / GIB), False, lambda _: None))
    check_memory(prepare(recipe_of((largest.bytes + 2**20) / GIB), False, lambda _: None))
