"""Shared fixtures: a private model cache for the session, and tiny pipelines exported once."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build built-in models into a fresh cache, so tests never depend on what a machine had."""
    cache = tmp_path_factory.mktemp("diffship-cache")
    previous = os.environ.get("DIFFSHIP_CACHE")
    os.environ["DIFFSHIP_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("DIFFSHIP_CACHE", None)
    else:
        os.environ["DIFFSHIP_CACHE"] = previous


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory, model_cache: Path):
    """exported(name) -> folder with every component of built-in `name` exported (once per session)."""
    from diffship.exporters.pipeline import export_pipeline
    from diffship.models.source import resolve

    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            out = tmp_path_factory.mktemp("export") / name
            export_pipeline(resolve(name), out)
            done[name] = out
        return done[name]

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


FAST_RECIPE = """
model = "tiny-sd"
[shapes]
batch = [1, 2]
height = [64, 128]
width = [64, 128]
[validation]
prompts = ["a red bicycle"]
seeds = [0]
steps = 2
[validation.latency]
enabled = false
"""


@pytest.fixture
def fast_recipe(tmp_path: Path) -> Path:
    """A recipe file for a quick tiny-sd build: one image of 2 steps, no latency runs."""
    path = tmp_path / "fast.toml"
    path.write_text(FAST_RECIPE)
    return path


FAST_VALIDATION = {"prompts": ["a red bicycle"], "seeds": [0], "steps": 2, "latency": {"enabled": False}}


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory, model_cache: Path):
    """built(name) -> a `diffship build` output folder of built-in `name` (fast validation, once per session)."""
    from diffship.build import build
    from diffship.recipe import parse_recipe

    done: dict[str, object] = {}

    def get(name: str):
        if name not in done:
            out = tmp_path_factory.mktemp("build") / name
            recipe = parse_recipe({"model": name, "shapes": {"batch": [1, 2], "height": [64, 128], "width": [64, 128]},
                                   "validation": FAST_VALIDATION})
            done[name] = build(recipe, out)
        return done[name]

    return get


@pytest.fixture(scope="session")
def digits_devices(tmp_path_factory: pytest.TempPathFactory, model_cache: Path):
    """digits-sd built once for the browser (web fp32 + fp16) and the phone (mobile fp32 + int8): one export, one
    recorded baseline. Without the web runtime's npm files the build is mobile only (test_web skips)."""
    from diffship.build import build
    from diffship.errors import DiffshipError
    from diffship.recipe import parse_recipe
    from diffship.web.bundle import runtime_folder

    targets = [{"name": "mobile", "precisions": ["fp32", "int8"]}]
    try:
        runtime_folder()
        targets.insert(0, {"name": "web", "precisions": ["fp32", "fp16"]})
    except DiffshipError:
        pass
    seven = "a handwritten digit seven"
    recipe = parse_recipe({"model": "digits-sd", "targets": targets,
                           "calibration": {"prompts": [seven, "the number three"], "samples": 8, "steps": 8},
                           "validation": {"prompts": [seven], "seeds": [0], "steps": 8, "guidance_scale": 5.0,
                                          "latency": {"enabled": False}, "quality": {"seeds": [0]}}})
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
