"""The clients' environments: made with venv + pip from their declarations, run as subprocesses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from diffship.clients import Client, clients_root, python_of, runner_path
from diffship.errors import DiffshipError

RUN_TIMEOUT_S = 1800  # one client drawing one image per job; a full-size set compiles its IRs first


def install(client: Client, say: Any, force: bool = False) -> dict[str, str]:
    """Make (or keep) the client's environment; return the versions installed there."""
    folder = clients_root() / client.name
    marker = folder / ".installed"
    wanted = json.dumps({"requirements": client.requirements, "remove": client.remove})
    if not force and marker.is_file() and json.loads(marker.read_text())["declared"] == wanted:
        say(f"{client.title}: already installed in {folder}")
        return json.loads(marker.read_text())["versions"]
    shutil.rmtree(folder, ignore_errors=True)
    say(f"{client.title}: creating {folder}")
    _call([sys.executable, "-m", "venv", str(folder)], client)
    pip = [str(folder / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    for requirement in client.requirements:
        say(f"{client.title}: pip install {requirement}")
        _call([*pip, "install", "--quiet", *requirement.split()], client)
    if client.remove:
        _call([*pip, "uninstall", "--yes", "--quiet", *client.remove], client)
    versions = _versions(folder)
    marker.write_text(json.dumps({"declared": wanted, "versions": versions}, indent=1), encoding="utf-8")
    say(f"{client.title}: {client.package} {versions.get(client.package, '?')}")
    return versions


def _call(command: list[str], client: Client) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise DiffshipError(f"Installing {client.title} failed ({' '.join(command[-3:])}):\n{done.stderr[-3000:]}")


def _versions(folder: Path) -> dict[str, str]:
    listed = subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "list", "--format=json",
                             "--disable-pip-version-check"], capture_output=True, text=True, check=True).stdout
    return {p["name"].lower(): p["version"] for p in json.loads(listed)}


def run_jobs(client: Client, jobs: list[dict[str, Any]], work: Path) -> list[dict[str, Any]]:
    """Run `jobs` in the client's environment; one result per job (a crashed or hung client fails every job it did
    not finish, with the end of its log)."""
    work.mkdir(parents=True, exist_ok=True)
    jobs_file, results_file, log = work / "jobs.json", work / "results.json", work / "client.log"
    jobs_file.write_text(json.dumps(jobs, indent=1), encoding="utf-8")
    command = [str(python_of(client)), str(runner_path(client)), *client.runner_args, str(jobs_file),
               str(results_file)]
    with log.open("w", encoding="utf-8") as out:
        try:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S)
            status = f"exit code {done.returncode}"
        except subprocess.TimeoutExpired:
            status = f"no answer within {RUN_TIMEOUT_S} s"
    results = json.loads(results_file.read_text(encoding="utf-8")) if results_file.is_file() else []
    tail = log.read_text(encoding="utf-8", errors="replace")[-1500:]
    return results + [{"ok": False, "error": f"{client.title} stopped ({status}) before this job: {tail}"}
                      for _ in jobs[len(results):]]
