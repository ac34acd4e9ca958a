"""A full disk, a read-only output folder, a cache that cannot be written: real tmpfs mounts, not simulated errors.
A full disk or an unwritable output is one line and exit 2, with nothing visible left behind; an unwritable cache
is said and built around."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffship.cli.main import app
from diffship.errors import DiffshipError
from diffship.store.manifest import open_artifacts

runner = CliRunner()

def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1, output
    assert "Traceback" not in output
    return lines[-1]


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".partial") or ".partial/" in p.as_posix()]


def test_an_output_disk_that_fills_exits_2_saying_where_and_how_much(tmp_path: Path, tmpfs, fast_recipe: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DIFFSHIP_CACHE", str(tmp_path / "cache"))
    disk = tmpfs("small", "8m")
    result = runner.invoke(app, ["build", str(fast_recipe), "--out", str(disk / "out")])
    assert result.exit_code == 2, result.output
    line = one_error_line(result.output)
    assert "The disk is full: no space left on device while writing " + str(disk / "out") in line
    assert "free there; it needed" in line
    assert list(disk.iterdir()) == []  # no output folder, no staging folder


def test_a_cache_disk_that_fills_mid_build_exits_2_and_leaves_no_half_written_entry(tmp_path: Path, tmpfs, fast_recipe: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch):
    disk = tmpfs("cache", "24m")  # room for the built-in model (18 MB), not for every export
    monkeypatch.setenv("DIFFSHIP_CACHE", str(disk))
    out = tmp_path / "out"
    result = runner.invoke(app, ["build", str(fast_recipe), "--out", str(out)])
    assert result.exit_code == 2, result.output
    line = one_error_line(result.output)
    assert f"The disk is full: no space left on device while writing {disk}/artifacts/export/" in line
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    assert leftovers(disk) == []


def test_a_read_only_output_location_exits_2_before_any_work(tmp_path: Path, tmpfs, fast_recipe: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DIFFSHIP_CACHE", str(tmp_path / "cache"))
    disk = tmpfs("readonly", "1m", read_only=True)
    result = runner.invoke(app, ["build", str(fast_recipe), "--out", str(disk / "out")])
    assert result.exit_code == 2, result.output
    assert f"Output location {disk / 'out'} is not writable" in one_error_line(result.output)
    assert "exporting" not in result.output


def test_a_cache_that_cannot_be_written_is_said_and_the_build_goes_on_without_it(tmp_path: Path, tmpfs, fast_recipe: Path,
                                                                               monkeypatch: pytest.MonkeyPatch):
    disk = tmpfs("readonly-cache", "1m", read_only=True)
    monkeypatch.setenv("DIFFSHIP_CACHE", str(disk / "cache"))
    out = tmp_path / "out"
    result = runner.invoke(app, ["build", str(fast_recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"The cache {disk / 'cache'} cannot be written (Read-only file system): building without it" in result.output
    assert "build passed" in result.output and open_artifacts(out).status == "passed"
    assert list(disk.iterdir()) == []


def test_openvino_writing_into_a_full_disk_says_disk_full_not_an_internal_error(tmpfs, exported):
    from diffship.errors import DiskFull
    from diffship.models.components import component_specs
    from diffship.models.source import resolve
    from diffship.targets import CompileContext, openvino

    # OpenVINO itself reports a full disk only as "basic_ios::clear: iostream error".
    spec = next(s for s in component_specs(resolve("tiny-sd").folder) if s.name == "text_encoder")
    disk = tmpfs("full", "64k")
    with pytest.raises(DiskFull, match="The disk is full: no space left on device while writing"):
        openvino.compile(exported("tiny-sd") / "text_encoder" / "model.onnx", "fp32", openvino.OvOptions(),
                         disk / "ir", CompileContext(spec))


def test_an_int8_hybrid_compile_without_room_for_its_scratch_is_refused_before_it_writes(tmpfs, exported):
    from diffship.models.components import component_specs
    from diffship.models.source import resolve
    from diffship.targets import CompileContext, openvino

    # matmuls = "w8" writes the converted FP32 IR and its INT8 copy beside the artifact: about 5.25 bytes a weight
    unet = exported("tiny-sd") / "unet" / "model.onnx"
    spec = next(s for s in component_specs(resolve("tiny-sd").folder) if s.name == "unet")
    weights = sum(p.stat().st_size for p in unet.parent.iterdir()) // 4
    disk = tmpfs("small", f"{int(3 * weights) // 1024}k")  # room for the artifact (about 1.25 a weight), not the scratch
    with pytest.raises(DiffshipError, match=r"writes its converted FP32 weights and their INT8 copy beside the artifact "
                                            r"first: about [\d.]+ MiB, and .* has [\d.]+ MiB free. Nothing was written"):
        openvino.compile(unet, "int8-hybrid", openvino.OvOptions(matmuls="w8"), disk / "ir", CompileContext(spec))
    assert list(disk.iterdir()) == []
