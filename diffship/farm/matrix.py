"""The matrix recipe of `diffship farm`: a shared cache and one `[[builds]]` table per build (a build recipe's keys,
plus `name` and `[builds.farm]`), read into plain rows."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from diffship.errors import DiffshipError
from diffship.recipe import Recipe, read_toml, recipe_from_data, targets_from_cli

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class FarmOptions(BaseModel):
    """Where a build's stages may run and with what.

    `accelerator_type` is the GPU kind (Ray's `accelerator_type:<kind>` resource) its TensorRT engines are built on,
    because an engine only runs on the kind that built it. `cpus` is each stage's share of a node: Ray gives a task
    that many threads (OMP_NUM_THREADS), and a stage's float sums, so its calibration and INT8 scales, follow its
    thread count, as a local build's follow its machine's cores."""

    model_config = ConfigDict(extra="forbid")
    accelerator_type: str | None = None
    cpus: int = Field(1, ge=1)


@dataclass(frozen=True)
class Row:
    """One build of the matrix: its folder's name, its recipe, and where its stages may run."""

    name: str
    recipe: Recipe
    farm: FarmOptions


@dataclass(frozen=True)
class Matrix:
    """The whole matrix: its file, the cache every node shares, and the builds in the order written."""

    path: Path
    cache: Path
    rows: tuple[Row, ...]


def load_matrix(path: Path) -> Matrix:
    """Read and check a matrix file; every problem is a DiffshipError naming the build it is in."""
    path = path.resolve()
    data = read_toml(path, "Matrix")
    if unknown := sorted(set(data) - {"cache", "builds"}):
        raise DiffshipError(f"Matrix {path}: unknown top-level key(s) {', '.join(unknown)}; a matrix has a [cache] "
                            "table and [[builds]] tables.")
    cache = data.get("cache")
    if not isinstance(cache, dict) or not isinstance(cache.get("path"), str) or set(cache) != {"path"}:
        raise DiffshipError(f'Matrix {path}: needs a [cache] table with only `path = "..."`, the cache folder every '
                            "node of the farm sees (NFS or a mounted bucket).")
    builds = data.get("builds")
    if not isinstance(builds, list) or not builds or not all(isinstance(b, dict) for b in builds):
        raise DiffshipError(f"Matrix {path}: needs at least one [[builds]] table.")
    rows = tuple(_row(path, i, table) for i, table in enumerate(builds))
    names = [r.name for r in rows]
    if repeated := sorted({n for n in names if names.count(n) > 1}):
        raise DiffshipError(f"Matrix {path}: several builds are named {', '.join(repeated)}; each lands in its own "
                            "folder, so give them distinct `name`s.")
    return Matrix(path, (path.parent / cache["path"]).resolve(), rows)


def _row(path: Path, index: int, table: dict[str, Any]) -> Row:
    where = f"{path} [[builds]] #{index + 1}"
    table = dict(table)
    name, farm = table.pop("name", None), table.pop("farm", {})
    targets = table.get("targets")
    if isinstance(targets, list) and any(isinstance(t, str) for t in targets):
        if not all(isinstance(t, str) for t in targets):
            raise DiffshipError(f"{where}: targets are either all strings (\"onnxruntime:fp32+int8\") or all tables.")
        table["targets"] = targets_from_cli([p for t in targets for p in t.split(",") if p.strip()])
    recipe = recipe_from_data(table, path.parent, where)
    name = name if name is not None else Path(recipe.model.rstrip("/")).name
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise DiffshipError(f"{where}: name {name!r} must be a plain folder name (letters, digits, '.', '_', '-'; not "
                            "starting with '.'), because the build lands in OUT/<name>/.")
    try:
        options = FarmOptions.model_validate(farm)
    except ValidationError as exc:
        raise DiffshipError(f"{where}: [builds.farm]: " + "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
            for e in exc.errors())) from None
    return Row(name, recipe, options)
