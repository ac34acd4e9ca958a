"""What the command modules share: the two consoles (progress on stderr, results on stdout) and option parsing."""

from __future__ import annotations

import sys
import warnings
from typing import Any

from rich.console import Console

from diffship.errors import DiffshipDeprecation

console = Console(stderr=True, soft_wrap=True)
# Tables are wide: in logs and pipes (no terminal) use 180 columns instead of rich's 80.
out = Console(width=None if sys.stdout.isatty() else 180)


def show_deprecations() -> None:
    """Print diffship's deprecation warnings (an option's old name) as one plain line on stderr, not in Python's
    file:line form; other warnings are shown as before."""
    previous = warnings.showwarning

    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        if issubclass(category, DiffshipDeprecation):
            console.print(f"deprecated: {message}", markup=False, highlight=False)
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def human_bytes(n: float) -> str:
    """A byte count as B, KB, MB or GB (powers of 1024), for tables and progress lines."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def names(values: list[str] | None) -> list[str] | None:
    """Repeated and comma-separated option values as one list (None when empty)."""
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()] or None


def lora_specs(values: list[str] | None) -> list[Any]:
    """`--lora PATH[:SCALE]` values as LoRA specs."""
    if not values:  # the module below imports torch (1.8 s): not for a command line without --lora
        return []
    from diffship.models.lora import LoraSpec  # start-up time: torch

    return [LoraSpec.parse(v) for v in values]
