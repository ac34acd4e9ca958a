"""`diffship cache`: check the cache entry by entry, and bound its size."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from diffship.cli.failures import EXIT_FAILED
from diffship.cli.shared import human_bytes, out
from diffship.store.cache import cache_root
from diffship.store.maintenance import by_stage, prune, verify

cache_app = typer.Typer(no_args_is_help=True, help="Check and bound diffship's cache ($DIFFSHIP_CACHE).")


def _stage_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col == "stage" else "right")
    for row in rows:
        table.add_row(*row)
    out.print(table)


@cache_app.command("verify")
def cache_verify(
    evict: Annotated[bool, typer.Option(help="Remove the entries whose files differ from their record.")] = False,
) -> None:
    """Re-hash every cached entry against its recorded sha256s (every byte); exit 1 when any differs and is kept."""
    checked = verify(evict)
    stages = sorted({c.entry.stage for c in checked})
    rows = []
    for stage in stages:
        mine = [c for c in checked if c.entry.stage == stage]
        rows.append([stage, str(len(mine)), human_bytes(sum(c.entry.bytes for c in mine)),
                     str(sum(1 for c in mine if not c.problem and not c.in_use)), str(sum(1 for c in mine if c.problem)),
                     str(sum(1 for c in mine if c.in_use))])
    _stage_table(f"Cache {cache_root()}", ["stage", "entries", "size", "ok", "corrupted", "in use (not checked)"], rows)
    bad = [c for c in checked if c.problem]
    for c in bad:
        action = "removed" if c.evicted else "kept (--evict removes it)"
        out.print(f"[bold red]corrupted[/] {c.entry.stage} {c.entry.path.name[:16]}: {escape(c.problem or '')}; {action}")
    if any(not c.evicted for c in bad):
        raise typer.Exit(EXIT_FAILED)
    out.print("every entry matches its record" if not bad else f"{len(bad)} corrupted entr{'y' if len(bad) == 1 else 'ies'} "
              "removed; the next build makes them again")


@cache_app.command("prune")
def cache_prune(
    older_than: Annotated[float | None, typer.Option("--older-than", min=0, metavar="DAYS",
                                                     help="Remove entries not used for more than DAYS days.")] = None,
    max_size: Annotated[float | None, typer.Option("--max-size", min=0, metavar="GB",
                                                   help="Then remove the least recently used until the cache is at "
                                                        "most GB gigabytes (10^9 bytes).")] = None,
) -> None:
    """Remove cached entries by age and total size (least recently used first), and what killed runs left behind."""
    result = prune(older_than, None if max_size is None else int(max_size * 1e9))
    removed, kept, busy = by_stage(result.removed), by_stage(result.kept + result.in_use), by_stage(result.in_use)
    rows = [[stage, str(removed.get(stage, (0, 0))[0]), human_bytes(removed.get(stage, (0, 0))[1]),
             str(kept.get(stage, (0, 0))[0]), human_bytes(kept.get(stage, (0, 0))[1]), str(busy.get(stage, (0, 0))[0])]
            for stage in sorted(set(removed) | set(kept))]
    _stage_table(f"Cache {cache_root()}", ["stage", "removed", "freed", "kept", "kept size", "in use (kept)"], rows)
    freed = sum(e.bytes for e in result.removed) + result.stale_bytes
    out.print(f"removed {len(result.removed)} entr{'y' if len(result.removed) == 1 else 'ies'} and "
              f"{result.stale_staging} unfinished staging folder(s) of runs that died; freed {human_bytes(freed)}")
