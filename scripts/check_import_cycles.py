"""`make lint`: fail when diffship's modules import each other in a cycle, counting imports inside functions.

import-linter's layers contract checks imports between packages; this checks every module against every other
(grimp's graph, which import-linter builds on). `if TYPE_CHECKING:` imports are left out: annotations only.
"""

from __future__ import annotations

import sys

import grimp


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


if __name__ == "__main__":
    groups = cycles()
    for group in groups:
        print(f"import cycle through {len(group)} modules: {' -> '.join(group)}")
    print(f"{len(groups)} import cycles" if groups else "no import cycles")
    sys.exit(1 if groups else 0)
