"""`diffship clients`: the libraries validation loads each set in, and their environments."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from diffship.cli.shared import out
from diffship.clients import CLIENTS, NAMES, client_named, clients_root, missing_reason
from diffship.clients.environments import install
from diffship.errors import DiffshipError

clients_app = typer.Typer(no_args_is_help=True, help="The clients each set is loaded in (OpenVINO GenAI, optimum).")


@clients_app.command("list")
def clients_list() -> None:
    """Each client: what it loads, where its environment is, its version or why it cannot run."""

    table = Table(title=f"clients ($DIFFSHIP_CLIENTS: {escape(str(clients_root()))})")
    for column in ("client", "loads", "version", "status"):
        table.add_column(column)
    for client in CLIENTS:
        reason = missing_reason(client)
        marker = clients_root() / client.name / ".installed"
        version = "" if reason else json.loads(marker.read_text())["versions"].get(client.package, "?")
        table.add_row(client.name, f"{client.target} sets", version, escape(reason or "installed"))
    out.print(table)


@clients_app.command("install")
def clients_install(
    names: Annotated[list[str] | None, typer.Argument(help="Clients to install (default: all).")] = None,
    force: Annotated[bool, typer.Option(help="Make the environments again even when they are up to date.")] = False,
) -> None:
    """Make each client's own environment (venv + pip, from the client's declaration in diffship/clients)."""
    if unknown := [n for n in names or [] if n not in NAMES]:
        raise DiffshipError(f"Unknown client(s) {', '.join(unknown)}; choose from {', '.join(NAMES)}.")
    for client in [client_named(n) for n in names] if names else CLIENTS:
        install(client, lambda line: out.print(escape(line)), force)
