"""`name:key=value,key=value` on the command line (`--step`, `--scheduler`, `--accelerate`)."""

from __future__ import annotations

import tomllib
from typing import Any

from diffship.errors import DiffshipError


def named_settings(text: str, option: str) -> tuple[str, dict[str, Any]]:
    """`name:key=value,key=value` from the command line (`--step`, `--scheduler`) as the name and its settings, the
    values read as TOML scalars (numbers, booleans; anything else stays a string)."""
    name, _, rest = text.partition(":")
    settings: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise DiffshipError(f"{option} {text!r}: expected key=value after the name, got {item!r}.")
        try:
            settings[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            settings[key.strip()] = value.strip()
    return name.strip(), settings
