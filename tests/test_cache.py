"""The cache: nothing done to an output changes it, every hit is verified, a corrupted entry is rebuilt, concurrent
builds share it, and `diffship cache verify / prune` keep it honest and bounded."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FAST_RECIPE
from typer.testing import CliRunner

from diffship.cli.main import app
from diffship.store import cache
from diffship.store.manifest import open_artifacts

runner = CliRunner()

@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("DIFFSHIP_CACHE", str(folder))
    return folder


def build(recipe: Path, out: Path, *extra: str):
    return runner.invoke(app, ["build", str(recipe), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding every stage of one tiny-sd build (made once for the module)."""
    folder = tmp_path_factory.mktemp("warm") / "cache"
    path = folder.parent / "fast.toml"
    path.write_text(FAST_RECIPE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFSHIP_CACHE", str(folder))
        assert build(path, folder.parent / "out").exit_code == 0
    return folder


@pytest.fixture
def warm_copy(warm: Path, fresh_cache: Path) -> Path:
    """This test's own copy of the warm cache (tests damage it)."""
    shutil.copytree(warm, fresh_cache, symlinks=True)
    return fresh_cache


def export_entry(fresh_cache: Path, component: str) -> Path:
    for entry in (fresh_cache / "artifacts" / "export").iterdir():
        if entry.is_dir() and not entry.name.startswith(".") and cache.read_entry(entry).get("component") == component:
            return entry
    raise AssertionError(f"no export entry for {component}")


def test_editing_an_output_in_place_does_not_touch_the_cache(tmp_path: Path, warm_copy: Path, fast_recipe: Path):
    first = tmp_path / "a"
    assert build(fast_recipe, first).exit_code == 0
    edited = first / "onnx" / "unet" / "model.onnx"
    entry_file = export_entry(warm_copy, "unet") / "model.onnx"
    assert edited.stat().st_ino != entry_file.stat().st_ino and edited.stat().st_nlink == 1  # a copy, not a link
    with edited.open("ab") as handle:  # what onnx-simplifier, a re-save or a sed does to a file in place
        handle.write(b"x")
    result = build(fast_recipe, tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert "[export 2/4] unet: cached (no work)" in result.output and "corrupted" not in result.output
    assert open_artifacts(tmp_path / "b").status == "passed"  # every hash in the new folder verifies


def test_a_corrupted_entry_is_evicted_rebuilt_and_reported_in_one_line(tmp_path: Path, warm_copy: Path, fast_recipe: Path):
    damaged = export_entry(warm_copy, "unet") / "model.onnx"
    damaged.chmod(0o644)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, so only the hash can tell
    damaged.write_bytes(bytes(data))
    os.utime(damaged, ns=(damaged.stat().st_atime_ns, damaged.stat().st_mtime_ns + 10**9))
    result = build(fast_recipe, tmp_path / "b")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "was corrupted" in line]
    assert lines == ["cache entry for unet export was corrupted (model.onnx: sha256 differs); rebuilt"]
    assert "[export 1/4] text_encoder: cached (no work)" in result.output
    assert cache.problem(export_entry(warm_copy, "unet"), memo=False) is None
    assert open_artifacts(tmp_path / "b").status == "passed"


def test_cache_verify_finds_every_changed_byte_and_evict_removes_the_entry(warm_copy: Path):
    result = runner.invoke(app, ["cache", "verify"])
    assert result.exit_code == 0, result.output
    assert "every entry matches its record" in result.output
    entry = export_entry(warm_copy, "vae_decoder")
    damaged = entry / "model.onnx"
    stamp = damaged.stat()
    damaged.chmod(0o644)
    data = bytearray(damaged.read_bytes())
    data[100] ^= 0x01
    damaged.write_bytes(bytes(data))
    os.utime(damaged, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # the memo alone would not see it
    result = runner.invoke(app, ["cache", "verify"])
    assert result.exit_code == 1, result.output
    assert "corrupted" in result.output and "model.onnx: sha256 differs" in result.output and entry.exists()
    result = runner.invoke(app, ["cache", "verify", "--evict"])
    assert result.exit_code == 0, result.output
    assert "1 corrupted entry removed" in result.output and not entry.exists()


def _entry(stage: str, name: str, size: int, days_ago: float) -> Path:
    def produce(folder: Path, info: dict) -> None:
        (folder / "data.bin").write_bytes(os.urandom(size))

    done = cache.cached_step(stage, cache.key(name=name), name, produce)
    when = time.time() - days_ago * 86400
    os.utime(done.path / cache.ENTRY_FILE, (when, when))
    return done.path


def test_cache_prune_removes_by_age_then_least_recently_used_until_under_the_size(fresh_cache: Path):
    old = _entry("export", "old", 1000, days_ago=40)
    mid = _entry("compile", "mid", 1000, days_ago=5)
    recent = _entry("compile", "recent", 1000, days_ago=1)
    newest = _entry("validate", "newest", 1000, days_ago=0)
    result = runner.invoke(app, ["cache", "prune", "--older-than", "30"])
    assert result.exit_code == 0, result.output
    assert not old.exists() and mid.exists() and recent.exists() and newest.exists()
    assert "removed 1 entry" in result.output
    result = runner.invoke(app, ["cache", "prune", "--max-size", str(2500 / 1e9)])
    assert result.exit_code == 0, result.output
    assert not mid.exists() and recent.exists() and newest.exists()  # the least recently used went first
    assert "removed 1 entry" in result.output and "compile" in result.output
    assert runner.invoke(app, ["cache", "prune", "--max-size", "-1"]).exit_code == 2


def test_prune_keeps_an_entry_a_running_build_holds(fresh_cache: Path):
    held = _entry("export", "held", 1000, days_ago=100)
    with cache.locked(held, lambda _: None, "held"):
        result = runner.invoke(app, ["cache", "prune", "--older-than", "1"])
    assert result.exit_code == 0 and held.exists()
    assert runner.invoke(app, ["cache", "prune", "--older-than", "1"]).exit_code == 0 and not held.exists()


def test_external_data_delivered_from_the_cache_loads_in_onnx(tmp_path: Path, fresh_cache: Path):
    """onnx 1.23 refuses external data with more than one hard link; a build delivers every file as its own copy."""
    def produce(folder: Path, info: dict) -> None:
        weight = onnx.numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
        graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                       [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                                       [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], [weight])
        onnx.save(onnx.helper.make_model(graph), str(folder / "model.onnx"), save_as_external_data=True,
                  location="model.onnx_data", size_threshold=0)

    out = tmp_path / "out"
    cache.cached_step("export", cache.key(test="external"), "test export", produce, copy_to=out)
    cache.cached_step("export", cache.key(test="external"), "test export", produce, copy_to=tmp_path / "again")
    for folder in (out, tmp_path / "again"):
        model = onnx.load(str(folder / "model.onnx"))  # loads the external data
        assert onnx.numpy_helper.to_array(model.graph.initializer[0]).sum() == 64 * 64


def _spawn(recipe: Path, out: Path, cache_dir: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "DIFFSHIP_CACHE": str(cache_dir)}
    return subprocess.Popen([sys.executable, "-m", "diffship.cli", "build", str(recipe), "--out", str(out)], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_three_builds_started_together_on_a_cold_cache_all_succeed_and_do_the_work_once(tmp_path: Path, fast_recipe: Path):
    """Two into the same output folder and one into another, as parallel release jobs do."""
    cold = tmp_path / "cache"
    outs = [tmp_path / "shared", tmp_path / "shared", tmp_path / "own"]
    logs = [tmp_path / f"build-{i}.log" for i in range(3)]
    children = [_spawn(fast_recipe, out, cold, log) for out, log in zip(outs, logs, strict=True)]
    codes = [child.wait(timeout=600) for child in children]
    said = [log.read_text() for log in logs]
    assert codes == [0, 0, 0], said
    assert not any("Traceback" in s for s in said)
    # Each component was exported once: the other builds waited for the one that held its key and reused the entry.
    assert sum(s.count(": exporting ...") for s in said) == 4, said
    assert "waiting for another diffship process that is building the" in "".join(said)
    for out in set(outs):
        assert open_artifacts(out).status == "passed"
    assert not list(tmp_path.glob(".*.partial")) and not list((cold / "artifacts").glob("*/.*.partial"))


def test_a_build_killed_while_storing_a_cache_entry_leaves_a_cache_the_next_build_trusts(tmp_path: Path, fast_recipe: Path):
    cold = tmp_path / "cache"
    child = _spawn(fast_recipe, tmp_path / "out", cold, tmp_path / "killed.log")
    stages = cold / "artifacts" / "export"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and child.poll() is None:  # kill it while an entry is half-stored (lock held)
        if list(stages.glob(".*.partial/model.onnx")):
            break
        time.sleep(0.01)
    assert child.poll() is None, "the build finished before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert list(stages.glob(".*.partial"))

    rerun = _spawn(fast_recipe, tmp_path / "out", cold, tmp_path / "rerun.log")
    assert rerun.wait(timeout=600) == 0, (tmp_path / "rerun.log").read_text()  # the dead writer's lock does not hang it
    assert "waiting for another" not in (tmp_path / "rerun.log").read_text()
    assert open_artifacts(tmp_path / "out").status == "passed"
    assert not list(stages.glob(".*.partial"))
    env = {**os.environ, "DIFFSHIP_CACHE": str(cold)}
    verify = subprocess.run([sys.executable, "-m", "diffship.cli", "cache", "verify"], env=env, capture_output=True,
                            text=True)
    assert verify.returncode == 0 and "every entry matches its record" in verify.stdout, verify.stdout + verify.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["passed"] is True


def _tiny_ir(folder: Path) -> Path:
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([1, 64], np.float32, name="x")
    weights = ops.constant(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
    model = ov.Model([ops.relu(ops.matmul(x, weights, False, False))], [x], "tiny")
    folder.mkdir(parents=True)
    ov.save_model(model, folder / "openvino_model.xml", compress_to_fp16=False)
    return folder / "openvino_model.xml"


def test_prune_bounds_openvinos_compiled_blobs_which_pile_up_per_output_folder(fresh_cache: Path, tmp_path: Path):
    from diffship.targets import openvino as target

    # The same IR in two output folders: OpenVINO keys its blob by the path, so each adds one to the cache.
    xmls = [_tiny_ir(tmp_path / name) for name in ("first-build", "second-build")]
    x = {"x": np.ones((1, 64), np.float32)}
    expected = [target.load(xml, target.OvOptions(), "fp32").run(x) for xml in xmls]
    blobs = sorted((fresh_cache / "openvino-model-cache").glob("*.blob"))
    assert len(blobs) == 2
    old = time.time() - 40 * 86400
    os.utime(blobs[0], (old, old))
    result = runner.invoke(app, ["cache", "prune", "--older-than", "30"])
    assert result.exit_code == 0, result.output
    assert "openvino-model-cache" in result.output and "removed 1 entry" in result.output
    assert not blobs[0].exists() and blobs[1].exists()
    result = runner.invoke(app, ["cache", "prune", "--max-size", "0"])
    assert result.exit_code == 0 and not list((fresh_cache / "openvino-model-cache").glob("*.blob"))
    # Nothing depended on the blobs: the next load compiles the IR again, with the same outputs.
    again = target.load(xmls[0], target.OvOptions(), "fp32").run(x)
    assert [np.array_equal(a, b) for a, b in zip(again.values(), expected[0].values(), strict=True)] == [True]
