"""The report's pictures as PNG bytes (matplotlib, headless): image grids, the latency chart."""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def png(fig: Any) -> bytes:
    """`fig` drawn as PNG, then closed (pyplot keeps every open figure alive)."""
    import matplotlib.pyplot as plt  # start-up time: matplotlib

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def image_grid(key: str, pairs: list[dict[str, Any]], baseline_name: str) -> bytes:
    """PNG: one row per sample, columns baseline | target | stretched difference, captioned with the metrics."""
    import matplotlib  # start-up time: matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up time: matplotlib

    rows = len(pairs)
    fig, axes = plt.subplots(rows, 3, figsize=(10, 2.7 * rows + 0.2), squeeze=False)
    for row, pair in zip(axes, pairs, strict=True):
        diff = np.abs(pair["baseline"].astype(np.int16) - pair["target"].astype(np.int16))
        # Stretched so the largest difference is white: shows where they are, even one-level ones.
        gain = 255 // max(int(diff.max()), 1)
        amplified = (diff * gain).astype(np.uint8)
        metrics = "identical" if pair["identical"] else f"PSNR {pair['psnr_db']:.1f} dB, SSIM {pair['ssim']:.4f}"
        for ax, image, title in ((row[0], pair["baseline"], pair.get("baseline_name", baseline_name)),
                                 (row[1], pair["target"], key),
                                 (row[2], amplified, f"|difference| x{gain} (max {int(diff.max())} of 255)")):
            ax.imshow(image, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        prompt = pair["prompt"] if len(pair["prompt"]) <= 60 else pair["prompt"][:57] + "..."
        row[0].set_ylabel(f"{prompt}\nseed {pair['seed']}: {metrics}", fontsize=8, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return png(fig)


def latency_chart(report: dict[str, Any]) -> bytes | None:
    """PNG: p50 latency of baseline and target per component, step and pipeline, one panel per artifact set."""
    measured = {k: r["latency"] for k, r in report["sets"].items() if r.get("latency")}
    if not measured:
        return None
    import matplotlib  # start-up time: matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up time: matplotlib

    # One panel per artifact set, stacked, so a build with many precisions stays readable.
    fig, axes = plt.subplots(len(measured), 1, figsize=(9, 4.2 * len(measured)), squeeze=False)
    for ax, (key, lat) in zip(axes[:, 0], measured.items(), strict=True):
        labels, base, target = [], [], []
        for name, v in lat["components"].items():
            labels.append(f"{name} (batch {v['batch']})")
            base.append(v["baseline"]["p50_s"])
            target.append(v["target"]["p50_s"])
        p = lat["pipeline"]
        if p["baseline"]["step"] and p["target"]["step"]:
            labels.append("denoising step")
            base.append(p["baseline"]["step"]["p50_s"])
            target.append(p["target"]["step"]["p50_s"])
        labels.append(f"pipeline ({p['steps']} steps)")
        base.append(p["baseline"]["total"]["p50_s"])
        target.append(p["target"]["total"]["p50_s"])
        y = np.arange(len(labels))
        baseline = f"baseline ({report['baseline']['precision']} {report['baseline']['device']})"
        ax.barh(y - 0.2, np.array(base) * 1000, 0.4, label=baseline, color="#999")
        ax.barh(y + 0.2, np.array(target) * 1000, 0.4, label=key, color="#2a7")
        for yi, b, t in zip(y, base, target, strict=True):
            ax.text(t * 1000, yi + 0.2, f"  {b / t:.2f}x", va="center", fontsize=8)
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("p50 latency (ms, log scale)")
        ax.set_title(f"{key} vs baseline (label: speedup)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=2, fontsize=8)
    fig.tight_layout()
    return png(fig)
