"""The speed / quality frontier of the reduced-precision sets: denoiser speedup against real-step cosine, the gate's
threshold, the point `int8-auto` chose, and the layers its search kept in float."""

from __future__ import annotations

from typing import Any

from diffship.validation.charts import png

Table = tuple[str, list[str], list[list[str]]]
REDUCED = ("int8", "int4", "bf16", "fp8")


def _denoiser_speedup(r: dict[str, Any]) -> float | None:
    timed = (r.get("latency") or {}).get("components", {}).get(r.get("denoiser"))
    if not timed or not timed["target"]["p50_s"]:
        return None
    return timed["baseline"]["p50_s"] / timed["target"]["p50_s"]


def points(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per reduced-precision set that ran its denoiser on real steps: speedup (None: not timed), cosine."""
    found = []
    for key, r in report["sets"].items():
        steps = (r.get("parity") or {}).get("denoiser_steps")
        if steps is None or not r.get("precision", "").startswith(REDUCED):
            continue
        found.append({"set": key, "speedup": _denoiser_speedup(r), "cosine": steps["min_cosine"],
                      "threshold": r["parity"]["tolerance"]["min_cosine"], "search": _search(r)})
    return found


def _search(r: dict[str, Any]) -> dict[str, Any] | None:
    return ((r.get("runtime") or {}).get(r.get("denoiser")) or {}).get("search")


def chart(report: dict[str, Any]) -> bytes | None:
    """PNG: each set's denoiser speedup over the baseline against its worst real-step cosine; the search's candidates
    (timed against the FP32 model inside the search) in grey; the threshold line; the chosen int8-auto point."""
    found = [p for p in points(report) if p["speedup"] is not None]
    if not found:
        return None
    import matplotlib  # start-up time: matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up time: matplotlib

    fig, ax = plt.subplots(figsize=(8, 5))
    for p in found:
        for c in (p["search"] or {}).get("candidates", []):
            if c.get("speedup_vs_fp32"):
                ax.scatter(c["speedup_vs_fp32"], c["score"], s=14, color="#bbb", zorder=1)
        chosen = p["search"] is not None
        ax.scatter(p["speedup"], p["cosine"], s=120 if chosen else 50, marker="*" if chosen else "o",
                   color="#d62" if chosen else "#27a", zorder=3)
        ax.annotate(p["set"], (p["speedup"], p["cosine"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    for threshold in sorted({p["threshold"] for p in found}):
        ax.axhline(threshold, color="#b00", linestyle="--", linewidth=1)
        ax.text(ax.get_xlim()[0], threshold, f" gate {threshold}", color="#b00", fontsize=8, va="bottom")
    ax.scatter([], [], s=14, color="#bbb", label="int8-auto search candidates (speedup vs the FP32 model in the search)")
    ax.set_xlabel(f"denoiser speedup over the baseline ({report['baseline']['precision']} {report['baseline']['device']})")
    ax.set_ylabel("worst denoiser cosine on real denoising steps")
    ax.set_title("speed / quality frontier of the reduced-precision sets")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return png(fig)


def _searches(r: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Each searched component of a set, the denoiser first (int8-auto searches its deep-cache graphs too)."""
    runtime = r.get("runtime") or {}
    names = [r.get("denoiser"), *sorted(n for n in runtime if n != r.get("denoiser"))]
    return [(n, search) for n in names if (search := (runtime.get(n) or {}).get("search"))]


def kept_tables(report: dict[str, Any]) -> list[Table]:
    """Per set and searched component: the layers it kept in float and why, or that it fell back and why."""
    tables = []
    for p in points(report):
        r = report["sets"][p["set"]]
        for component, search in _searches(r):
            tables.append(_kept_table(p["set"] if component == r.get("denoiser") else f"{p['set']} {component}",
                                      search))
    return tables


def _kept_table(label: str, search: dict[str, Any]) -> Table:
    rows = [[k["layer"], k["why"]] for k in search["kept_in_float"]]
    if search.get("fell_back"):
        rows = [["(every quantized layer)", f"fell back to weight-only INT8: {search['fell_back']}"]]
    elif not rows:
        rows = [["(none)", "full static INT8 met the gate"]]
    return (f"{label}: layers kept in float ({search['search']}; {len(search['candidates'])} candidates in "
            f"{search['seconds']:.0f} s)", ["layer", "why"], rows)
