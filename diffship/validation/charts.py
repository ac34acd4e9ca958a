"""The report's charts as PNG bytes (matplotlib, headless)."""

from __future__ import annotations

import io
from typing import Any


def png(fig: Any) -> bytes:
    """`fig` drawn as PNG, then closed (pyplot keeps every open figure alive)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
