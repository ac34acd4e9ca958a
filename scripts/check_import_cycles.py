"""`make lint`: fail when diffship's modules import each other in a cycle, counting imports inside functions, or
when an import inside a function does not say why it is there.

import-linter's layers contract checks imports between packages; this checks every module against every other
(grimp's graph, which import-linter builds on). `if TYPE_CHECKING:` imports are left out: annotations only. An
import inside a function is for an optional extra's package (`# optional: <extra>`) or to keep a heavy package
out of start-up (`# start-up time: <package>`); anything else belongs at the top of the module.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import grimp

REASON = re.compile(r"#.*\b(optional: [\w-]+|start-up time: \S+)")
# the client runners run in the clients' own environments, never importing diffship
OUTSIDE = ("clients/runners",)


def cycles(package: str = "diffship") -> list[list[str]]:
    """Every group of modules that reach each other through imports (Tarjan's strongly connected components)."""
    graph = grimp.build_graph(package, exclude_type_checking_imports=True)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def unexplained_late_imports(root: Path) -> list[str]:
    """`path:line` of each import inside a function whose statement carries no reason comment."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if any(part in path.as_posix() for part in OUTSIDE):
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        for function in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                statement = " ".join(lines[node.lineno - 1:node.end_lineno]) if isinstance(
                    node, ast.Import | ast.ImportFrom) else None
                if statement is not None and not REASON.search(statement):
                    found.append(f"{path}:{node.lineno}")
    return sorted(set(found))


if __name__ == "__main__":
    groups = cycles()
    for group in groups:
        print(f"import cycle through {len(group)} modules: {' -> '.join(group)}")
    print(f"{len(groups)} import cycles" if groups else "no import cycles")
    late = unexplained_late_imports(Path(__file__).parents[1] / "diffship")
    for where in late:
        print(f"{where}: an import inside a function says neither `# optional: <extra>` nor `# start-up time: <package>`")
    sys.exit(1 if groups or late else 0)
