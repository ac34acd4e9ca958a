"""`diffship farm` without Ray: a matrix run here, one stage at a time, gives the folders `diffship build` gives, and a
bad matrix or a folder farm did not write is refused before any work. Nothing here needs Ray installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import artifact_hashes, matrix_text
from typer.testing import CliRunner

from diffship.cli.main import app
from diffship.farm.matrix import load_matrix

runner = CliRunner()


def test_a_matrix_run_here_builds_each_row_as_diffship_build_does(tiny_build, model_cache: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch):
    """Two rows on the session's cache: tiny-sd as the suite builds it (its stages found in the cache when another
    test built them first) and the same build held to a bar no artifact meets, which fails alone: exit 1, the other
    row still built, and each verdict in farm.json."""
    monkeypatch.setenv("DIFFSHIP_CACHE", str(model_cache))  # run_farm points the process at the matrix's cache
    matrix = tmp_path / "matrix.toml"
    impossible = "thresholds = { fp32 = { min_cosine = 1.0, max_rel_l2 = 0.0, min_psnr = 200.0, min_ssim = 1.0 } }\n"
    text = matrix_text(model_cache, [("tiny-sd", ["onnxruntime:fp32"], None), ("strict", ["onnxruntime:fp32"], None)])
    matrix.write_text(text.replace('name = "strict"\n', 'name = "strict"\n' + impossible))
    assert len(load_matrix(matrix).rows) == 2
    done = runner.invoke(app, ["farm", str(matrix), "--out", str(tmp_path / "out")])
    assert done.exit_code == 1, done.output
    assert "run here one at a time" in done.output
    summary = json.loads((tmp_path / "out" / "farm.json").read_text())
    verdicts = {b["name"]: b["verdict"] for b in summary["builds"]}
    assert verdicts == {"tiny-sd": "passed", "strict": "failed"}, verdicts
    strict = json.loads((tmp_path / "out" / "strict" / "manifest.json").read_text())
    assert not strict["passed"] and strict["artifacts"]["onnxruntime-fp32"]["status"] == "failed"
    tasks = [t for t in summary["tasks"] if t["row"] == "tiny-sd"]
    assert {t["stage"] for t in tasks} >= {"export", "validate", "assemble"} and all(t["node"] == "local" for t in tasks)
    assert all(t["status"] in ("done", "cached", "passed") for t in tasks), tasks
    # The row's folder is the build `diffship build` writes for the same recipe: the same artifacts, byte for byte,
    # validated with the default recipe's steps (latency measured).
    farm = json.loads((tmp_path / "out" / "tiny-sd" / "manifest.json").read_text())
    local = tiny_build("tiny-sd", "onnxruntime:fp32")
    assert farm["passed"] and artifact_hashes(farm) == artifact_hashes(local.manifest) and len(artifact_hashes(farm)) > 10
    report = json.loads((tmp_path / "out" / "tiny-sd" / "report" / "report.json").read_text())
    assert report["sets"]["onnxruntime-fp32"]["latency"]["pipeline"]["target"]["total"]["p50_s"] > 0
    assert (tmp_path / "out" / "farm.html").read_text().count("<tr>") > len(tasks)


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
        "mixed target kinds": ('[cache]\npath = "c"\n[[builds]]\ntargets = ["onnxruntime", {name = "openvino"}]\n',
                               "all strings"),
    }
    for what, (text, said) in cases.items():
        (tmp_path / "m.toml").write_text(text)
        done = runner.invoke(app, ["farm", str(tmp_path / "m.toml"), "--out", str(tmp_path / "out")])
        assert done.exit_code == 2 and said in done.output, (what, done.output)
        assert "Traceback" not in done.output and not (tmp_path / "out").exists(), what


def test_an_output_folder_farm_did_not_write_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text(matrix_text(tmp_path / "cache", [("tiny-sd", ["onnxruntime:fp32"], None)]))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    done = runner.invoke(app, ["farm", str(tmp_path / "m.toml"), "--out", str(tmp_path / "out")])
    assert done.exit_code == 2 and "holds no farm.json" in done.output, done.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]
