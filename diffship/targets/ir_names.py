"""Process-independent names in an OpenVINO IR.

OpenVINO names every node it creates without a name `<Type>_<n>`, `n` from one counter per process, and the passes
after it (FP16 compression, NNCF) build names on those. The same compile then writes different XML in a fresh process
than in one that has used OpenVINO before, so artifacts differ by process: a farm worker's IR would not hash like a
local build's. OpenVINO has no option for stable names, so the counters are renumbered here, in order of first
appearance, after the IR is saved; the weights file is untouched.
"""

from __future__ import annotations

import re
from pathlib import Path

_VALUE = re.compile(r'(\bnames?=")([^"]*)(")')
# An operation class name (`Constant`, `MVN`) at the start of a name, then one or more `_<n>` counters. Names that
# come from the ONNX graph start with `/` or a lower-case prefix (`onnx::`, `val_`) and are left as they are.
_AUTO = re.compile(r"(?:^|(?<=,))([A-Z][A-Za-z0-9]*)((?:_\d+)+)(?!\d)")


def stable_names(xml: Path) -> None:
    """Renumber the `<Type>_<n>` parts of every node and tensor name in `xml`, in order of first appearance."""
    text = xml.read_text(encoding="utf-8")
    numbers: dict[str, str] = {}

    def renumber(counters: str) -> str:
        return "".join(f"_{numbers.setdefault(n, str(len(numbers)))}" for n in counters[1:].split("_"))

    def in_value(match: re.Match[str]) -> str:
        value = _AUTO.sub(lambda m: m.group(1) + renumber(m.group(2)), match.group(2))
        return match.group(1) + value + match.group(3)

    renamed = _VALUE.sub(in_value, text)
    if renamed != text:
        xml.write_text(renamed, encoding="utf-8")
