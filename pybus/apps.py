"""Finding the application's dispatcher from a path such as `app.bus:dp`.

Shared by the command line (`pybus routes app.bus:dp`) and the pytest plugin's
`pybus_app` ini option, so that both accept the same spellings:

- `module:attribute`, where `attribute` names a Dispatcher or a callable that
  returns one (`app.bus:dp`, `app.bus:create_dispatcher`; dots reach further:
  `app.bus:Container.dp`);
- the module as a file path below the base folder (`app/bus.py:dp`), the base
  folder being the working directory for the command line and pytest's rootdir
  for the plugin;
- the module alone (`app.bus`, `app/bus.py`) when it holds exactly one Dispatcher.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any

from pybus.dispatcher import Dispatcher


class UsageError(Exception):
    """A mistake in naming the application or on the command line: the command line
    reports it on stderr with exit code 2, the pytest plugin as a usage error."""


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
    module_name = _module_of(module_name, folder, base)
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
    """Names of the functions defined in the (imported) module whose return annotation
    is Dispatcher: what to name instead of a dispatcher made at import."""
    module = sys.modules.get(module_name)
    if module is None:
        return []
    found = []
    for name, value in vars(module).items():
        returns = getattr(value, "__annotations__", {}).get("return") if callable(value) else None
        if getattr(value, "__module__", None) == module_name and returns in (Dispatcher, "Dispatcher"):
            found.append(name)
    return sorted(found)


def _module_of(name: str, folder: str, base: str | None) -> str:
    """The module name of `name`, which may be a file path below `folder`."""
    if not name.endswith(".py") and os.sep not in name and "/" not in name:
        return name
    path = os.path.abspath(os.path.join(folder, name))
    inside = path.startswith(folder + os.sep) and path.endswith(".py")
    dotted = os.path.relpath(path, folder).removesuffix(".py").replace(os.sep, ".") if inside else ""
    if not inside or not all(part.isidentifier() for part in dotted.split(".")):
        if base is None:
            raise UsageError(
                f"{name!r} is a file path that is not a module below this folder; run the command from "
                "your project's folder and write module:attribute, as in app.bus:dp"
            )
        raise UsageError(
            f"{name!r} is a file path that is not a module below {base}; write a path relative to "
            "that folder, as in app/bus.py:dp, or module:attribute, as in app.bus:dp"
        )
    return dotted.removesuffix(".__init__")


def _the_dispatcher(module: Any, module_name: str) -> str:
    """The name of the one Dispatcher defined in `module` (when `:attribute` is left out)."""
    found: list[str] = sorted(name for name, value in vars(module).items() if isinstance(value, Dispatcher))
    if len(found) == 1:
        return found[0]
    if not found:
        raise UsageError(
            f"{module_name!r} holds no Dispatcher; name the one to use (or a function that builds it) "
            f"as {module_name}:attribute"
        )
    raise UsageError(
        f"{module_name!r} holds {len(found)} Dispatchers ({', '.join(found)}); name one, as in "
        f"{module_name}:{found[0]}"
    )


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
