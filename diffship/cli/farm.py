"""`diffship farm`: a matrix of builds over one shared cache, here one stage at a time or on a Ray cluster."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from diffship.cli.failures import EXIT_FAILED
from diffship.cli.shared import console, out

EXIT_CANCELLED = 130  # the shell's code for a run stopped by Ctrl-C


def farm(
    matrix_file: Annotated[Path, typer.Argument(metavar="MATRIX.toml", help="Matrix recipe: [cache] and [[builds]].")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where each build lands, as OUT/<name>/, with "
                                                             "farm.json and farm.html.")],
    ray: Annotated[str | None, typer.Option(
        "--ray", help="Run the stages on a Ray cluster: 'auto' (the one this machine joined) or HOST:PORT. Without "
                      "it the matrix runs here, one stage at a time.")] = None,
) -> None:
    """Build a matrix of models x targets x precisions: each stage a task, every build validated and reported."""
    from diffship.farm.matrix import load_matrix  # start-up time: pydantic

    matrix = load_matrix(matrix_file)  # before the imports below (7 s of torch and diffusers): a bad file says so at once
    from diffship.farm.run import run_farm  # start-up time: torch
    from diffship.farm.task import Cancelled  # start-up time: torch

    say = lambda line: console.print(line, markup=False, highlight=False)  # noqa: E731
    try:
        result = run_farm(matrix, out_dir, say, ray)
    except Cancelled as stop:
        console.print(f"[bold yellow]cancelled[/] after {len(stop.outcomes)} finished task(s); unfinished ones were "
                      f"stopped. What finished is summarised in {escape(str(out_dir / 'farm.json'))}.")
        raise typer.Exit(EXIT_CANCELLED) from None
    table = Table(title=f"diffship farm: {matrix_file}")
    for column in ("build", "sets", "verdict", "made / cached", "why"):
        table.add_column(column)
    for b in json.loads(result.summary.read_text(encoding="utf-8"))["builds"]:
        verdict = "[green]passed[/]" if b["verdict"] == "passed" else f"[bold red]{b['verdict']}[/]"
        table.add_row(escape(b["name"]), escape(", ".join(b["sets"])), verdict,
                      f"{b['stages']['done']} / {b['stages']['cached']}", escape(b["message"][:200]))
    out.print(table)
    out.print(f"summary: {escape(str(result.summary))}, {escape(str(result.summary.with_name('farm.html')))}")
    if not result.passed:
        raise typer.Exit(EXIT_FAILED)
