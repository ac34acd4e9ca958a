from pathlib import Path

import pytest

from diffship.errors import DiffshipError
from diffship.store.artifacts import MANIFEST_NAME, atomic_write_text, prepare_output_dir, staged_dir


def test_atomic_write_replaces_whole_file_and_leaves_no_temporaries(tmp_path: Path):
    target = tmp_path / "report.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_staged_dir_publishes_only_on_success(tmp_path: Path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_dir(final) as tmp:
        (tmp / "model.onnx").write_text("half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with staged_dir(final) as tmp:
        (tmp / "model.onnx").write_text("whole")
    assert (final / "model.onnx").read_text() == "whole"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_output_folder_with_other_content_is_refused_even_with_overwrite(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DiffshipError, match="not empty"):
        prepare_output_dir(tmp_path, overwrite=False)
    with pytest.raises(DiffshipError, match="did not write"):
        prepare_output_dir(tmp_path, overwrite=True)


def test_earlier_diffship_output_may_be_overwritten_when_asked(tmp_path: Path):
    (tmp_path / MANIFEST_NAME).write_text("{}")
    prepare_output_dir(tmp_path, overwrite=True)
    prepare_output_dir(tmp_path / "new" / "nested", overwrite=False)


def test_unwritable_output_location_is_refused(tmp_path: Path):
    with pytest.raises(DiffshipError, match="not writable"):
        prepare_output_dir(Path("/proc/diffship-out"), overwrite=False)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(DiffshipError, match="is a file|not a folder"):
        prepare_output_dir(a_file, overwrite=False)
    with pytest.raises(DiffshipError, match="not a folder"):
        prepare_output_dir(a_file / "sub", overwrite=False)
