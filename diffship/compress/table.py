"""The compression stage table and chart, shared by `diffship compress` and the build report."""

from __future__ import annotations

import io
from typing import Any

COLUMNS = ["stage", "parameters", "non-zero", "size", "denoiser call (PyTorch)", "speedup", "prompt accuracy", "FD-digits"]


def stage_table(record: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    """(title, columns, rows): one row per stage, each measured against the original in the same run."""
    rows = []
    for s in record["stages"]:
        q = s.get("quality") or {}
        rows.append([
            s["stage"], f"{s['params']:,} ({s['params_ratio']:.0%})", f"{s['nonzero']:,} ({s['nonzero'] / s['params']:.0%})",
            f"{s['bytes'] / 2**20:.2f} MiB", f"{s['denoiser_seconds'] * 1000:.2f} ms", f"{s['speedup']:.2f}x",
            f"{q['prompt_accuracy']:.3f}" if q else "-", f"{q['fd_digits']:.1f}" if q else "-"])
    settings = record["settings"]
    title = (f"compression stages (PyTorch on {record['device']}; denoiser call = batch 2 at "
             f"{settings['height']}x{settings['width']}, median of {settings['latency_repeats']})")
    return title, COLUMNS, rows


def stage_chart(record: dict[str, Any]) -> bytes:
    """PNG: denoiser call latency and prompt accuracy per stage, so the trade-off reads at a glance."""
    import matplotlib  # start-up time: matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up time: matplotlib

    stages = record["stages"]
    labels = [s["stage"] for s in stages]
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.5 * len(stages) + 1.8), sharey=True)
    axes[0].barh(labels, [s["denoiser_seconds"] * 1000 for s in stages], color="#2a7")
    axes[0].set_xlabel("denoiser call, ms (PyTorch)")
    axes[1].barh(labels, [s["params"] / 1e6 for s in stages], color="#47a", label="parameters")
    axes[1].barh(labels, [s["nonzero"] / 1e6 for s in stages], color="#9be", label="non-zero", height=0.4)
    axes[1].set_xlabel("millions")
    axes[1].legend(fontsize=8)
    accuracy = [(s.get("quality") or {}).get("prompt_accuracy") for s in stages]
    axes[2].barh(labels, [a if a is not None else 0 for a in accuracy], color="#c73")
    axes[2].set_xlim(0, 1)
    axes[2].set_xlabel("prompt accuracy" + ("" if any(a is not None for a in accuracy) else " (not measured)"))
    axes[0].invert_yaxis()
    fig.suptitle("compression: cost and quality per stage")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
