"""`diffship farm` on a real Ray cluster started here (a head and two worker nodes, one labelled as an H100 node),
against the same builds run locally: byte-identical artifacts, TensorRT stages on the labelled node, a killed raylet
survived, a resource no node has refused at once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffship.farm.matrix import load_matrix
from diffship.farm.run import run_farm

ray = pytest.importorskip("ray", reason="the farm runs on Ray, the `farm` extra: pip install 'diffship[farm]'")
pytestmark = pytest.mark.farm

from conftest import artifact_hashes, matrix_text  # noqa: E402
from ray_cluster import Cluster, start_head, stop  # noqa: E402 (the cluster helper needs Ray)

CLI = [sys.executable, "-m", "diffship.cli"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """Head (no task CPUs) + a CPU worker + a worker with one (pretend) GPU labelled accelerator_type:H100, each
    offering this machine's 2 cores (so each runs one stage at a time)."""
    env = dict(os.environ)
    stop(env)
    head = start_head(env)
    try:
        head.start_worker("cpu", "--num-cpus=2", f"--memory={4 * 2**30}")
        head.start_worker("h100", "--num-cpus=2", "--num-gpus=1", f"--memory={4 * 2**30}",
                          '--resources={"accelerator_type:H100": 1}')
        yield head
    finally:
        stop(env)


@contextlib.contextmanager
def cache_at(folder: Path):
    """DIFFSHIP_CACHE pointed at `folder` in this process (run_farm points it at the matrix's), then put back."""
    before = os.environ.get("DIFFSHIP_CACHE")
    os.environ["DIFFSHIP_CACHE"] = str(folder)
    try:
        yield
    finally:
        os.environ.pop("DIFFSHIP_CACHE", None) if before is None else os.environ.update(DIFFSHIP_CACHE=before)


@pytest.fixture(scope="module")
def local(tiny_build):
    """tiny-sd built by `build()` here for ONNX Runtime FP32, with the session's cache (not the farm's)."""
    result = tiny_build("tiny-sd", "onnxruntime:fp32")
    assert result.passed
    return result


@pytest.fixture(scope="module")
def on_cluster(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory):
    """A matrix on the cluster, with a cache of its own: tiny-sd on ONNX Runtime FP32."""
    return _run_on(cluster, tmp_path_factory.mktemp("farm"), [("tiny-sd", ["onnxruntime:fp32"], None)])


@pytest.fixture(scope="module")
def trt_on_cluster(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory):
    """A TensorRT build for H100s on the cluster (its exports on any node, its compiles on the H100 one)."""
    return _run_on(cluster, tmp_path_factory.mktemp("farm-trt"), [("tiny-sd-trt", ["tensorrt:fp16"], "H100")])


def _run_on(cluster: Cluster, root: Path, rows: list[tuple[str, list[str], str | None]]):
    (root / "matrix.toml").write_text(matrix_text(root / "cache", rows))
    lines: list[str] = []
    with cache_at(root / "cache"):
        result = run_farm(load_matrix(root / "matrix.toml"), root / "out", lines.append, cluster.address)
    return result, root / "out", lines


def test_a_matrix_on_the_cluster_gives_the_artifacts_of_a_local_build(on_cluster, local, cluster: Cluster) -> None:
    _, out, lines = on_cluster
    farm_manifest = json.loads((out / "tiny-sd" / "manifest.json").read_text())
    local_hashes, farm_hashes = artifact_hashes(local.manifest), artifact_hashes(farm_manifest)
    assert len(local_hashes) > 10 and farm_hashes == local_hashes
    report = json.loads((out / "tiny-sd" / "report" / "report.json").read_text())
    assert report["sets"]["onnxruntime-fp32"]["latency"]["pipeline"]["target"]["total"]["p50_s"] > 0
    onnx = sorted(p.relative_to(local.out) for p in local.out.rglob("*") if p.suffix in (".onnx", ".xml", ".bin"))
    assert onnx and all((out / "tiny-sd" / p).read_bytes() == (local.out / p).read_bytes() for p in onnx)
    summary = json.loads((out / "farm.json").read_text())
    row = next(b for b in summary["builds"] if b["name"] == "tiny-sd")
    assert row["verdict"] == "passed" and farm_manifest["passed"]
    tasks = [t for t in summary["tasks"] if t["row"] == "tiny-sd"]
    assert {t["node"] for t in tasks} <= set(cluster.workers.values())  # the head runs no task
    assert any("running" in line and "queued" in line for line in lines)  # the live count
    assert (out / "farm.html").read_text().count("<tr>") > len(tasks)


@pytest.mark.slow
def test_a_tensorrt_stage_runs_only_on_the_node_of_its_gpu_kind(trt_on_cluster, cluster: Cluster) -> None:
    result, out, _ = trt_on_cluster
    summary = json.loads((out / "farm.json").read_text())
    compiles = [t for t in summary["tasks"] if t["row"] == "tiny-sd-trt" and t["stage"] == "compile"]
    assert len(compiles) == 4
    for task in compiles:
        assert task["resources"] == {"GPU": 1.0, "accelerator_type:H100": 0.001}
        assert task["node"] == cluster.workers["h100"]
        # the labelled node of this test has no CUDA and no TensorRT: the stage refuses, naming why
        assert task["status"] == "error" and "'tensorrt' package" in task["message"]
    row = next(b for b in summary["builds"] if b["name"] == "tiny-sd-trt")
    assert row["verdict"] == "error" and "'tensorrt' package" in row["message"]
    exports = [t for t in summary["tasks"] if t["row"] == "tiny-sd-trt" and t["stage"] == "export"]
    assert exports and all(t["status"] in ("done", "cached") for t in exports)  # exports need no GPU
    assert not result.passed and not (out / "tiny-sd-trt").exists()


def test_a_resource_no_node_has_fails_at_once_naming_it(cluster: Cluster, tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text(matrix_text(tmp_path / "cache", [("trt", ["tensorrt:fp16"], "A100")]))
    began = time.monotonic()
    done = subprocess.run([*CLI, "farm", str(tmp_path / "m.toml"), "--out", str(tmp_path / "out"), "--ray",
                           cluster.address], capture_output=True, text=True, env=cluster.env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "accelerator_type:A100" in done.stderr and "Nothing was submitted" in done.stderr
    assert not (tmp_path / "out" / "farm.json").exists()
    assert time.monotonic() - began < 120, "refused only after waiting"


@pytest.mark.slow
def test_ctrl_c_cancels_the_matrix_and_says_what_finished(cluster: Cluster, tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text(matrix_text(tmp_path / "cache", [("tiny-sd", ["onnxruntime:fp32"], None)]))
    farm = subprocess.Popen([*CLI, "farm", str(tmp_path / "m.toml"), "--out", str(tmp_path / "out"), "--ray",
                             cluster.address], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=cluster.env)
    # Interrupted on its first progress line, while the rest of the matrix is running or queued: polling the
    # cluster's task list for a running task could miss every window of this tiny matrix (it did once: the whole
    # matrix finished and exited 0 before the poll saw a task).
    seen = []
    for line in farm.stdout:
        seen.append(line)
        if " done, " in line and " queued]" in line:
            break
    farm.send_signal(signal.SIGINT)
    rest, _ = farm.communicate(timeout=120)
    output = "".join(seen) + rest
    assert farm.returncode == 130, output
    assert "cancelled" in output and "Traceback" not in output
    summary = json.loads((tmp_path / "out" / "farm.json").read_text())
    assert any(t["status"] == "cancelled" for t in summary["tasks"]) and summary["builds"][0]["verdict"] == "cancelled"
    assert not (tmp_path / "out" / "tiny-sd").exists()
    deadline = time.monotonic() + 60
    while cluster.running() and time.monotonic() < deadline:  # force-cancelled: the workers are gone
        time.sleep(1)
    assert not cluster.running()


@pytest.mark.slow
def test_killing_a_worker_raylet_mid_stage_still_finishes_the_matrix(cluster: Cluster, local, tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text(matrix_text(tmp_path / "cache", [("tiny-sd", ["onnxruntime:fp32"], None)]))
    farm = subprocess.Popen([*CLI, "farm", str(tmp_path / "m.toml"), "--out", str(tmp_path / "out"), "--ray",
                             cluster.address], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=cluster.env)
    victim = cluster.workers["cpu"]
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and time.monotonic() < deadline and farm.poll() is None:
        running = [t for t in cluster.running() if t.get("node_id") == victim]
        if running:
            cluster.kill_raylet(victim)
            killed = running[0]["name"]
        time.sleep(0.5)
    output, _ = farm.communicate(timeout=600)
    assert killed, "no task ran on the CPU worker"
    assert farm.returncode == 0, output
    summary = json.loads((tmp_path / "out" / "farm.json").read_text())
    again = next(t for t in summary["tasks"] if t["key"] == killed)
    assert again["status"] in ("done", "cached") and again["node"] != victim  # retried elsewhere
    manifest = json.loads((tmp_path / "out" / "tiny-sd" / "manifest.json").read_text())
    expected = {p: h for p, h in artifact_hashes(local.manifest).items() if not p.startswith("openvino")}
    assert artifact_hashes(manifest) == expected
    assert victim not in cluster.node_ids()


def test_an_address_where_no_cluster_answers_is_refused_at_once(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from diffship.cli.main import app

    (tmp_path / "m.toml").write_text(matrix_text(tmp_path / "cache", [("tiny-sd", ["onnxruntime:fp32"], None)]))
    with socket.socket() as probe:  # a port nothing listens on: bound, then closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for address, said in ((f"127.0.0.1:{port}", "nothing answers there"), ("headnode", "is not an address")):
        # Ray alone retries such an address for over 10 minutes; refused before it is asked.
        began = time.monotonic()
        done = CliRunner().invoke(app, ["farm", str(tmp_path / "m.toml"), "--out", str(tmp_path / "out"), "--ray",
                                        address])
        assert done.exit_code == 2 and said in done.output, (address, done.output)
        assert time.monotonic() - began < 60, address
        assert "Traceback" not in done.output and not (tmp_path / "out").exists(), address
        assert not (tmp_path / "cache").exists(), address
