"""The build's `recommended` entry: across every set and acceleration measured, the fastest whole image within the
recipe's quality budget (an unaccelerated set on its precision's gates, an accelerated one on the budget)."""

from __future__ import annotations

from typing import Any


def candidates(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (set, accelerations) row measured, with its set key and whether it may be recommended: the set passed
    its own gates and the row is within the budget."""
    rows = []
    for set_key, result in results.items():
        for row in result.get("accelerations", {}).get("rows", []):
            rows.append({"set": set_key, **row, "eligible": bool(result["passed"] and row["within_budget"])})
    return rows


def recommended(results: dict[str, Any]) -> dict[str, Any] | None:
    """The fastest eligible row by the whole image's fastest call against PyTorch FP32's in the same run (None where no
    set measured accelerations, or none is within the budget). The fastest calls rank, not the medians: on a shared
    host other guests' slow spells stretch the medians of a few runs (benchmarks/host_noise.py); both are recorded."""
    eligible = [r for r in candidates(results) if r["eligible"] and r.get("speedup_fastest")]
    if not eligible:
        return None
    best = max(eligible, key=lambda r: r["speedup_fastest"])
    return {"set": best["set"], "accelerations": best["settings"], "label": best["accelerations"],
            "approximate": best["approximate"], "pipeline_speedup": round(best["speedup"], 3),
            "pipeline_speedup_fastest": round(best["speedup_fastest"], 3),
            "image_time_s": {"p50": best["image_time"]["p50_s"], "fastest": best["image_time"]["min_s"]},
            "min_psnr_db": best.get("min_psnr_db"), "min_ssim": best.get("min_ssim"),
            **({"prompt_accuracy": best["quality"]["prompt_accuracy"]} if "quality" in best else {})}
