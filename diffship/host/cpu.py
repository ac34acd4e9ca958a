"""What CPU the numbers were measured on: its model name and the instruction sets that decide BF16 and INT8 speed.

Speed ratios and even INT8 numerics differ between CPU kinds (AVX-512 VNNI on AMD Zen 4/5, AMX tiles on Intel
Sapphire Rapids and later), so every report and benchmark records these facts read from the system, never assumed.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

# /proc/cpuinfo flag -> the name people use for it, in the order a reader wants them.
ISA_FLAGS = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX-512 BF16",
    "avx512_fp16": "AVX-512 FP16",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
    "amx_fp16": "AMX-FP16",
}


def _cpuinfo(text: str) -> tuple[str | None, set[str]]:
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def kind(isa: dict[str, bool]) -> str:
    """A short class of CPU for grouping figures: what its fastest BF16 / INT8 matrix units are."""
    if isa.get("amx_int8") or isa.get("amx_bf16"):
        return "x86 with AMX"
    if isa.get("avx512_bf16") or isa.get("avx512_vnni"):
        return "x86 with AVX-512 VNNI" + (" + BF16" if isa.get("avx512_bf16") else "")
    if isa.get("avx_vnni") or isa.get("avx2"):
        return "x86 with AVX2"
    return platform.machine() or "unknown"


def cpu_facts(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The CPU's model name, the matrix instruction sets it has (True / False each) and its kind."""
    try:
        model, flags = _cpuinfo(cpuinfo.read_text(encoding="utf-8", errors="replace"))
    except OSError:  # not Linux: the model name is all that is portable
        model, flags = None, set()
    isa = {name: name in flags for name in ISA_FLAGS}
    return {"model": model or platform.processor() or platform.machine(), "isa": isa, "kind": kind(isa),
            "has": [ISA_FLAGS[n] for n, present in isa.items() if present]}


def describe(facts: dict[str, Any] | None = None) -> str:
    """One line: 'Intel(R) Xeon(R) Processor (x86 with AMX: AVX-512 VNNI, AVX-512 BF16, AMX-BF16, AMX-INT8)'."""
    facts = facts or cpu_facts()
    relevant = [h for h in facts["has"] if h not in ("AVX2", "AVX-512")] or facts["has"]
    return f"{facts['model']} ({facts['kind']}" + (f": {', '.join(relevant)})" if relevant else ")")
