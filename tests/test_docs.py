"""The code in the documentation cannot rot.

Longer examples are included from `examples/` files (run by tests/test_examples.py).
The short fragments left inline must compile, and every call they make on pybus
names, or on a dispatcher `dp`, must name attributes and keywords that exist.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pybus
from pybus import Dispatcher

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def fragments() -> Iterator[tuple[str, str]]:
    for page in PAGES:
        for number, match in enumerate(BLOCK.finditer(page.read_text()), 1):
            code = match.group(1)
            if "--8<--" not in code:
                yield f"{page.relative_to(ROOT)}#{number}", code


FRAGMENTS = dict(fragments())


def test_the_fragments_are_found() -> None:
    assert len(FRAGMENTS) >= 10  # the regular expression still matches the pages


def namespace(tree: ast.Module) -> dict[str, Any]:
    """pybus's public names, plus what the fragment imports from pybus."""
    names: dict[str, Any] = {name: getattr(pybus, name) for name in pybus.__all__}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pybus"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                names[alias.asname or alias.name] = getattr(module, alias.name)
    return names


def resolve(node: ast.expr, names: dict[str, Any], dp: Dispatcher) -> Any:
    """The object a call's function names: a pybus name, or an attribute chain on `dp`."""
    if isinstance(node, ast.Name):
        if node.id == "dp":
            return dp
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = resolve(node.value, names, dp)
        if owner is None:
            return None
        assert hasattr(owner, node.attr), f"{ast.unparse(node)}: {owner!r} has no attribute {node.attr!r}"
        return getattr(owner, node.attr)
    return None


@pytest.mark.parametrize("where", sorted(FRAGMENTS))
def test_fragment_compiles_and_calls_what_exists(where: str) -> None:
    code = FRAGMENTS[where]
    compile(code, where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    tree = ast.parse(code)
    names = namespace(tree)
    dp = Dispatcher()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            resolve(node, names, dp)  # every attribute of `dp` (or a pybus name) exists
        if not isinstance(node, ast.Call):
            continue
        target = resolve(node.func, names, dp)
        if target is None or not callable(target):
            continue
        keywords = {keyword.arg: None for keyword in node.keywords if keyword.arg is not None}
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):
            continue
        try:
            signature.bind_partial(**keywords)
        except TypeError as exc:
            pytest.fail(f"{where}: {ast.unparse(node)} does not fit {target!r}{signature}: {exc}")
