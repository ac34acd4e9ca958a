"""The report's headline: the whole image (text encoders, every step, decode) per set and accelerations, against
PyTorch FP32 in one interleaved run, with the quality each keeps, the budget's verdict and the recommended row; and
its speed / quality frontier as a picture."""

from __future__ import annotations

from typing import Any

from diffship.validation.charts import png
from diffship.validation.recommend import candidates

Table = tuple[str, list[str], list[list[str]]]
IDENTICAL_DB = 60.0  # where the chart draws a row whose images were identical (no finite PSNR)


def table(report: dict[str, Any]) -> Table | None:
    """One row per set x accelerations measured (None where no set measured accelerations)."""
    rows = candidates(report["sets"])
    if not rows:
        return None
    best = report.get("recommended") or {}
    budget = next(r["accelerations"]["budget"] for r in report["sets"].values() if "accelerations" in r)
    lines = []
    for key, result in report["sets"].items():  # each set's run timed PyTorch itself too: FP32, and BF16 beside it
        table_of = result.get("accelerations") or {}
        fp32, bf16 = table_of.get("baseline_image_time"), table_of.get("bf16_image_time")
        if fp32:
            lines.append([key, "PyTorch FP32 eager (the baseline)", "-", "-", "-", "-",
                          f"{fp32['p50_s']:.2f} / {fp32['min_s']:.2f} s", "1.00x / 1.00x", "-", ""])
        if fp32 and bf16:
            lines.append([key, "PyTorch BF16 (no export)", "-", "-", "-", "-", f"{bf16['p50_s']:.2f} / {bf16['min_s']:.2f} s",
                          f"{fp32['p50_s'] / bf16['p50_s']:.2f}x / {fp32['min_s'] / bf16['min_s']:.2f}x", "-", ""])
    for row in rows:
        t = row["image_time"]
        quality = row.get("quality")
        timed = (f"{t['p50_s']:.2f} / {t['min_s']:.2f} s", f"{row['speedup']:.2f}x / {row['speedup_fastest']:.2f}x") \
            if t else ("not timed", "-")
        chosen = row["set"] == best.get("set") and row["accelerations"] == best.get("label")
        lines.append([row["set"], row["accelerations"], "approximate" if row["approximate"] else "exact (gates)",
                      _db(row.get("min_psnr_db")), _ssim(row.get("min_ssim")),
                      f"{quality['prompt_accuracy']:.3f}" if quality else "-", *timed,
                      "pass" if row["eligible"] else "FAIL", "recommended" if chosen else ""])
    return (f"Whole image against PyTorch FP32 (p50 / fastest call; budget: PSNR >= {budget['min_psnr']} dB, "
            f"SSIM >= {budget['min_ssim']}, prompt accuracy within {budget['max_accuracy_drop']} points)",
            ["set", "accelerations", "judged as", "min PSNR", "min SSIM", "prompt accuracy", "image time",
             "speedup (ranks: fastest)", "within budget", ""], lines)


def chart(report: dict[str, Any]) -> bytes | None:
    """PNG: whole-image speedup (fastest calls, which rank the rows) against the worst image's PSNR for every row,
    the budget's PSNR as a line, exact rows filled, approximate ones hollow, the recommended one ringed."""
    rows = [r for r in candidates(report["sets"]) if r["speedup_fastest"]]
    if not rows:
        return None
    import matplotlib  # start-up time: matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up time: matplotlib

    best = report.get("recommended") or {}
    budget = next(r["accelerations"]["budget"] for r in report["sets"].values() if "accelerations" in r)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colours = {key: f"C{i}" for i, key in enumerate(dict.fromkeys(r["set"] for r in rows))}
    for row in rows:
        psnr = row.get("min_psnr_db") or IDENTICAL_DB
        ax.scatter(row["speedup_fastest"], psnr, s=60, color=colours[row["set"]],
                   facecolors="none" if row["approximate"] else colours[row["set"]], linewidths=1.5)
        ax.annotate(row["accelerations"].replace("+", "\n+"), (row["speedup_fastest"], psnr), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
        if row["set"] == best.get("set") and row["accelerations"] == best.get("label"):
            ax.scatter(row["speedup_fastest"], psnr, s=260, facecolors="none", edgecolors="k", linewidths=1.2)
    ax.axhline(budget["min_psnr"], color="#b00", linestyle="--", linewidth=1, label=f"budget {budget['min_psnr']} dB")
    for key, colour in colours.items():
        ax.scatter([], [], color=colour, label=key)
    ax.set_xlabel("whole-image speedup over PyTorch FP32 (fastest calls, same run)")
    ax.set_ylabel(f"worst image PSNR vs FP32 baseline (dB; identical drawn at {IDENTICAL_DB:.0f})")
    ax.set_title("Speed / quality of every set x accelerations (filled: exact, hollow: approximate, ringed: recommended)",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png(fig)


def _db(value: float | None) -> str:
    return "identical" if value is None else f"{value:.1f} dB"


def _ssim(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
