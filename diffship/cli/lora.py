"""`diffship lora`: LoRAs swapped into an existing build without rebuilding it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from diffship.cli.failures import EXIT_FAILED
from diffship.cli.shared import console, lora_specs, names, out

lora_app = typer.Typer(no_args_is_help=True, help="Swap LoRAs into an existing build without rebuilding it.")


@lora_app.command("apply")
def lora_apply(
    build_dir: Annotated[Path, typer.Argument(metavar="BUILD", help="A folder written by `diffship build`.")],
    lora: Annotated[list[str], typer.Option(help="A LoRA to merge, PATH[:SCALE]; repeat for several, merged in order.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="The new build folder (must be new or empty).")],
    targets: Annotated[list[str] | None, typer.Option(
        "--targets", "-t", help="Only these sets, name[:precision+precision] (default: every set of the build).")] = None,
) -> None:
    """Write a new build with LoRAs merged by patching the build's FP32 / FP16 / BF16 weights in place (ONNX Runtime,
    OpenVINO, refittable TensorRT engines), each patched component checked against the merged PyTorch one."""
    from diffship.recipe import targets_from_cli  # start-up time: pydantic
    from diffship.stages.lora_apply import apply_loras  # start-up time: torch

    wanted = names(targets)
    result = apply_loras(build_dir, lora_specs(lora), out_dir, targets_from_cli(wanted) if wanted else None,
                         say=lambda line: console.print(line, markup=False, highlight=False))
    report = result.report
    table = Table(title=f"LoRA swap into {escape(str(build_dir))} in {report['seconds']:.1f} s")
    for col in ("set", "component", "weights patched", "worst cosine", "worst rel L2", ""):
        table.add_column(col, justify="left" if col in ("set", "component") else "right")
    for key, r in report["sets"].items():
        for component, p in r["parity"].items():
            metrics = [m for case in p["cases"] for m in case["outputs"].values()]
            table.add_row(key, component, str(r["patched"][component]), f"{min(m['cosine'] for m in metrics):.7f}",
                          f"{max(m['rel_l2'] for m in metrics):.2e}", "[green]ok[/]" if p["passed"] else "[bold red]FAIL[/]")
    out.print(table)
    verdict = "[green]swap passed[/]" if result.passed else "[bold red]swap FAILED validation[/]"
    out.print(f"{verdict}; artifacts and manifest.json in {result.out}; report: {result.out / 'report' / 'report.md'}")
    if not result.passed:
        raise typer.Exit(EXIT_FAILED)
