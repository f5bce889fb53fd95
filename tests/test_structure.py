"""The module structure the design asks for: the in-process core imports nothing of
the transports, and the handling context is a leaf."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "pybus"
CORE = {
    "pybus.engines",
    "pybus.handlers",
    "pybus.middleware",
    "pybus.context",
    "pybus.tracking",
    "pybus.retry",
}
TRANSPORT = {"pybus.consumer", "pybus.transport", "pybus.transport_routes", "pybus.codec"}


def imports_of(module: str) -> set[str]:
    """The pybus modules `module` imports when it is imported (not those under
    `if TYPE_CHECKING:`, which are for the type checker only)."""
    tree = ast.parse((PACKAGE / f"{module.removeprefix('pybus.')}.py").read_text())
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
                visit(node.orelse)
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pybus"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name.startswith("pybus"))
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    visit([child for child in inner if isinstance(child, ast.stmt | ast.excepthandler)])  # type: ignore[misc]

    visit(tree.body)
    return found


def closure(modules: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(imports_of(module) - seen)
    return seen


def test_the_in_process_core_imports_nothing_of_the_transports() -> None:
    reached = closure(CORE)
    assert not reached & TRANSPORT, sorted(reached & TRANSPORT)
    assert not {module for module in reached if module.startswith("pybus.redis")}


def test_the_handling_context_is_a_leaf() -> None:
    assert imports_of("pybus.context") == {"pybus.errors"}
    assert imports_of("pybus.errors") == set()
