"""The matrix summary: `farm.json` (a row per build: verdict, numbers, where each stage ran) and `farm.html` (the same
as tables, with a timeline of the tasks per node)."""

from __future__ import annotations

import base64
import html
import io
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from diffship.farm.matrix import Matrix
from diffship.farm.plan import Task
from diffship.farm.task import Outcome
from diffship.host.cpu import describe
from diffship.store.artifacts import atomic_write_json, atomic_write_text

FARM_JSON, FARM_HTML = "farm.json", "farm.html"
STAGE_COLORS = {"compress": "#8e6c8a", "export": "#4c78a8", "calibrate": "#f58518", "compile": "#54a24b",
                "validate": "#e45756", "assemble": "#9d9d9d"}


def summary_data(matrix: Matrix, tasks: list[Task], outcomes: list[Outcome], seconds: float) -> dict[str, Any]:
    """Plain data for farm.json: every build's verdict and numbers, and every task's status, node and time."""
    by_key = {o.key: o for o in outcomes}
    builds = []
    for row in matrix.rows:
        mine = [by_key[t.key] for t in tasks if t.row == row.name and t.key in by_key]
        assembled = next((o for o in mine if o.key == f"{row.name}: assemble"), None)
        failure = next((o for o in mine if o.status == "error"), None)
        verdict = assembled.status if assembled and assembled.status in ("passed", "failed") else (
            "error" if failure else "cancelled")
        builds.append({
            "name": row.name, "model": row.recipe.model, "folder": row.name,
            "sets": [f"{t.name}-{p}" for t in row.recipe.targets for p in t.precisions],
            "verdict": verdict, "message": failure.message if failure and verdict == "error" else "",
            "summary": assembled.summary if assembled else None,
            "stages": {s: sum(o.status == s for o in mine) for s in ("done", "cached", "error", "skipped")},
            "task_seconds": round(sum(o.seconds for o in mine), 1),
        })
    return {
        "matrix": str(matrix.path), "cache": str(matrix.cache), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "driver_cpu": describe(), "wall_seconds": round(seconds, 1),
        "passed": bool(builds) and all(b["verdict"] == "passed" for b in builds),
        "builds": builds,
        "tasks": [{"key": t.key, "row": t.row, "stage": t.unit.stage if t.unit else "assemble",
                   "after": list(t.after), "memory_bytes": t.memory, "resources": t.resources,
                   **({"status": o.status, "seconds": round(o.seconds, 2), "node": o.node, "started": o.started,
                       "message": o.message} if (o := by_key.get(t.key)) else {"status": "cancelled"})}
                  for t in tasks],
    }


def write_summary(out: Path, matrix: Matrix, tasks: list[Task], outcomes: list[Outcome], seconds: float) -> Path:
    """farm.json and farm.html in `out`; the path of farm.json."""
    data = summary_data(matrix, tasks, outcomes, seconds)
    atomic_write_json(out / FARM_JSON, data)
    atomic_write_text(out / FARM_HTML, render_html(data))
    return out / FARM_JSON


def render_html(data: dict[str, Any]) -> str:
    """The summary as one self-contained page."""
    e = html.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>diffship farm</title><style>body{font-family:sans-serif}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
             ".passed{color:#1a7f37}.failed,.error{color:#c62828;font-weight:bold}</style>",
             f"<h1>Build matrix: {'passed' if data['passed'] else 'NOT passed'}</h1>",
             f"<p>{e(data['matrix'])}, cache {e(data['cache'])}, {e(data['date'])}, {data['wall_seconds']:.0f} s; "
             f"driver: {e(data['driver_cpu'])}</p>",
             "<table><tr><th>build</th><th>model</th><th>sets</th><th>verdict</th><th>stages made / cached</th>"
             "<th>report</th><th>why</th></tr>"]
    for b in data["builds"]:
        report = b["summary"]["report"] if b["summary"] else None
        parts.append(f"<tr><td>{e(b['name'])}</td><td>{e(b['model'])}</td><td>{e(', '.join(b['sets']))}</td>"
                     f"<td class='{e(b['verdict'])}'>{e(b['verdict'])}</td>"
                     f"<td>{b['stages']['done']} / {b['stages']['cached']}</td>"
                     f"<td>{f'<a href={chr(39)}{e(report)}{chr(39)}>report</a>' if report else ''}</td>"
                     f"<td>{e(b['message'])}</td></tr>")
    parts.append("</table>")
    for b in data["builds"]:
        if b["summary"]:
            s = b["summary"]
            parts.append(f"<h2>{e(b['name'])}: {e(s['title'])}</h2><table><tr>"
                         + "".join(f"<th>{e(c)}</th>" for c in s["columns"]) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in s["rows"])
                         + "</table>")
    if chart := _timeline(data["tasks"]):
        parts.append(f"<h2>Tasks per node</h2><img alt='timeline' src='data:image/png;base64,{chart}'>")
    parts.append("<h2>Tasks</h2><table><tr><th>task</th><th>status</th><th>node</th><th>s</th><th>memory</th>"
                 "<th>resources</th><th>message</th></tr>")
    for t in data["tasks"]:
        parts.append(f"<tr><td>{e(t['key'])}</td><td class='{e(t['status'])}'>{e(t['status'])}</td>"
                     f"<td>{e(str(t.get('node', ''))[:12])}</td><td>{t.get('seconds', '')}</td>"
                     f"<td>{t['memory_bytes'] / 2**30:.1f} GiB</td><td>{e(str(t['resources'] or ''))}</td>"
                     f"<td>{e(t.get('message', ''))}</td></tr>")
    return "\n".join([*parts, "</table>"])


def _timeline(tasks: list[dict[str, Any]]) -> str | None:
    """A PNG (base64) of when each task ran, one lane per node, coloured by stage."""
    ran = [t for t in tasks if t.get("started")]
    if not ran:
        return None
    import matplotlib  # start-up time: matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up time: matplotlib

    nodes = sorted({t["node"] for t in ran})
    origin = min(t["started"] for t in ran)
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(nodes) + 1.5))
    for t in ran:
        ax.barh(nodes.index(t["node"]), max(t["seconds"], 0.2), left=t["started"] - origin,
                color=STAGE_COLORS[t["stage"]], edgecolor="white")
    ax.set_yticks(range(len(nodes)), [n[:12] for n in nodes])
    ax.set_xlabel("seconds since the first task")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in STAGE_COLORS.values()],
              labels=list(STAGE_COLORS), loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=6, frameon=False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()
