"""Shared fixtures: a private model cache for the session, tiny pipelines exported once, and tiny builds that share
every stage through that cache.

Builds of the suite's tiny models start from one recipe (`tiny_recipe`): the same shapes, calibration and validation
(the default recipe's steps: parity, images and latency), so a set that two modules build (an export, a compile, a
set's validation) is made once and found in the cache the second time. Each module builds only the sets it reads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The suite's tiny builds: every shape the tests ask of an artifact, one prompt of 3 steps, and latency on, as the
# default recipe has it (fewer runs: a tiny model's timings are not what the tests read).
TINY_SHAPES = {"batch": [1, 2], "height": [64, 128], "width": [64, 128]}
# The clients step (each set drawn again in OpenVINO GenAI and optimum) is on where a test asks for it: test_clients.
TINY_VALIDATION = {"prompts": ["a red bicycle"], "seeds": [0], "steps": 3,
                   "latency": {"enabled": True, "warmup": 1, "runs": 2, "pipeline_runs": 1}, "clients": []}
TINY_CALIBRATION = {"prompts": ["a cat on a sofa", "a mountain lake"], "samples": 6, "steps": 3}


class Lazy(dict):
    """key -> make(key), made on first use: a fixture holding several builds pays only for those its tests read."""

    def __init__(self, make: Callable[[Any], Any]):
        super().__init__()
        self.make = make

    def __missing__(self, key: Any) -> Any:
        self[key] = value = self.make(key)
        return value


def tiny_recipe(model: str = "tiny-sd", targets: str | list[dict[str, Any]] = "onnxruntime:fp32", **changes: Any):
    """The suite's recipe for `model`: `targets` as the command line writes them ("onnxruntime:fp32+int8,openvino")
    or as recipe tables; `changes` replace top-level recipe keys."""
    from diffship.recipe import parse_recipe, targets_from_cli

    chosen = targets_from_cli(targets.split(",")) if isinstance(targets, str) else targets
    return parse_recipe({"model": model, "shapes": TINY_SHAPES, "validation": TINY_VALIDATION,
                         "calibration": TINY_CALIBRATION, "targets": chosen, **changes})


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build built-in models into a fresh cache, so tests never depend on what a machine had. TorchInductor's own
    cache starts empty too: a warm one from an earlier run would hide what a clean machine (CI) pays."""
    cache = tmp_path_factory.mktemp("diffship-cache")
    saved = {k: os.environ.get(k) for k in ("DIFFSHIP_CACHE", "TORCHINDUCTOR_CACHE_DIR")}
    os.environ["DIFFSHIP_CACHE"] = str(cache)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("torchinductor"))
    yield cache
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory, model_cache: Path):
    """exported(name) -> folder with every component of built-in `name` exported (once per session), through the
    session's cache: the exports a build of the same model made or will make."""
    from diffship.exporters.pipeline import export_pipeline
    from diffship.models.source import resolve
    from diffship.store.versions import library_versions

    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            out = tmp_path_factory.mktemp("export") / name
            export_pipeline(resolve(name), out, versions=library_versions())
            done[name] = out
        return done[name]

    return get


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Callable[..., Any]:
    """tiny_build(model, targets, **changes) -> the BuildResult of `tiny_recipe(...)`, built once per session per
    argument list, on first use (a deselected test pays for nothing)."""
    from diffship.stages.build import build

    done: dict[str, Any] = {}

    def get(model: str = "tiny-sd", targets: str = "onnxruntime:fp32", **changes: Any):
        key = repr((model, targets, sorted(changes.items())))
        if key not in done:
            out = tmp_path_factory.mktemp("tiny-build") / Path(model).name  # a built-in's name or a folder's
            done[key] = build(tiny_recipe(model, targets, **changes), out)
        return done[key]

    return get


@pytest.fixture
def model_copy(tmp_path: Path, model_cache: Path):
    """model_copy(name) -> a private, editable copy of built-in `name`'s diffusers folder."""
    from diffship.models.builtin import builtin_folder

    def get(name: str) -> Path:
        dst = tmp_path / f"{name}-copy"
        shutil.copytree(builtin_folder(name), dst)
        return dst

    return get


def toml_lines(data: dict[str, Any]) -> str:
    """`data` as TOML `key = value` lines, tables inline (enough for the suite's recipes and matrix rows)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v) if isinstance(v, str) else str(v)

    return "".join(f"{k} = {value(v)}\n" for k, v in data.items())


# `tiny_recipe("tiny-sd")` as a file, for the command line: a build of it shares every stage with `tiny_build`'s.
FAST_RECIPE = toml_lines({"model": "tiny-sd", "shapes": TINY_SHAPES, "validation": TINY_VALIDATION,
                          "calibration": TINY_CALIBRATION})


def matrix_text(cache: Path, rows: list[tuple[str, list[str], str | None]], cpus: int = 2) -> str:
    """A `diffship farm` matrix of tiny-sd builds with the suite's tiny recipe: (name, targets as the command line
    writes them, GPU kind or None) per row. Each stage gets `cpus` cores (a local build here uses this machine's 2:
    calibration and INT8 scales follow the thread count)."""
    text = f'[cache]\npath = "{cache}"\n'
    for name, targets, kind in rows:
        text += f'\n[[builds]]\nname = "{name}"\ntargets = {json.dumps(targets)}\n' + FAST_RECIPE
        text += f"[builds.farm]\ncpus = {cpus}\n" + (f'accelerator_type = "{kind}"\n' if kind else "")
    return text


def artifact_hashes(manifest: dict) -> dict[str, str]:
    """Every artifact file the manifest records (each set's components and pipeline files), path -> sha256."""
    files: dict[str, str] = {}
    for artifact_set in manifest["artifacts"].values():
        for component in artifact_set["components"].values():
            files |= {f["path"]: f["sha256"] for f in component["files"]}
        files |= {f["path"]: f["sha256"] for f in artifact_set["pipeline_files"]}
    return files


@pytest.fixture
def fast_recipe(tmp_path: Path) -> Path:
    """A recipe file for a quick tiny-sd build: the suite's tiny recipe (one image of 3 steps, latency on)."""
    path = tmp_path / "fast.toml"
    path.write_text(FAST_RECIPE)
    return path


@pytest.fixture(scope="session")
def built(tiny_build: Callable[..., Any]):
    """built(name) -> the suite's build of built-in `name` on ONNX Runtime FP32 (once per session)."""
    return lambda name: tiny_build(name, "onnxruntime:fp32")


@pytest.fixture(scope="session")
def digits_devices(tmp_path_factory: pytest.TempPathFactory, model_cache: Path):
    """digits-sd built once for the browser (web fp32 + fp16) and the phone (mobile fp32 + int8): one export, one
    recorded baseline. Without the web runtime's npm files the build is mobile only (test_web skips)."""
    from diffship.errors import DiffshipError
    from diffship.recipe import parse_recipe
    from diffship.stages.build import build
    from diffship.targets.webapp.bundle import runtime_folder

    targets = [{"name": "mobile", "precisions": ["fp32", "int8"]}]
    try:
        runtime_folder()
        targets.insert(0, {"name": "web", "precisions": ["fp32", "fp16"]})
    except DiffshipError:
        pass
    seven = "a handwritten digit seven"
    recipe = parse_recipe({"model": "digits-sd", "targets": targets,
                           "calibration": {"prompts": [seven, "the number three"], "samples": 8, "steps": 8},
                           # Prompt accuracy (40 more generations) is test_digits'; these sets are judged on parity,
                           # images, the page's image and latency.
                           "validation": {"prompts": [seven], "seeds": [0], "steps": 8, "guidance_scale": 5.0,
                                          "latency": TINY_VALIDATION["latency"], "quality": {"enabled": False}}})
    out = tmp_path_factory.mktemp("devices") / "digits"
    return build(recipe, out), out


@pytest.fixture
def tmpfs(tmp_path: Path):
    """tmpfs(name, size, read_only) -> a fresh tmpfs mounted at tmp_path/name, unmounted after the test."""
    mounted: list[Path] = []

    def mount(name: str, size: str = "8m", read_only: bool = False) -> Path:
        where = tmp_path / name
        where.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"mounting a tmpfs needs root (CAP_SYS_ADMIN), which this run lacks: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)
