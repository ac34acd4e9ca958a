"""The structure checks `make lint` runs: they pass on diffship and catch what they are for."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "check_import_cycles.py"


def _checker():
    spec = importlib.util.spec_from_file_location("check_import_cycles", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diffship_has_no_import_cycle():
    assert _checker().cycles("diffship") == []


def test_a_cycle_closed_by_an_import_inside_a_function_is_found(tmp_path: Path, monkeypatch):
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from cyclic import b\n")
    (package / "b.py").write_text("def late():\n    from cyclic import a\n    return a\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cyclic import d\n")
    (package / "d.py").write_text("from cyclic import c\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert _checker().cycles("cyclic") == [["cyclic.a", "cyclic.b"]]  # c <-> d only through an annotation
    finally:
        for name in [m for m in sys.modules if m == "cyclic" or m.startswith("cyclic.")]:
            del sys.modules[name]


def test_every_import_inside_a_function_says_why():
    assert _checker().unexplained_late_imports(Path(__file__).parents[1] / "diffship") == []


def test_an_import_inside_a_function_without_a_reason_is_found(tmp_path: Path):
    (tmp_path / "m.py").write_text(
        "import json\n\n\ndef f():\n    import torch  # start-up time: torch\n    import json as j\n"
        "    from openvino import Core  # optional: openvino\n    from x import (\n        y,  # a comment, no reason\n"
        "    )\n    return j, y, Core, torch\n")
    assert _checker().unexplained_late_imports(tmp_path) == [f"{tmp_path / 'm.py'}:6", f"{tmp_path / 'm.py'}:8"]
