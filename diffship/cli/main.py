"""The command line: parses, calls one stage function, prints. Exit codes (see `diffship.cli.failures`): 0 ok, 1 validation
failed, 2 bad input or a full disk, 3 internal error (traceback in a log file)."""

from __future__ import annotations

import json
import os
import shutil
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from diffship import __version__
from diffship.cli.cache import cache_app
from diffship.cli.clients import clients_app
from diffship.cli.failures import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERNAL, crash_log, user_error
from diffship.cli.farm import farm
from diffship.cli.generate import generate
from diffship.cli.lora import lora_app
from diffship.cli.shared import console, human_bytes, lora_specs, names, out, show_deprecations
from diffship.compress.table import stage_chart, stage_table
from diffship.errors import DiffshipError
from diffship.models.families import detect_family, prediction_type
from diffship.named_settings import named_settings
from diffship.store import cache
from diffship.store.artifacts import atomic_write_json, atomic_write_text, prepare_output_dir, staged_dir

# typer re-raises click's usage errors (or, in typer 0.2x, its vendored copy's) and its own Exit / Abort: they pass through.
_CLICK_ERRORS = (typer.Exit, typer.Abort, *(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"))


class GuardedGroup(TyperGroup):
    """Every command runs inside one guard: a user's error is one red line and exit 2, anything else is a bug, reported
    as one line with exit 3 and its traceback kept in a log file."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _CLICK_ERRORS:
            raise
        except Exception as exc:
            known = user_error(exc)
            if known is not None:
                console.print(f"[bold red]error:[/] {escape(str(known))}")
                raise typer.Exit(EXIT_BAD_INPUT) from None
            log = crash_log(exc)
            console.print(f"[bold red]internal error:[/] {escape(type(exc).__name__)}: {escape(str(exc))[:300]}. This is a "
                          f"bug in diffship, not in your input; the traceback is in {escape(str(log))}: please attach it "
                          "to a bug report.")
            raise typer.Exit(EXIT_INTERNAL) from None


show_deprecations()
app = typer.Typer(cls=GuardedGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Stable Diffusion pipelines in, validated deployment artifacts out.")


def _step_printer(verb: str):
    def on_step(name: str, event: str, detail: dict[str, Any]) -> None:
        if event == "start":
            console.print(f"[cyan][{detail['index']}/{detail['total']}][/] {verb} [bold]{name}[/] ...")
        elif "bytes" in detail and detail.get("cached"):
            console.print(f"      [green]cached[/] {name}: {human_bytes(detail['bytes'])} (no work)")
        elif "bytes" in detail:
            console.print(f"      [green]done[/] {name}: {human_bytes(detail['bytes'])} in {detail['seconds']:.1f} s")
        else:
            status = "[green]pass[/]" if detail["passed"] else "[bold red]FAIL[/]"
            console.print(f"      {status} {name}")
    return on_step


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False) -> None:
    """diffship: export, compile and validate Stable Diffusion components."""
    if version:
        out.print(__version__)
        raise typer.Exit()


# Options every command that resolves a model takes, declared once.
ModelConfigOption = Annotated[str | None, typer.Option(
    help="For a single-file checkpoint: a shipped configuration (sd1, sd2-512, sdxl, ...) or a diffusers config folder, "
         "instead of the one detected from its tensors.")]
VariantOption = Annotated[str | None, typer.Option(
    help="Load a weight variant of a diffusers folder, e.g. fp16 (*.fp16.safetensors), upcast to FP32.")]
ControlnetOption = Annotated[list[str] | None, typer.Option(
    "--controlnet", help="A ControlNet (diffusers ControlNetModel folder or hub id) exported beside the denoiser, with "
                         "a variant of the denoiser that takes its residuals; repeat for several.")]
LoraOption = Annotated[list[str] | None, typer.Option(
    help="A LoRA to merge before export, PATH[:SCALE] (diffusers / PEFT, kohya or LoCon .safetensors); repeat for "
         "several, merged in order.")]


@app.command()
def models(
    folder: Annotated[str | None, typer.Argument(help="A model (built-in name, folder or hub id) to describe.")] = None,
    allow_pickle: Annotated[bool, typer.Option(help="Allow weights in pickle files (.bin).")] = False,
    model_config: ModelConfigOption = None,
    variant: VariantOption = None,
    lora: LoraOption = None,
) -> None:
    """List the built-in models, or describe what a given model folder contains."""
    from diffship.models.builtin import BUILTINS, DEFAULT_MODEL  # start-up time: torch

    if folder is None:
        table = Table(title="Built-in models (offline, seeded random weights)")
        for col in ("name", "family", "size", "description"):
            table.add_column(col)
        for m in BUILTINS.values():
            name = f"{m.name} (default)" if m.name == DEFAULT_MODEL else m.name
            table.add_row(name, m.family, m.approx_size, m.description)
        out.print(table)
        return
    from diffship.models.components import component_specs  # start-up time: torch
    from diffship.models.loading import check_weight_files  # start-up time: torch
    from diffship.models.source import resolve  # start-up time: torch

    source = resolve(folder, allow_pickle=allow_pickle, model_config=model_config, say=console.print,
                     variant=variant, loras=lora_specs(lora))
    family = detect_family(source.folder)
    specs = component_specs(source.folder, family)
    for module in sorted({s.module for s in specs}):
        check_weight_files(source.folder, module, allow_pickle)
    out.print(f"[bold]{source.spec}[/] ({source.kind}) at {source.folder}")
    out.print(f"family: {family.title} ({family.name}), prediction: {prediction_type(source.folder)}")
    table = Table(title="Exportable components")
    for col in ("component", "inputs", "outputs"):
        table.add_column(col)
    for s in specs:
        fmt = lambda ts: "\n".join(f"{t.name} {t.dtype} {list(t.shape)}" for t in ts)  # noqa: E731
        table.add_row(s.name, fmt(s.inputs), fmt(s.outputs))
    out.print(table)


class Streamed(StrEnum):
    """`diffship export --streamed`: the recipe's `[export] streamed` on the command line."""

    auto = "auto"
    true = "true"
    false = "false"

    @property
    def setting(self) -> bool | str:
        return "auto" if self is Streamed.auto else self is Streamed.true


@app.command()
def export(
    model: Annotated[str, typer.Option("--model", "-m",
                                       help="Built-in name, diffusers folder, single-file checkpoint or hub id.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder (must be new or empty).")],
    components: Annotated[list[str] | None, typer.Option("--components", "-c",
                                                         help="Export only these (repeat or comma-separate).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    streamed: Annotated[Streamed, typer.Option(
        help="Trace weightless and write the weights one tensor at a time (auto: where a one-pass export would not "
             "fit in memory).")] = Streamed.auto,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier diffship output in --out.")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Allow weights in pickle files (.bin).")] = False,
    model_config: ModelConfigOption = None,
    variant: VariantOption = None,
    lora: LoraOption = None,
    controlnet: ControlnetOption = None,
) -> None:
    """Export each component of a pipeline to ONNX (checked, shape-inferred) in OUT."""
    from diffship.exporters.pipeline import export_pipeline  # start-up time: torch
    from diffship.models.source import resolve  # start-up time: torch
    from diffship.store.versions import library_versions  # start-up time: numpy

    wanted = names(components)
    source = resolve(model, allow_pickle=allow_pickle, model_config=model_config, say=console.print,
                     variant=variant, loras=lora_specs(lora), controlnets=controlnet)
    console.print(f"Exporting [bold]{model}[/] to {out_dir} (ONNX opset {opset})")
    # Through the cache builds use: a model exported or built before is copied from there, not exported again.
    manifest = export_pipeline(source, out_dir, wanted, opset, overwrite, allow_pickle, _step_printer("export"),
                               versions=library_versions(), streamed=streamed.setting)
    total = sum(f["bytes"] for c in manifest["components"].values() for f in c["files"])
    out.print(f"Exported {len(manifest['components'])} component(s), {human_bytes(total)}, to {out_dir}")


@app.command()
def validate(
    folder: Annotated[Path, typer.Argument(help="A folder written by `diffship export` or `diffship build`.")],
    target: Annotated[str | None, typer.Option(help="Which artifacts of a build (target name); default: the first.")] = None,
    precision: Annotated[str | None, typer.Option(help="Which precision of that target.")] = None,
    components: Annotated[list[str] | None, typer.Option("--components", "-c", help="Only these components.")] = None,
    allow_pickle: Annotated[bool, typer.Option(help="Allow weights in pickle files (.bin).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Also print the parity report as JSON.")] = False,
) -> None:
    """Compare each exported component with PyTorch at two batch sizes and resolutions; write parity.json."""
    from diffship.validation.parity import PARITY_FILE, Tolerance, validate_folder, within  # start-up time: torch

    wanted = names(components)
    report = validate_folder(folder, target, wanted, allow_pickle=allow_pickle, on_step=_step_printer("check"),
                             precision=precision)
    tol = report["tolerance"]
    table = Table(title=f"Parity vs PyTorch FP32 ({report['target'].get('summary', report['target']['target'])}); "
                        f"pass: cosine >= {tol['min_cosine']}, rel L2 <= {tol['max_rel_l2']}")
    for col in ("component", "batch", "resolution", "output", "max abs", "mean abs", "rel L2", "cosine", ""):
        table.add_column(col, justify="right" if col not in ("component", "output") else "left")
    for name, result in report["components"].items():
        for case in result["cases"]:
            for output, m in case["outputs"].items():
                ok = within(m, Tolerance(**tol))
                table.add_row(name, str(case["batch"]), f"{case['height']}x{case['width']}", output,
                              f"{m['max_abs']:.2e}", f"{m['mean_abs']:.2e}", f"{m['rel_l2']:.2e}", f"{m['cosine']:.7f}",
                              "[green]ok[/]" if ok else "[bold red]FAIL[/]")
    out.print(table)
    if json_out:
        out.print_json(json.dumps(report))
    verdict = "[green]parity passed[/]" if report["passed"] else "[bold red]parity FAILED[/]"
    out.print(f"{verdict}; report written to {Path(folder) / PARITY_FILE}")
    if not report["passed"]:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def build(
    recipe_file: Annotated[Path | None, typer.Argument(metavar="[RECIPE.toml]", help="Build recipe (TOML).")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Override the recipe's model.")] = None,
    targets: Annotated[list[str] | None, typer.Option(
        "--targets", "-t", help="Override the recipe's targets: name[:precision+precision], comma-separated.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: out/<model>).")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild every stage, ignoring the cache.")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Allow weights in pickle files (.bin).")] = False,
    model_config: ModelConfigOption = None,
    variant: VariantOption = None,
    lora: LoraOption = None,
    controlnet: ControlnetOption = None,
    accelerate: Annotated[list[str] | None, typer.Option(
        help="Accelerations to measure on every set (replaces the recipe's [accelerations]): "
             "deep-cache:interval=3,depth=1, guidance:until=0.5; repeat to combine, repeat one to measure each "
             "setting (deep-cache:interval=2 --accelerate deep-cache:interval=3), or none.")] = None,
    budget: Annotated[str | None, typer.Option(
        help="The quality an accelerated image must keep, over the recipe's [budget]: "
             "min_psnr=30,min_ssim=0.9,max_accuracy_drop=2.")] = None,
) -> None:
    """Export, compile and validate a pipeline for every target; write artifacts, manifest.json and a report."""
    from diffship.accelerations import parse_accelerations  # start-up time: pydantic
    from diffship.recipe import load_recipe, targets_from_cli, with_budget  # start-up time: pydantic

    wanted = names(targets)
    recipe = load_recipe(recipe_file, {"model": model, "targets": targets_from_cli(wanted) if wanted else None,
                                       "allow_pickle": True if allow_pickle else None, "model_config": model_config,
                                       "variant": variant, "loras": _lora_recipes(lora),
                                       "controlnets": controlnet,
                                       "accelerations": parse_accelerations(accelerate).model_dump(mode="json", exclude_none=True)
                                       if accelerate else None})
    if budget is not None:
        recipe = with_budget(recipe, named_settings(f"budget:{budget}", "--budget")[1])
    from diffship.stages.build import build as run_build  # start-up time: after the recipe (torch, diffusers: 7 s)
    out_path = out_dir or Path("out") / Path(recipe.model.rstrip("/")).name
    console.print(f"Building [bold]{escape(recipe.model)}[/] into {escape(str(out_path))}")
    result = run_build(recipe, out_path, force=force, say=lambda line: console.print(line, markup=False, highlight=False))
    _print_summary(result.report)
    for key, r in result.report["sets"].items():
        if "not_run" in r:
            out.print(f"[yellow]{escape(key)}: converted and spec-checked only; parity, images and latency were not run "
                      f"({escape(r['not_run'])}).[/]")
    if result.all_cached:
        out.print("Nothing was rebuilt: every stage's inputs were unchanged, so its cached result was reused (--force rebuilds).")
    report_html = result.out / result.manifest["report"]["html"]
    verdict = "[green]build passed[/]" if result.passed else "[bold red]build FAILED validation[/]"
    out.print(f"{verdict}; artifacts and manifest.json in {result.out}; report: {report_html}")
    if not result.passed:
        raise typer.Exit(EXIT_FAILED)


def _lora_recipes(values: list[str] | None) -> list[dict[str, Any]] | None:
    """`--lora` values as the recipe's `[[loras]]` (None: keep the recipe's own)."""
    return [{"path": str(s.path), "scale": s.scale} for s in lora_specs(values)] or None


def _parse_step(text: str) -> dict[str, Any]:
    """`prune-channels:ratio=0.3,round_to=8` as a step dict."""
    name, settings = named_settings(text, "--step")
    return {"step": name, **settings}


@app.command()
def compress(
    recipe_file: Annotated[Path | None, typer.Argument(metavar="[RECIPE.toml]", help="Recipe with compress steps.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Override the recipe's model.")] = None,
    steps: Annotated[list[str] | None, typer.Option(
        "--step", "-s", help="A step, in order: name[:key=value,...], e.g. prune-channels:ratio=0.3 (replaces the "
                             "recipe's steps).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: out/<model>-compressed).")] = None,
    allow_pickle: Annotated[bool, typer.Option(help="Allow weights in pickle files (.bin).")] = False,
    model_config: ModelConfigOption = None,
    variant: VariantOption = None,
    lora: LoraOption = None,
) -> None:
    """Prune, distill or quantize a pipeline's UNet in PyTorch; write the compressed pipeline and a stage table."""
    from diffship.recipe import load_recipe  # start-up time: pydantic

    overrides = {"model": model, "allow_pickle": True if allow_pickle else None, "model_config": model_config,
                 "variant": variant, "loras": _lora_recipes(lora), "compress": [_parse_step(s) for s in steps] if steps else None}
    recipe = load_recipe(recipe_file, overrides)
    if not recipe.compress:
        raise DiffshipError("No compress steps: give --step (e.g. --step prune-channels:ratio=0.3) or a recipe "
                            "with compress = [...].")
    # After the recipe, as in `build`: these bring torch and diffusers (7 s), and a bad recipe is said at once.
    from diffship.models.lora import LoraSpec  # start-up time: torch
    from diffship.models.source import resolve  # start-up time: torch
    from diffship.stages.compress_run import RECORD_FILE, settings_for  # start-up time: torch
    from diffship.stages.compress_run import compress as run_compress  # start-up time: torch
    from diffship.validation.report import markdown_table  # start-up time: numpy
    out_path = (out_dir or Path("out") / f"{Path(recipe.model.rstrip('/')).name}-compressed").resolve()
    prepare_output_dir(out_path, overwrite=True)
    source = resolve(recipe.model, allow_pickle=recipe.allow_pickle, model_config=recipe.checkpoint_config,
                     say=console.print, variant=recipe.variant,
                     loras=[LoraSpec(x.path, x.scale) for x in recipe.loras])
    family = detect_family(source.folder)
    from diffship.exporters.pipeline import select_specs  # start-up time: torch

    spec = select_specs(source.folder, [family.denoiser.component])[0]
    native = family.denoiser.native_size(family.denoiser_config(source.folder), spec.vae_scale)
    settings, measure_quality = settings_for(recipe, source.folder, recipe.validation.height or native,
                                             recipe.validation.width or native)
    say = lambda line: console.print(line, markup=False, highlight=False)  # noqa: E731

    checkpoints = out_path.parent / f".{out_path.name}-checkpoints"
    keyed = checkpoints / cache.key(weights=cache.folder_hash(source.folder), settings=settings.__dict__,
                                    steps=[s.model_dump() for s in recipe.compress])
    with staged_dir(out_path) as tmp:
        record = run_compress(source.folder, family.name, recipe.compress, settings, tmp / "model", keyed,
                              recipe.allow_pickle,
                              measure_quality, say)
        atomic_write_json(tmp / RECORD_FILE, record)
        title, columns, rows = stage_table(record)
        markdown = [f"# {title}", "", *markdown_table(columns, rows), "", "![compression](compression.png)", ""]
        atomic_write_text(tmp / "compress.md", "\n".join(markdown))
        (tmp / "compression.png").write_bytes(stage_chart(record))

    shutil.rmtree(checkpoints, ignore_errors=True)  # finished: a rerun has nothing to resume
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col == "stage" else "right")
    for row in rows:
        table.add_row(*[escape(c) for c in row])
    out.print(table)
    where = "the compressed pipeline in model/" if (out_path / "model" / "model_index.json").exists() else \
        "no pipeline folder (these steps run in PyTorch only)"
    out.print(f"compress.json, compress.md, compression.png and {where}: {out_path}")


def _print_summary(report: dict[str, Any]) -> None:
    from diffship.validation.report import summary_table  # start-up time: numpy

    title, columns, rows = summary_table(report)
    table = Table(title=f"{title}: {report['model']['spec']} vs {report['baseline']['note']}")
    for col in columns:
        table.add_column(col, justify="left" if col in ("artifacts", "verdict", "results") or col.startswith("runs") else "right",
                         no_wrap=col == "artifacts")
    for row in rows:
        table.add_row(*[("[bold red]FAIL[/]" if c == "FAIL" else "[green]pass[/]" if c == "pass" else c) for c in row])
    out.print(table)


app.command("generate")(generate)
app.command("farm")(farm)
app.add_typer(lora_app, name="lora")
app.add_typer(cache_app, name="cache")
app.add_typer(clients_app, name="clients")


def run() -> None:
    """Entry point that keeps library chatter (tokenizers' fork warning) out of the CLI's output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    run()
