"""Finding the application's dispatcher from a path such as `app.bus:dp`.

Shared by the command line (`pybus routes app.bus:dp`) and the pytest plugin's
`pybus_app` ini option, so that both accept the same spellings:

- `module:attribute`, where `attribute` names a Dispatcher or a callable that
  returns one (`app.bus:dp`, `app.bus:create_dispatcher`; dots reach further:
  `app.bus:Container.dp`);
- the module as a file path below the base folder (`app/bus.py:dp`, or `app/bus:dp`
  for the file app/bus.py or the package app/bus/), the base folder being the
  working directory for the command line and pytest's rootdir for the plugin;
- the module alone (`app.bus`, `app/bus.py`) when it holds exactly one Dispatcher
  (one object, under any number of names), or, holding none, exactly one function
  annotated to return a Dispatcher that takes no arguments (`def create_app() ->
  Dispatcher`). Otherwise the error names the candidates and the `module:attribute`
  to write.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any

from pybus.dispatcher import Dispatcher
from pybus.handlers import resolved_hints


class UsageError(Exception):
    """A mistake in naming the application or on the command line: the command line
    reports it on stderr with exit code 2, the pytest plugin as a usage error."""


#: Names applications commonly give the function that builds their dispatcher. When a module
#: holds no Dispatcher and no function annotated to return one, the error suggests those of
#: these it defines (taking no arguments); they are never called unless named.
FACTORY_NAMES = ("create_app", "create_dispatcher", "create_worker", "create", "build", "make_app")


@dataclass(frozen=True)
class App:
    """What `find_app` found: `target` is `module`'s `attribute` (dotted), uncalled."""

    module: str
    attribute: str
    target: Any


def find_app(path: str, base: str | None = None) -> App:
    """Import the module `path` names and return what it names, uncalled: a Dispatcher,
    or the callable that builds one (checked by `build_dispatcher`).

    `base` is the folder that file paths are relative to, put first on `sys.path`
    when missing (as `python -m` does with the working directory); None: the working
    directory, and errors speak of running the command from the project's folder.
    """
    module_name, sep, attribute = path.partition(":")
    if not module_name or (sep and not attribute):
        raise UsageError(f"{path!r} is not an import path; write module:attribute, as in app.bus:dp")
    folder = base or os.getcwd()
    module_name = _module_of(module_name, folder, base, attribute)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    module = _import(module_name, base)
    if not attribute:
        attribute = _the_dispatcher(module, module_name)
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UsageError(f"{module_name!r} has no attribute {attribute!r}") from None
    return App(module_name, attribute, target)


def build_dispatcher(path: str, target: Any) -> Dispatcher:
    """The Dispatcher `target` (found by `find_app(path)`) is, or returns when called."""
    if callable(target) and not isinstance(target, Dispatcher):
        try:
            target = target()
        except (Exception, SystemExit) as exc:
            raise UsageError(f"Calling {path} to build the dispatcher failed: {_cause(exc)}") from exc
    if not isinstance(target, Dispatcher):
        raise UsageError(
            f"{path} is a {type(target).__name__}, not a pybus Dispatcher (or a callable returning one)"
        )
    return target


def load_dispatcher(path: str) -> Dispatcher:
    """Import `module:attribute` and return the Dispatcher it names (calling a factory).

    `module` may also be a file path below the working directory (`app/bus.py`), and
    `:attribute` may be left out when the module holds exactly one Dispatcher.
    """
    return build_dispatcher(path, find_app(path).target)


def builders_in(module_name: str) -> list[str]:
    """Names of the functions defined in the (imported) module that build a Dispatcher as a
    factory found without `:attribute` does (annotated to return one, not async, taking no
    arguments): what to name instead of a dispatcher made at import."""
    module = sys.modules.get(module_name)
    return [] if module is None else _factories(module, defined_here=True)[0]


def _module_of(name: str, folder: str, base: str | None, attribute: str) -> str:
    """The module name of `name`, which may be a file path below `folder`."""
    if not name.endswith(".py") and os.sep not in name and "/" not in name:
        return name
    path = os.path.abspath(os.path.join(folder, name))
    if not path.endswith(".py"):  # app/bus: the module app/bus.py, or the package app/bus/
        if os.path.isfile(path + ".py"):
            path += ".py"
        elif os.path.isfile(os.path.join(path, "__init__.py")):
            path = os.path.join(path, "__init__.py")
        else:
            written = name.rstrip("/" + os.sep)
            raise UsageError(
                f"{name!r} names no module: there is neither {written}.py nor a package "
                f"{written}/__init__.py in {folder}; write the module's file (app/bus.py) or its name "
                "(app.bus)"
            )
    dotted = _dotted(os.path.relpath(path, folder)) if path.startswith(folder + os.sep) else None
    if dotted is None:
        if base is not None:
            raise UsageError(
                f"{name!r} is a file path that is not a module below {base}; write a path relative to "
                "that folder, as in app/bus.py:dp, or module:attribute, as in app.bus:dp"
            )
        raise UsageError(_elsewhere(name, path, attribute))
    return dotted


def _dotted(relative: str) -> str | None:
    """`relative` (a .py file's path) as a module name, or None when it cannot be one."""
    parts = relative.removesuffix(".py").split(os.sep)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts) if all(part.isidentifier() for part in parts) else None


def _elsewhere(name: str, path: str, attribute: str) -> str:
    """Why the file `path` cannot be imported from the working directory, and where it can be."""
    here = os.getcwd()
    if path.startswith(here + os.sep):
        why = f"{name!r} cannot be imported from this folder ({here}): its path is not a module name"
    else:
        why = f"{name!r} is not below this folder ({here})"
    why += "; pybus imports the app as a module, from the folder it runs in"
    found = _import_root(path)
    if found is None:
        return (
            f"{why}: run the command from your project's folder and pass the module's name, as in app.bus:dp"
        )
    root, dotted = found
    target = f"{dotted}:{attribute}" if attribute else dotted
    return (
        f"{why}: run the command from {root} and pass {target} (or set PYTHONPATH={root} and pass {target})"
    )


#: Files that mark a project's folder.
_PROJECT_MARKS = ("pyproject.toml", "setup.py", "setup.cfg", ".git")


def _import_root(path: str) -> tuple[str, str] | None:
    """The folder to import the file `path` from, and its module name there: the project's
    folder (the nearest one above it holding a file of `_PROJECT_MARKS`; its `src` folder in
    a src layout), else the folder above the file's outermost package."""
    folder = os.path.dirname(path)
    while True:
        if any(os.path.exists(os.path.join(folder, mark)) for mark in _PROJECT_MARKS):
            source = os.path.join(folder, "src")
            root = source if path.startswith(source + os.sep) else folder
            dotted = _dotted(os.path.relpath(path, root))
            if dotted is not None:
                return root, dotted
            break
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    root = os.path.dirname(path)
    while os.path.isfile(os.path.join(root, "__init__.py")) and os.path.dirname(root) != root:
        root = os.path.dirname(root)
    dotted = _dotted(os.path.relpath(path, root))
    return None if dotted is None else (root, dotted)


def _the_dispatcher(module: Any, module_name: str) -> str:
    """The name to use when `:attribute` is left out: of the one Dispatcher in `module` (its
    names sorted, the first), else of the one function annotated to return one."""
    names_of: dict[int, list[str]] = {}  # one Dispatcher may have several names (bus = dp)
    for name, value in vars(module).items():
        if isinstance(value, Dispatcher):
            names_of.setdefault(id(value), []).append(name)
    found = sorted(sorted(names) for names in names_of.values())
    if len(found) == 1:
        return found[0][0]
    if found:
        shown = ", ".join(" = ".join(names) for names in found)
        raise UsageError(
            f"{module_name!r} holds {len(found)} Dispatchers ({shown}); name one, as in "
            f"{module_name}:{found[0][0]}"
        )
    return _the_factory(module, module_name)


def _the_factory(module: Any, module_name: str) -> str:
    """The name of the one function in `module` annotated to return a Dispatcher that can be
    called without arguments; else `UsageError` naming the candidates."""
    ready, needing = _factories(module)
    if len(ready) == 1:
        return ready[0]
    if ready:
        raise UsageError(
            f"{module_name!r} holds no Dispatcher but {len(ready)} functions that return one "
            f"({', '.join(ready)}); name one, as in {module_name}:{ready[0]}"
        )
    text = f"{module_name!r} holds no Dispatcher, nor a function annotated to return one (-> Dispatcher)"
    guesses = [name for name in FACTORY_NAMES if _may_build(getattr(module, name, None))]
    if needing:
        text = (
            f"{module_name!r} holds no Dispatcher; {', '.join(needing)} "
            f"{'returns' if len(needing) == 1 else 'return'} one, but pybus calls a factory without "
            "arguments"
        )
    if guesses:
        which = guesses[0] if len(guesses) == 1 else f"one of {', '.join(guesses)}"
        raise UsageError(f"{text}; if {which} builds it, name it, as in {module_name}:{guesses[0]}")
    if needing:
        raise UsageError(
            f"{text}: add a function that takes none and builds it, and name it, as in "
            f"{module_name}:create_app"
        )
    raise UsageError(f"{text}; name the one to use (or a function that builds it) as {module_name}:attribute")


def _factories(module: Any, *, defined_here: bool = False) -> tuple[list[str], list[str]]:
    """The plain functions of `module` annotated to return a Dispatcher, not async (a class is
    not a factory here), sorted: the names of those pybus can call without arguments, and those
    with parameters pybus cannot fill, as `name(parameter, ...)`. With `defined_here`, only the
    functions defined in `module` itself (not imported into it)."""
    ready: list[str] = []
    needing: list[str] = []
    for name, value in sorted(vars(module).items()):
        if not inspect.isfunction(value) or inspect.iscoroutinefunction(value):
            continue
        if (defined_here and value.__module__ != module.__name__) or not _returns_dispatcher(value):
            continue
        required = _required_parameters(value)
        if required:
            needing.append(f"{name}({', '.join(required)})")
        else:
            ready.append(name)
    return ready, needing


def _may_build(value: object) -> bool:
    """Whether `value` is a plain function pybus can call (not async, without
    arguments) whose return is not annotated: one of FACTORY_NAMES may build the dispatcher."""
    if not inspect.isfunction(value) or inspect.iscoroutinefunction(value) or _required_parameters(value):
        return False
    try:
        return "return" not in value.__annotations__
    except Exception:  # pragma: no cover - Python 3.14 evaluates annotations here: it has one
        return False


def _returns_dispatcher(function: Any) -> bool:
    """Whether `function`'s return annotation is Dispatcher (or a subclass), resolved on its own
    (a parameter's annotation that does not resolve does not hide it). One that does not resolve
    (a name imported only for type checkers) is read as written: `Dispatcher`, `pybus.Dispatcher`."""
    hints, unresolved = resolved_hints(function)
    if "return" in unresolved:
        try:
            hint = function.__annotations__.get("return")
        except Exception:  # pragma: no cover - Python 3.14 evaluates them here, and one failed
            return False
        return isinstance(hint, str) and hint.strip().strip("'\"").rpartition(".")[2] == "Dispatcher"
    hint = hints.get("return")
    return isinstance(hint, type) and issubclass(hint, Dispatcher)


def _required_parameters(function: Any) -> list[str]:
    """The parameters of the Python function `function` that have no default (and are not
    *args, **kwargs)."""
    return [
        parameter.name
        for parameter in inspect.signature(function).parameters.values()
        if parameter.default is inspect.Parameter.empty
        and parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


def _import(module_name: str, base: str | None) -> Any:
    """Import the application's module; any failure becomes one line naming the real cause."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(f"{missing}.")):
            raise UsageError(
                f"Cannot import {module_name!r}: there is no module {missing!r}; check the module path "
                + ("(run the command from your project's folder)" if base is None else f"(from {base})")
                + " and sys.path"
            ) from exc
        raise UsageError(
            f"Importing {module_name!r} failed: it imports {missing!r}, which is not installed "
            f"({_where(exc)}); install it, or check the import"
        ) from exc
    except SyntaxError as exc:
        raise UsageError(
            f"Importing {module_name!r} failed: {relative(f'{exc.filename}:{exc.lineno}')}: "
            f"SyntaxError: {exc.msg}"
        ) from exc
    except SystemExit as exc:
        raise UsageError(
            f"Importing {module_name!r} failed: it called sys.exit({exc.code!r}) ({_where(exc)})"
        ) from exc
    except Exception as exc:
        raise UsageError(f"Importing {module_name!r} failed: {_cause(exc)}") from exc


def _cause(exc: BaseException) -> str:
    text = " ".join(str(exc).split())  # one line, whatever the message holds
    return f"{type(exc).__name__}: {text} ({_where(exc)})"


def _where(exc: BaseException) -> str:
    """Where `exc` was raised: file:line of the innermost frame of the application's own
    code (not importlib's, nor a frozen stdlib module's)."""
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if "importlib" not in frame.filename and not frame.filename.startswith("<")
    ]
    if not frames:
        return "location unknown"
    return f"at {relative(f'{frames[-1].filename}:{frames[-1].lineno}')}"


def relative(location: str) -> str:
    """`path:line` with the path relative to the working directory when it is below it."""
    path, _, line = location.rpartition(":")
    if path and os.path.isabs(path) and path.startswith(os.getcwd() + os.sep):
        return f"{os.path.relpath(path)}:{line}"
    return location
