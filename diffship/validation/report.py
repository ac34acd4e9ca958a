"""The build report: report.json (every number), report.md (tables for a pull request), report.html (tables,
the image grid and the latency chart, embedded so the one file can be attached anywhere).

The tables are built once as plain rows and rendered to both Markdown and HTML, so the two never disagree.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from diffship.compress.table import stage_chart, stage_table
from diffship.host.cpu import describe
from diffship.store.artifacts import atomic_write_bytes, atomic_write_json, atomic_write_text
from diffship.validation import image_time
from diffship.validation.charts import image_grid, latency_chart
from diffship.validation.frontier import chart as frontier_chart
from diffship.validation.frontier import kept_tables

Table = tuple[str, list[str], list[list[str]]]


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _peak(n: int | None) -> str:
    return "not measurable here" if n is None else _mib(n)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def _psnr(value: float | None) -> str:
    return "identical" if value is None else f"{value:.1f} dB"


def _verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def summary_table(report: dict[str, Any]) -> Table:
    """One row per artifact set: the verdict and the numbers that decided it."""
    rows = []
    for key, r in report["sets"].items():
        runs_in = (r["runtime"].get(r.get("denoiser")) or next(iter(r["runtime"].values()))).get("summary", "")
        if "not_run" in r:
            rows.append([key, f"{runs_in} (not run here)", "spec ok" if r["passed"] else "FAIL", "not run",
                         *["-"] * 8, "cached" if r.get("cached") else "measured"])
            continue
        outputs = [m for c in r["parity"]["components"].values() for case in c["cases"] for m in case["outputs"].values()
                   if m.get("gated", True)]
        lat = r.get("latency")
        denoiser = lat["components"].get(r.get("denoiser")) if lat else None
        steps = r["parity"].get("denoiser_steps")
        rows.append([key, runs_in, _verdict(r["passed"]), f"{min(m['cosine'] for m in outputs):.7f}",
                     f"{steps['min_cosine']:.6f}" if steps else "-",
                     f"{max(m['rel_l2'] for m in outputs):.2e}", _psnr(r["e2e"]["min_psnr_db"]), f"{r['e2e']['min_ssim']:.4f}",
                     str(r["e2e"]["max_abs_diff"]), f"{denoiser['speedup']:.2f}x" if denoiser else "-",
                     f"{lat['pipeline']['speedup']:.2f}x" if lat else "-", _accuracy(r.get("quality")),
                     "cached" if r.get("cached") else "measured"])
    return ("Summary", ["artifacts", "runs as", "verdict", "worst cosine", "denoiser cos, real steps", "worst rel L2",
                        "min PSNR", "min SSIM", "max pixel diff", "denoiser speedup", "pipeline speedup",
                        "prompt accuracy (PyTorch)", "results"], rows)


def _accuracy(q: dict[str, Any] | None) -> str:
    return f"{q['prompt_accuracy']:.3f} ({q['baseline_prompt_accuracy']:.3f})" if q else "-"


def runtime_rows(runtime: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Per component: what runs it, what graph preparation did (fusions that applied, nodes), and why a component
    kept a higher precision. Empty when no target recorded graph preparation."""
    rows = []
    for component, d in runtime.items():
        graph = d.get("graph")
        if not graph:
            continue
        fused = ", ".join(f"{op} {n}" for op, n in sorted(graph.get("fused", {}).items()))
        nodes = f"{graph['nodes_before']} -> {graph['nodes_after']} nodes" if "nodes_before" in graph else ""
        prep = "; ".join(part for part in (fused and f"fused {fused}", nodes, graph.get("conversion", ""),
                                           graph.get("quantization", "")) if part)
        precision = str(d.get("precision", ""))
        runs_as = str(d.get("summary", "")) + (f"; this component {precision}" if "kept" in precision else "")
        rows.append([component, runs_as, prep or "-", graph.get("reason", "")])
    return rows


def spec_tables(key: str, r: dict[str, Any]) -> list[Table]:
    """The checks a target could make of its artifacts without running them (Core ML package specs), and what each
    package holds: ops, how its weights are stored, size."""
    spec = r.get("spec")
    if not spec:
        return []
    checks = [[c, check["check"], check["detail"], _verdict(check["passed"])]
              for c, result in spec["components"].items() for check in result["checks"]]
    held = [[c, str(result["op_count"]), ", ".join(f"{n} {k}" for k, n in result["weights"].items()), _mib(result["bytes"])]
            for c, result in spec["components"].items()]
    return [(f"{key}: package checks against the ONNX export (read from each package's spec; no prediction)",
             ["component", "check", "detail", ""], checks),
            (f"{key}: what each package holds", ["component", "ops", "weights (count, op.input storage)", "size"], held)]


def not_run_tables(key: str, r: dict[str, Any]) -> list[Table]:
    """Tables of a set that could not run on this machine: why, its spec checks, how it is built, sizes."""
    why = r["not_run"] + (". The recipe sets require_parity, so the set fails here." if r.get("require_parity") else
                          ". Parity, end-to-end images and latency were not measured, and none is claimed; run "
                          "the build on a machine that runs these artifacts to measure them.")
    tables: list[Table] = [(f"{key}: not run here", ["reason"], [[why]]), *spec_tables(key, r)]
    if rows := runtime_rows(r["runtime"]):
        tables.append((f"{key}: how each component is built", ["component", "built as", "conversion", "note"], rows))
    return tables


def set_tables(key: str, r: dict[str, Any]) -> list[Table]:
    """Parity, end-to-end, latency and memory tables of one artifact set."""
    if "not_run" in r:
        return not_run_tables(key, r)
    tol = r["parity"]["tolerance"]
    parity = [[c, f"{case['batch']}", f"{case['height']}x{case['width']}", out, f"{m['cosine']:.7f}", f"{m['rel_l2']:.2e}",
               f"{m['max_abs']:.2e}", _verdict(case["passed"]) if m.get("gated", True) else "reported (not gated)"]
              for c, result in r["parity"]["components"].items() for case in result["cases"]
              for out, m in case["outputs"].items()]
    tables: list[Table] = [(f"{key}: component parity (pass: cosine >= {tol['min_cosine']}, rel L2 <= {tol['max_rel_l2']})",
                            ["component", "batch", "resolution", "output", "cosine", "rel L2", "max abs", ""], parity)]
    if steps := r["parity"].get("denoiser_steps"):
        rows = [[str(s["step"]), f"{s['timestep']:.0f}", f"{s['cosine']:.7f}", f"{s['rel_l2']:.2e}", f"{s['max_abs']:.2e}",
                 _verdict(s["passed"])] for s in steps["steps"]]
        tables.append((f"{key}: {r.get('denoiser')} on the baseline's real inputs at each denoising step ({steps['prompt']!r}, "
                       f"seed {steps['seed']})", ["step", "timestep", "cosine", "rel L2", "max abs", ""], rows))
    if rows := runtime_rows(r["runtime"]):
        tables.append((f"{key}: how each component runs", ["component", "runs as", "graph preparation", "note"], rows))
    tables += spec_tables(key, r)
    th = r["e2e"]["threshold"]
    e2e = [[s.get("task", "text2img"), s["prompt"], str(s["seed"]), _psnr(s["psnr_db"]), f"{s['ssim']:.4f}",
            str(s["max_abs_diff"]), _verdict(s["passed"])] for s in r["e2e"]["samples"]]
    if tasks := r["e2e"].get("tasks"):
        rows = [[task, str(t["images"]), _psnr(t["min_psnr_db"]), f"{t['min_ssim']:.4f}", str(t["max_abs_diff"]),
                 _verdict(t["passed"])] for task, t in tasks.items()]
        tables.append((f"{key}: each task against diffusers' pipeline for it", ["task", "images", "min PSNR",
                                                                                 "min SSIM", "max pixel diff", ""], rows))
    tables.append((f"{key}: end-to-end images (pass: PSNR >= {th['min_psnr_db']} dB and SSIM >= {th['min_ssim']})",
                   ["task", "prompt", "seed", "PSNR", "SSIM", "max pixel diff", ""], e2e))
    if shipped := r.get("clients"):
        tables.append(client_table(key, shipped))
    if q := r.get("quality"):
        rows = [["PyTorch baseline", f"{q['baseline_prompt_accuracy']:.3f}", f"{q['baseline_fd_digits']:.1f}", "", ""],
                [key, f"{q['prompt_accuracy']:.3f}", f"{q['fd_digits']:.1f}", f"{q['drop_points']:+.1f}",
                 _verdict(q["passed"])]]
        tables.append((f"{key}: image quality, {q['images']} digits (seeds {q['seeds']}; pass: prompt accuracy at "
                       f"most {q['max_drop_points']} points below PyTorch and at least {q['min_prompt_accuracy']}; "
                       "FD-digits: Fréchet distance on a digit classifier's features, held-out accuracy "
                       f"{q['classifier_held_out_accuracy']:.3f})", ["", "prompt accuracy", "FD-digits", "points down", ""],
                       rows))
    if lat := r.get("latency"):
        rows = [[c, str(v["batch"]), _ms(v["baseline"]["p50_s"]), _ms(v["target"]["p50_s"]), _ms(v["baseline"]["p90_s"]),
                 _ms(v["target"]["p90_s"]), f"{v['speedup']:.2f}x"] for c, v in lat["components"].items()]
        p = lat["pipeline"]
        if p["baseline"]["step"] and p["target"]["step"]:
            rows.append(["denoising step (pipeline)", "2" if p["guidance"] else "1", _ms(p["baseline"]["step"]["p50_s"]),
                         _ms(p["target"]["step"]["p50_s"]), _ms(p["baseline"]["step"]["p90_s"]),
                         _ms(p["target"]["step"]["p90_s"]), f"{p['step_speedup']:.2f}x"])
        rows.append([f"whole pipeline ({p['steps']} steps, {p['height']}x{p['width']})", "1",
                     _ms(p["baseline"]["total"]["p50_s"]), _ms(p["target"]["total"]["p50_s"]),
                     _ms(p["baseline"]["total"]["p90_s"]), _ms(p["target"]["total"]["p90_s"]), f"{p['speedup']:.2f}x"])
        runs = next(iter(lat["components"].values()))["target"]["runs"] if lat["components"] else 0
        tables.append((f"{key}: latency, p50 / p90 over {runs} interleaved runs (speedup = baseline p50 / target p50)",
                       ["", "batch", "baseline p50", "target p50", "baseline p90", "target p90", "speedup"], rows))
    if effects := r.get("option_effects"):
        rows = [[e["option"], e["call"], _peak(e["peak_on_bytes"]), _peak(e["peak_off_bytes"]), _ms(e["on"]["p50_s"]),
                 _ms(e["off"]["p50_s"]), f"{e['off']['p50_s'] / e['on']['p50_s']:.2f}x", f"{e['cosine_on_vs_off']:.6f}"]
                for e in effects]
        tables.append((f"{key}: memory options, each measured on and off (peak: memory the call adds above what was "
                       "held before it)", ["option", "measured on", "peak on", "peak off", "p50 on", "p50 off",
                                           "speed on vs off", "cosine on vs off"], rows))
    if r.get("latency_skipped"):
        tables.append((f"{key}: latency not measured", ["reason"], [[r["latency_skipped"]]]))
    mem = r["memory"]
    rows = [[c, _mib(b), f"{mem['load_seconds'][c]:.2f} s" if c in mem["load_seconds"] else "-"]
            for c, b in mem["artifact_bytes"].items()]
    rows.append(["process peak resident memory", _mib(mem["peak_rss_bytes"]), ""])
    rows.append(["resident memory added by loading the artifacts", _mib(mem["load_rss_delta_bytes"]), ""])
    if mem.get("peak_gpu_bytes") is not None:
        rows.append(["peak GPU memory (torch)", _mib(mem["peak_gpu_bytes"]), ""])
    tables.append((f"{key}: memory", ["", "size", "session load"], rows))
    return tables


def client_table(key: str, shipped: dict[str, Any]) -> Table:
    """Where the set ships: each client's version, pipeline, precision and PSNR against diffusers, or why not."""
    th = shipped["threshold"]
    rows = []
    for row in shipped["rows"]:
        if row["status"] in ("pass", "FAIL"):
            rows.append([row["title"], row.get("version", ""), row.get("pipeline", ""), row.get("computes_in", "-"),
                         _psnr(row["psnr_db"]), f"{row['ssim']:.4f}", str(row["max_abs_diff"]),
                         f"{row['seconds']:.1f} s",
                         _verdict(row["status"] == "pass") + (f" ({row['differs']})" if row.get("differs") else "")])
        else:
            note = row.get("reason") or row.get("error", "")
            rows.append([row["title"], row.get("version", ""), "", "", "", "", "", "",
                         f"{row['status']}: {note[:300]}"])
    return (f"{key}: where it ships, each client loading the folder as built and drawing the first sample from the "
            f"same seed, against diffusers (pass: PSNR >= {th['min_psnr_db']} dB and SSIM >= {th['min_ssim']})",
            ["client", "version", "pipeline", "computes in", "PSNR", "SSIM", "max pixel diff", "time", ""], rows)


def all_tables(report: dict[str, Any]) -> list[Table]:
    """Every table of the report, in reading order."""
    export = [[c, _mib(e["bytes"]), "cached" if e["cached"] else f"{e['seconds']:.1f} s"] for c, e in report["export"].items()]
    tables = [summary_table(report), ("ONNX export (opset " + str(report["recipe"]["export"]["opset"]) + ")",
                                      ["component", "size", "export"], export)]
    if headline := image_time.table(report):  # the whole image first: what a user waits for
        tables.insert(1, headline)
    if "compress" in report:
        tables.insert(1, stage_table(report["compress"]))
    for key, r in report["sets"].items():
        tables += set_tables(key, r)
    return tables + kept_tables(report)


def header_lines(report: dict[str, Any]) -> list[str]:
    """The facts a reader needs before the tables: model, baseline, machine, what was generated."""
    m, v = report["model"], report["validation"]
    return [
        f"Model: {m['spec']} ({m['family']}), weights sha256 {m['sha256'][:16]}",
        f"Baseline: {report['baseline']['note']}",
        f"Machine: {_cpu(report['machine'])}, {report['machine']['cpus']} CPUs, "
        f"{report['machine']['memory_bytes'] / 2**30:.0f} GiB"
        + (f", {report['machine']['gpu']}" if "gpu" in report["machine"] else ""),
        f"Images: {v['height']}x{v['width']}, {v['steps']} steps, guidance {v['guidance_scale']}"
        + (f", tasks {', '.join(tasks)}" if (tasks := _tasks(report)) else "")
        + (f", scheduler {', '.join(schedulers)}" if (schedulers := _schedulers(report)) else ""),
        *([f"Weights: {m['weights']}"] if m.get("weights") else []),
        "Versions: " + ", ".join(f"{k} {val}" for k, val in report["versions"].items()),
        f"Cache: {report['cache']['hits']} stage(s) reused, {report['cache']['misses']} run; "
        f"build took {report['build_seconds']:.1f} s",
        *(f"Not run here: {key} was converted and spec-checked only ({r['not_run']}); no parity is claimed for it"
          for key, r in report["sets"].items() if "not_run" in r),
    ]


def _tasks(report: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(t for r in report["sets"].values() for t in r.get("e2e", {}).get("tasks", {})))


def _schedulers(report: dict[str, Any]) -> list[str]:
    """The sampler each set ran with (the same for all unless a set could not run)."""
    return list(dict.fromkeys(
        r["scheduler"]["class"] + "".join(f" {k}={v}" for k, v in r["scheduler"].items() if k != "class")
        for r in report["sets"].values() if r.get("scheduler")))


def _cpu(machine: dict[str, Any]) -> str:
    return describe(machine["cpu"]) if "cpu" in machine else machine["processor"]


def markdown_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines (pipes inside cells escaped)."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows)]


def to_markdown(report: dict[str, Any], images: dict[str, str]) -> str:
    """The report as Markdown: verdict, facts, the summary, links to the pictures, then the detailed tables."""
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines = [f"# diffship build report: {verdict}", ""] + [f"- {line}" for line in header_lines(report)] + [""]
    for i, (title, columns, rows) in enumerate(all_tables(report)):
        if i == 1:
            lines += [f"![{name}]({path})" for name, path in images.items()] + [""]
        lines += [f"## {title}", "", *markdown_table(columns, rows), ""]
    return "\n".join(lines)


def to_html(report: dict[str, Any], pictures: dict[str, bytes]) -> str:
    """The report as one self-contained HTML page (pictures embedded as data URIs)."""
    verdict = "PASSED" if report["passed"] else "FAILED"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>diffship report: {verdict}</title>",
             "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
             "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}.FAIL{color:#b00;font-weight:bold}"
             ".pass{color:#070}img{max-width:100%;border:1px solid #ddd}h1 .v{color:"
             + ("#070" if report["passed"] else "#b00") + "}</style></head><body>",
             f"<h1>diffship build report: <span class='v'>{verdict}</span></h1><ul>"]
    parts += [f"<li>{html.escape(line)}</li>" for line in header_lines(report)] + ["</ul>"]
    tables = all_tables(report)
    for i, (title, columns, rows) in enumerate(tables):
        if i == 1:  # the pictures right after the summary
            for name, png in pictures.items():
                data = base64.b64encode(png).decode()
                parts.append(f"<h2>{html.escape(name)}</h2><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
        parts.append(f"<h2>{html.escape(title)}</h2><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns)
                     + "</tr>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td class='{html.escape(c)}'>{html.escape(c)}</td>" if c in ("pass", "FAIL")
                                          else f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: dict[str, Any], pairs: dict[str, list[dict[str, Any]]], folder: Path) -> dict[str, Path]:
    """Write report.json, the PNGs, report.md and report.html into `folder`; return their paths by kind."""
    baseline = f"baseline ({report['baseline']['precision']} {report['baseline']['device']})"
    pictures: dict[str, bytes] = {}
    for key, set_pairs in pairs.items():
        tasks = list(dict.fromkeys(p.get("task", "text2img") for p in set_pairs))
        for task in tasks:  # one grid per task; the main task's keeps the set's name alone
            name = f"images: {key}" + (f" {task}" if task != tasks[0] else "")
            pictures[name] = image_grid(f"{key} {task}", [p for p in set_pairs if p.get("task", "text2img") == task],
                                        baseline)
    if chart := image_time.chart(report):
        pictures["whole-image speed and quality"] = chart
    if chart := latency_chart(report):
        pictures["latency"] = chart
    if chart := frontier_chart(report):
        pictures["speed-quality frontier"] = chart
    if "compress" in report:
        pictures["compression"] = stage_chart(report["compress"])
    files = {}
    for name, data in pictures.items():
        path = folder / "images" / (name.replace("images: ", "grid-").replace(" ", "_") + ".png")
        atomic_write_bytes(path, data)
        files[name] = path
    atomic_write_json(folder / "report.json", report)
    atomic_write_text(folder / "report.md", to_markdown(report, {n: p.relative_to(folder).as_posix() for n, p in files.items()}))
    atomic_write_text(folder / "report.html", to_html(report, pictures))
    return {"json": folder / "report.json", "markdown": folder / "report.md", "html": folder / "report.html",
            **{f"image:{n}": p for n, p in files.items()}}
