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

from diffship.build import build
from diffship.errors import DiffshipError
from diffship.farm.matrix import load_matrix
from diffship.farm.run import run_farm
from diffship.recipe import parse_recipe

ray = pytest.importorskip("ray", reason="the farm runs on Ray, the `farm` extra: pip install 'diffship[farm]'")
pytestmark = pytest.mark.farm

from ray_cluster import Cluster, start_head, stop  # noqa: E402 (the cluster helper needs Ray)

CLI = [sys.executable, "-m", "diffship.cli"]
TINY = {"model": "tiny-sd", "calibration": {"samples": 4},
        "shapes": {"batch": [1, 2], "height": [64, 128], "width": [64, 128]},
        "validation": {"prompts": ["a red bicycle"], "seeds": [0], "steps": 2, "latency": {"enabled": False}}}
BUILD = """
model = "tiny-sd"
calibration = {{ samples = 4 }}
shapes = {{ batch = [1, 2], height = [64, 128], width = [64, 128] }}
validation = {{ prompts = ["a red bicycle"], seeds = [0], steps = 2, latency = {{ enabled = false }} }}
"""


def matrix_text(cache: Path, rows: list[tuple[str, list[str], str | None]]) -> str:
    """A matrix of tiny-sd builds: (name, targets as the command line writes them, GPU kind or None). Each stage gets
    this machine's 2 cores, as a local build does: calibration and INT8 scales follow the thread count."""
    text = f'[cache]\npath = "{cache}"\n'
    for name, targets, kind in rows:
        text += f'\n[[builds]]\nname = "{name}"\ntargets = {json.dumps(targets)}' + BUILD.format()
        text += "[builds.farm]\ncpus = 2\n" + (f'accelerator_type = "{kind}"\n' if kind else "")
    return text


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
def local(tmp_path_factory: pytest.TempPathFactory):
    """tiny-sd built by `build()` here, with a cache of its own: onnxruntime fp32 + openvino int8-hybrid, on 2 threads
    as the farm's stages."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the stages' `cpus` in the matrix: calibration's last bits follow the thread count
    try:
        with cache_at(tmp_path_factory.mktemp("local-cache")):
            recipe = parse_recipe({**TINY, "targets": [{"name": "onnxruntime", "precisions": ["fp32"]},
                                                       {"name": "openvino", "precisions": ["int8-hybrid"]}]})
            result = build(recipe, tmp_path_factory.mktemp("local") / "tiny-sd")
    finally:
        torch.set_num_threads(threads)
    assert result.passed
    return result


@pytest.fixture(scope="module")
def on_cluster(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory):
    """The matrix on the cluster: tiny-sd (onnxruntime fp32, openvino int8-hybrid) and a TensorRT build for H100s."""
    root = tmp_path_factory.mktemp("farm")
    (root / "matrix.toml").write_text(matrix_text(root / "cache", [
        ("tiny-sd", ["onnxruntime:fp32", "openvino:int8-hybrid"], None), ("tiny-sd-trt", ["tensorrt:fp16"], "H100")]))
    lines: list[str] = []
    with cache_at(root / "cache"):
        result = run_farm(load_matrix(root / "matrix.toml"), root / "out", lines.append, cluster.address)
    return result, root / "out", lines


def artifact_hashes(manifest: dict) -> dict[str, str]:
    """Every artifact file the manifest records (each set's components and pipeline files), path -> sha256."""
    files: dict[str, str] = {}
    for artifact_set in manifest["artifacts"].values():
        for component in artifact_set["components"].values():
            files |= {f["path"]: f["sha256"] for f in component["files"]}
        files |= {f["path"]: f["sha256"] for f in artifact_set["pipeline_files"]}
    return files


def test_a_matrix_on_the_cluster_gives_the_artifacts_of_a_local_build(on_cluster, local, cluster: Cluster) -> None:
    _, out, lines = on_cluster
    farm_manifest = json.loads((out / "tiny-sd" / "manifest.json").read_text())
    local_hashes, farm_hashes = artifact_hashes(local.manifest), artifact_hashes(farm_manifest)
    assert len(local_hashes) > 20 and farm_hashes == local_hashes
    onnx = sorted(p.relative_to(local.out) for p in local.out.rglob("*") if p.suffix in (".onnx", ".xml", ".bin"))
    assert onnx and all((out / "tiny-sd" / p).read_bytes() == (local.out / p).read_bytes() for p in onnx)
    summary = json.loads((out / "farm.json").read_text())
    row = next(b for b in summary["builds"] if b["name"] == "tiny-sd")
    assert row["verdict"] == "passed" and farm_manifest["passed"]
    ran = {t["node"] for t in summary["tasks"] if t["row"] == "tiny-sd"}
    assert ran <= set(cluster.workers.values())  # the head runs no task
    assert any("running" in line and "queued" in line for line in lines)  # the live count
    assert (out / "farm.html").read_text().count("<tr>") > 12


def test_a_tensorrt_stage_runs_only_on_the_node_of_its_gpu_kind(on_cluster, cluster: Cluster) -> None:
    result, out, _ = on_cluster
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
    assert not result.passed and not (out / "tiny-sd-trt").exists()  # the other row still passed (test above)


def test_a_resource_no_node_has_fails_at_once_naming_it(cluster: Cluster, tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text(matrix_text(tmp_path / "cache", [("trt", ["tensorrt:fp16"], "A100")]))
    began = time.monotonic()
    done = subprocess.run([*CLI, "farm", str(tmp_path / "m.toml"), "--out", str(tmp_path / "out"), "--ray",
                           cluster.address], capture_output=True, text=True, env=cluster.env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "accelerator_type:A100" in done.stderr and "Nothing was submitted" in done.stderr
    assert not (tmp_path / "out" / "farm.json").exists()
    assert time.monotonic() - began < 300


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


def test_a_bad_matrix_is_refused_before_any_work(tmp_path: Path) -> None:
    cases = {
        "no cache": ('[[builds]]\nmodel = "tiny-sd"\n', "[cache]"),
        "twice the same name": ('[cache]\npath = "c"\n[[builds]]\nmodel = "tiny-sd"\n[[builds]]\nmodel = "tiny-sd"\n',
                                "distinct `name`s"),
        "tensorrt without a GPU kind": ('[cache]\npath = "c"\n[[builds]]\nmodel = "tiny-sd"\ntargets = ["tensorrt:fp16"]\n',
                                        "accelerator_type"),
        "a name that leaves the folder": ('[cache]\npath = "c"\n[[builds]]\nname = "../x"\nmodel = "tiny-sd"\n',
                                          "plain folder name"),
        "an unknown farm key": ('[cache]\npath = "c"\n[[builds]]\nmodel = "tiny-sd"\nfarm = { gpu = "H100" }\n',
                                "gpu: unknown key"),
    }
    for what, (text, said) in cases.items():
        (tmp_path / "m.toml").write_text(text)
        done = subprocess.run([*CLI, "farm", str(tmp_path / "m.toml"), "--out", str(tmp_path / "out")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and said in done.stderr, (what, done.stderr)
        assert "Traceback" not in done.stderr and not (tmp_path / "out").exists(), what
    with pytest.raises(DiffshipError, match="all strings"):
        (tmp_path / "m.toml").write_text('[cache]\npath = "c"\n[[builds]]\ntargets = ["onnxruntime", {name = "openvino"}]\n')
        load_matrix(tmp_path / "m.toml")


def test_an_output_folder_farm_did_not_write_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text(matrix_text(tmp_path / "cache", [("tiny-sd", ["onnxruntime:fp32"], None)]))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    done = subprocess.run([*CLI, "farm", str(tmp_path / "m.toml"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "holds no farm.json" in done.stderr, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]


def test_an_address_where_no_cluster_answers_is_refused_at_once(tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text(matrix_text(tmp_path / "cache", [("tiny-sd", ["onnxruntime:fp32"], None)]))
    with socket.socket() as probe:  # a port nothing listens on: bound, then closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for address, said in ((f"127.0.0.1:{port}", "nothing answers there"), ("headnode", "is not an address")):
        # Ray alone retries such an address for over 10 minutes; the timeout fails the test long before that.
        done = subprocess.run([*CLI, "farm", str(tmp_path / "m.toml"), "--out", str(tmp_path / "out"), "--ray",
                               address], capture_output=True, text=True, timeout=240)
        assert done.returncode == 2 and said in done.stderr, (address, done.stderr)
        assert "Traceback" not in done.stderr and not (tmp_path / "out").exists(), address
        assert not (tmp_path / "cache").exists(), address
