"""Proving, once at `start()`, that an async handler always returns None.

A handler that always returns None produces no follow-up event from its return
value, so `execute` can hand the caller the handler's own coroutine instead of
wrapping it in one that looks at the result (the wrapper is a third of the
dispatch cost). The proof reads the function's source with `ast`: every `return`
in its body (nested functions and classes aside) is bare or `return None`.

The proof is only trusted when the source is the code that runs: the function's
file is compiled again and the function's code found in it must equal the running
code (instructions, exception table, names, flags and constants, nested code
alike). A file edited since import, a function made by `exec` or in the REPL, a
wrapper with `__wrapped__`, another interpreter's compiler that differs: each fails
the check, and the handler takes the general path, which looks at what it returns.
What the check cannot see is a function whose `__code__` is replaced after
`start()` (some hot reloaders do): that is not supported, as the docs say.
"""

from __future__ import annotations

import ast
import functools
import inspect
import linecache
import textwrap
import tokenize
import types
import warnings
from typing import Any

_proven: dict[types.CodeType, bool] = {}


def returns_none(func: Any) -> bool:
    """True when the async function `func` provably returns None on every path."""
    func = getattr(func, "__func__", func)  # a bound method: its function
    if not isinstance(func, types.FunctionType) or hasattr(func, "__wrapped__"):
        return False
    code = func.__code__
    known = _proven.get(code)
    if known is None:
        known = _proven[code] = _prove(code)
    return known


def _prove(code: types.CodeType) -> bool:
    if not code.co_flags & inspect.CO_COROUTINE:
        return False
    lines = linecache.getlines(code.co_filename)
    if not lines:
        return False
    try:
        block = inspect.getblock(lines[code.co_firstlineno - 1 :])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. invalid escapes: the comparison decides
            tree = ast.parse(textwrap.dedent("".join(block)))
    except (SyntaxError, ValueError, IndexError, tokenize.TokenError):
        return False
    node = tree.body[0] if tree.body else None
    if not isinstance(node, ast.AsyncFunctionDef) or node.name != code.co_name:
        return False
    if not all(_bare(ret) for ret in _returns(node)):
        return False
    # Compiled alone, a function's code can differ from the module's (3.11 calls a method of
    # an imported module differently), so the comparison compiles the whole file, once.
    twin = _compiled(code.co_filename, "".join(lines)).get((code.co_name, code.co_firstlineno))
    return twin is not None and _same(twin, code)


@functools.lru_cache(maxsize=32)
def _compiled(filename: str, source: str) -> dict[tuple[str, int], types.CodeType]:
    """Every function's code in the file as compiled again from `source`, by name and first line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pending = [compile(source, filename, "exec", dont_inherit=True)]
    except (SyntaxError, ValueError):
        return {}
    found: dict[tuple[str, int], types.CodeType] = {}
    while pending:
        for const in pending.pop().co_consts:
            if isinstance(const, types.CodeType):
                found[(const.co_name, const.co_firstlineno)] = const
                pending.append(const)
    return found


def _returns(function: ast.AsyncFunctionDef) -> list[ast.Return]:
    """The `return` statements of `function`'s own body (not of functions defined in it)."""
    found: list[ast.Return] = []
    pending: list[ast.AST] = list(function.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            continue
        if isinstance(node, ast.Return):
            found.append(node)
        pending.extend(ast.iter_child_nodes(node))
    return found


def _bare(node: ast.Return) -> bool:
    return node.value is None or (isinstance(node.value, ast.Constant) and node.value.value is None)


_COMPARED = (
    "co_code",
    "co_names",
    "co_varnames",
    "co_freevars",
    "co_cellvars",
    "co_flags",
    "co_argcount",
    "co_posonlyargcount",
    "co_kwonlyargcount",
    "co_exceptiontable",  # CPython 3.11+: where a raised exception goes on
)


def _same(compiled: types.CodeType, running: types.CodeType) -> bool:
    """The same instructions, exception table, names, flags and constants, nested code alike."""
    if any(getattr(compiled, name, None) != getattr(running, name, None) for name in _COMPARED):
        return False
    if len(compiled.co_consts) != len(running.co_consts):
        return False
    for mine, theirs in zip(compiled.co_consts, running.co_consts, strict=True):
        if isinstance(mine, types.CodeType) and isinstance(theirs, types.CodeType):
            if not _same(mine, theirs):
                return False
        elif type(mine) is not type(theirs) or mine != theirs:
            return False
    return True
