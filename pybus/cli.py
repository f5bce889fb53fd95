"""The `pybus` command line (also `python -m pybus`).

Each command takes `module:attribute`, naming a Dispatcher or a callable that
returns one; the module may be written as a file path (`app/bus.py:dp`) and the
attribute left out when the module holds one Dispatcher or one factory (see
`pybus.apps`)::

    pybus routes app.bus:dp [--json]
    pybus graph app.bus:create_dispatcher --format mermaid|dot
    pybus exec app.bus:dp PlaceOrder '{"customer": "ada", "sku": "book-1"}'
    pybus worker app.bus:dp [--concurrency 4] [--prefetch 100] [--drain-timeout 30]
                            [--max-deliveries 5] [--wait 1.0]
    pybus dlq app.bus:dp list|requeue ID...|purge

Exit codes: 0 success, 1 the handler failed, 2 the command line was wrong
(a bad import path, an unknown message name, JSON that does not fit).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import enum
import inspect
import json
import logging
import re
import sys
import types
import typing
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from pybus import __version__
from pybus.apps import UsageError as UsageError  # raised by the commands: exit code 2
from pybus.apps import build_dispatcher, find_app, relative
from pybus.apps import load_dispatcher as load_dispatcher
from pybus.dispatcher import Dispatcher
from pybus.errors import ImproperlyConfigured, Kind, PyBusError, TransportError, key_name
from pybus.handlers import resolved_hints
from pybus.routes import Route, message_flow, registrations, routes

if TYPE_CHECKING:
    from pybus.redis_dead_letters import RedisDeadLetters
    from pybus.redis_streams import RedisTransport


def load_app(path: str) -> tuple[str, Dispatcher]:
    """Import `module:attribute` (see `pybus.apps`); return it as `module:attribute` (the
    module's name, and the attribute found when it was left out) and the Dispatcher it names,
    calling a factory. Raises `UsageError` naming what to type instead."""
    app = find_app(path)
    found = f"{app.module}:{app.attribute}"
    return found, build_dispatcher(found, app.target)


# -- routes ---------------------------------------------------------------------


def format_routes(found: list[Route]) -> str:
    """The routes as an aligned text table (locations relative to the working directory)."""
    header = (
        "KIND", "KEY", "HANDLER", "LOCATION", "INJECTED", "TIMEOUT", "RETRY", "MIDDLEWARE", "EMITS",
        "TRANSPORT",
    )  # fmt: skip
    rows: list[tuple[str, ...]] = [header]
    for route in found:
        emits = ", ".join(route.emits) or "-"
        rows.append(
            (
                route.kind,
                route.key,
                route.handler,
                relative(route.location),
                ", ".join(f"{name}={value}" for name, value in route.injected.items()) or "-",
                "-" if route.timeout is None else f"{route.timeout:g} s",
                "-" if route.retry is None else route.retry.removeprefix("Retry(")[:-1].replace(", ", ","),
                ", ".join(route.middleware) or "-",
                emits if route.output_known else f"{emits} ?",
                route.transport or "-",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    if any(not route.output_known for route in found):
        lines.append(
            "?: output not fully known (no return annotation, or collected events not declared with emits=)"
        )
    return "\n".join(lines)


def _routes(args: argparse.Namespace) -> int:
    found = routes(load_dispatcher(args.app))
    if args.json:
        print(json.dumps([dataclasses.asdict(route) for route in found], indent=2))
    else:
        print(format_routes(found))
    return 0


def _graph(args: argparse.Namespace) -> int:
    flow = message_flow(load_dispatcher(args.app))
    print(flow.to_mermaid() if args.format == "mermaid" else flow.to_dot())
    return 0


# -- exec -----------------------------------------------------------------------


def find_message(dp: Dispatcher, name: str) -> tuple[Kind, object]:
    """The registered key called `name` (class name, qualified name, module.qualname, or string key)."""
    matches: dict[object, Kind] = {}
    for handler in registrations(dp):
        key = handler.key
        names = {key} if isinstance(key, str) else _class_names(key)  # type: ignore[arg-type]
        if name in names:
            matches[key] = handler.kind
    if not matches:
        known = sorted({key_name(h.key) for h in registrations(dp)})
        raise UsageError(f"No message named {name!r} is registered; known: {', '.join(known) or 'none'}")
    if len(matches) > 1:
        spelled = ", ".join(f"{k.__module__}.{k.__qualname__}" for k in matches if isinstance(k, type))
        raise UsageError(f"{name!r} names several messages ({spelled}); use the module.QualifiedName form")
    ((key, kind),) = matches.items()
    return kind, key


def _class_names(cls: type) -> set[str]:
    return {
        cls.__name__,
        cls.__qualname__,
        f"{cls.__module__}.{cls.__qualname__}",
        f"{cls.__module__}:{cls.__qualname__}",
    }


def build_message(key: object, arguments: object) -> object:
    """The message for `key` from decoded JSON, checked against the class's fields first.

    pydantic models are validated by `model_validate` (unknown fields refused unless the model's
    config sets `extra`), msgspec structs by `msgspec.convert` (unknown fields refused unless the
    struct forbids them itself), dataclasses by pybus (see `_dataclass_arguments`); any other class
    is called with the fields as keywords. A field that does not fit raises `UsageError` naming the
    class, each field and what it expects. pydantic and msgspec are only touched when `key` is one
    of their classes: they are loaded then, since the application defined it.
    """
    if isinstance(key, str):
        if arguments not in (None, {}):
            raise UsageError(f"{key!r} is a string message: it takes no arguments")
        return key
    assert isinstance(key, type)  # keys are classes or strings
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise UsageError(
            f"The arguments of {key_name(key)} must be a JSON object, not {_shown(arguments)}\n{_takes(key)}"
        )
    if _is_subclass_of(key, "pydantic.main", "BaseModel"):
        return _pydantic_message(key, arguments)
    if _is_subclass_of(key, "msgspec", "Struct"):
        return _msgspec_message(key, arguments)
    if dataclasses.is_dataclass(key):
        problems: list[tuple[str, str]] = []
        arguments = _dataclass_arguments(key, arguments, "", problems)
        if problems:
            raise _misfit(key, problems)
    try:
        return key(**arguments)
    except Exception as exc:
        raise UsageError(
            f"Cannot build {key_name(key)} from {json.dumps(arguments, default=repr)}: {exc}\n{_takes(key)}"
        ) from exc


def _is_subclass_of(key: type, module: str, name: str) -> bool:
    """Whether `key` subclasses `module.name`, without importing `module`: a class of a library
    that was never imported cannot be one of its subclasses."""
    loaded = sys.modules.get(module)
    base = getattr(loaded, name, None)
    return isinstance(base, type) and issubclass(key, base)


def _pydantic_message(key: type, arguments: dict[str, Any]) -> object:
    import pydantic  # loaded already: `key` is a pydantic model

    model = typing.cast("type[pydantic.BaseModel]", key)
    options: dict[str, Any] = {}
    # A typo in an optional field's name would be dropped silently (pydantic ignores unknown
    # fields by default): refuse unknown fields unless the model chose its own `extra`.
    # pydantic >= 2.12 takes `extra` per call; older versions keep the model's behaviour.
    takes_extra = "extra" in inspect.signature(model.model_validate).parameters
    if model.model_config.get("extra") is None and takes_extra:
        options["extra"] = "forbid"
    try:
        return model.model_validate(arguments, **options)
    except pydantic.ValidationError as exc:
        problems = [_pydantic_problem(error) for error in exc.errors(include_url=False)]
        raise _misfit(key, problems) from exc
    except Exception as exc:  # a validator that raised something else
        raise UsageError(f"Cannot build {key_name(key)} from {json.dumps(arguments)}: {exc}") from exc


def _pydantic_problem(error: Any) -> tuple[str, str]:
    where = _path(error["loc"])
    if error["type"] == "missing":
        return where, "required field missing"
    if error["type"] == "extra_forbidden":
        return where, "unknown field"
    return where, f"{error['msg']} (got {_shown(error['input'])})"


def _msgspec_message(key: type, arguments: dict[str, Any]) -> object:
    import msgspec  # loaded already: `key` is a msgspec struct

    config = getattr(key, "__struct_config__", None)
    problems: list[tuple[str, str]] = []
    # msgspec.convert ignores unknown fields unless the struct sets forbid_unknown_fields.
    if config is not None and not config.forbid_unknown_fields:
        known = {field.encode_name for field in msgspec.structs.fields(key)} | {config.tag_field}
        problems += [(name, "unknown field") for name in arguments if name not in known]
    try:
        message: object = msgspec.convert(arguments, key)
    except msgspec.ValidationError as exc:
        raise _misfit(key, [*problems, _msgspec_problem(str(exc))]) from exc
    except Exception as exc:  # __post_init__ raised something else
        raise UsageError(f"Cannot build {key_name(key)} from {json.dumps(arguments)}: {exc}") from exc
    if problems:
        raise _misfit(key, problems)
    return message


def _msgspec_problem(text: str) -> tuple[str, str]:
    """msgspec's one error ("Expected `int`, got `str` - at `$.order_id`") as (field, problem)."""
    text, _, at = text.partition(" - at `$")
    where = at.removesuffix("`").removeprefix(".")
    missing = re.fullmatch(r"Object missing required field `(.+)`", text)
    if missing:
        return f"{where}.{missing[1]}" if where else missing[1], "required field missing"
    unknown = re.fullmatch(r"Object contains unknown field `(.+)`", text)
    if unknown:
        return f"{where}.{unknown[1]}" if where else unknown[1], "unknown field"
    return where, text


def _dataclass_arguments(
    cls: type, arguments: dict[str, Any], prefix: str, problems: list[tuple[str, str]]
) -> dict[str, Any]:
    """`arguments` checked against the dataclass `cls`, its nested dataclasses built; each field that
    does not fit is added to `problems` as (field, problem).

    Names come from the constructor: a field it does not take is unknown, a parameter without a
    default is required. Types come from the resolved annotations and are checked for the types
    JSON can carry: bool, int, float (an int is accepted and made a float), str, None, list and
    list[X], dict and dict[str, X], unions (Optional), Literal, Any and nested dataclasses (built
    from their JSON object, checked the same way); and built from JSON: tuple, set and frozenset
    (from an array, items checked), an Enum (from a member's value), datetime, date and time
    (from ISO 8601 text), UUID and Decimal (see `_from_json_scalar`). Any other annotation
    (timedelta, Sequence[X], a class) is not checked: the value is passed as JSON decoded it.
    An annotation that does not resolve (a name not importable where the class is defined) is not
    checked; the others still are.
    """
    fields = _constructor_fields(cls)
    if fields is None:  # **kwargs, or no signature: the constructor judges
        return arguments
    built: dict[str, Any] = {}
    for name in arguments:
        if name not in fields:
            problems.append((prefix + name, "unknown field"))
    for name, (annotation, required) in fields.items():
        if name in arguments:
            built[name] = _fitted(arguments[name], annotation, prefix + name, problems)
        elif required:
            problems.append((prefix + name, f"required field missing (expected {_type_text(annotation)})"))
    return built


def _constructor_fields(cls: type) -> dict[str, tuple[object, bool]] | None:
    """The keywords `cls(...)` takes: name -> (resolved annotation or Any, required)."""
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return None
    # Each annotation resolved on its own: one that does not resolve leaves the others checked.
    # The constructor's own annotations first, then the class's (a hand-written __init__ that
    # annotates nothing, below `sku: str` in the class body).
    init_hints, _ = resolved_hints(getattr(cls, "__init__"))  # noqa: B009 - mypy refuses cls.__init__
    hints = {**resolved_hints(cls)[0], **init_hints}
    fields: dict[str, tuple[object, bool]] = {}
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            written = Any if parameter.annotation is inspect.Parameter.empty else parameter.annotation
            hint = hints.get(parameter.name, written)
            if isinstance(hint, dataclasses.InitVar):
                hint = hint.type
            fields[parameter.name] = (hint, parameter.default is inspect.Parameter.empty)
    return fields


def _fitted(value: Any, annotation: Any, where: str, problems: list[tuple[str, str]]) -> Any:
    """`value` as a field annotated `annotation` takes it, or `value` with a problem added."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None) or annotation is None:
        fits = value is None
    elif annotation is bool:
        fits = isinstance(value, bool)
    elif annotation is int:
        fits = isinstance(value, int) and not isinstance(value, bool)
    elif annotation is float:
        fits = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if fits else value
    elif annotation is str:
        fits = isinstance(value, str)
    elif annotation is list or origin is list:
        fits = isinstance(value, list)
        if fits and args:
            value = [_fitted(item, args[0], f"{where}[{at}]", problems) for at, item in enumerate(value)]
    elif annotation is dict or origin is dict:
        fits = isinstance(value, dict)
        if fits and len(args) == 2:
            value = {key: _fitted(item, args[1], f"{where}.{key}", problems) for key, item in value.items()}
    elif annotation in (tuple, set, frozenset) or origin in (tuple, set, frozenset):
        fits = isinstance(value, list)
        if fits:
            return _collection(value, annotation, where, problems)
    elif origin is typing.Union or origin is types.UnionType:
        members = [member for member in args if member is not type(None)] if value is not None else args
        for member in members:
            tried: list[tuple[str, str]] = []
            fitted = _fitted(value, member, where, tried)
            if not tried:
                return fitted
            if len(members) == 1 and any(inner != where for inner, _ in tried):
                problems += tried  # Optional[Item] given an object: the problems inside it are clearer
                return value
        fits = False
    elif origin is typing.Literal:
        fits = any(value == choice and type(value) is type(choice) for choice in args)
    elif isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        fits = isinstance(value, dict)
        if fits:
            before = len(problems)
            nested = _dataclass_arguments(annotation, value, f"{where}.", problems)
            if len(problems) == before:
                try:
                    return annotation(**nested)
                except Exception as exc:
                    problems.append((where, f"cannot build {key_name(annotation)}: {exc}"))
    else:
        built = _from_json_scalar(value, annotation)
        if built is None:  # not checked (Any, or a class pybus does not build): passed as decoded
            return value
        fits, value = built
    if not fits:
        problems.append((where, f"expected {_type_text(annotation)}{_hint(annotation)}, got {_shown(value)}"))
    return value


def _collection(value: list[Any], annotation: Any, where: str, problems: list[tuple[str, str]]) -> Any:
    """A tuple, set or frozenset (of the annotated items) from a JSON array."""
    built, args = typing.get_origin(annotation) or annotation, typing.get_args(annotation)
    before = len(problems)
    if built is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):  # tuple[int, str]
        if len(value) != len(args):
            problems.append(
                (where, f"expected {_type_text(annotation)} ({len(args)} items), got {_shown(value)}")
            )
            return value
        items = [
            _fitted(item, arg, f"{where}[{at}]", problems)
            for at, (item, arg) in enumerate(zip(value, args, strict=True))
        ]
    else:  # tuple[int, ...], set[int], frozenset[int], or bare
        inner = args[0] if args else Any
        items = [_fitted(item, inner, f"{where}[{at}]", problems) for at, item in enumerate(value)]
    if len(problems) > before:  # an item does not fit: that is the problem to report
        return value
    try:
        return built(items)
    except TypeError as exc:  # items a set cannot hold: set[list[int]], or a bare set of arrays
        problems.append((where, f"cannot build {_type_text(annotation)}: {exc}"))
        return value


def _from_json_scalar(value: Any, annotation: Any) -> tuple[bool, Any] | None:
    """(whether `value` fits, the value built) for the classes pybus builds from a JSON string or
    number: an Enum (from a member's value), datetime, date and time (from ISO 8601 text), UUID
    and Decimal; None for any other annotation. The standard classes are recognised without
    importing their modules (a class of a module never imported cannot be the annotation)."""
    if not isinstance(annotation, type):
        return None
    if issubclass(annotation, enum.Enum):
        if isinstance(value, bool) and not any(isinstance(member.value, bool) for member in annotation):
            return False, value  # true is not 1 here, as for an int field
        try:
            return True, annotation(value)
        except Exception:  # ValueError, or TypeError for an array
            return False, value
    built: Any = annotation  # one of the classes below, called as itself
    named = (annotation.__module__, annotation.__qualname__)
    if named in (("datetime", "datetime"), ("datetime", "date"), ("datetime", "time")):
        if not isinstance(value, str):
            return False, value
        try:
            return True, built.fromisoformat(value)
        except ValueError:
            return False, value
    if named == ("uuid", "UUID"):
        if not isinstance(value, str):
            return False, value
        try:
            return True, built(value)
        except ValueError:
            return False, value
    if named == ("decimal", "Decimal"):
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            return False, value
        try:
            # A JSON number as Python prints it (12.50 -> "12.5"), not the binary float's digits.
            number = built(repr(value) if isinstance(value, float) else value)
        except (ArithmeticError, ValueError):  # decimal.InvalidOperation is an ArithmeticError
            return False, value
        return (True, number) if number.is_finite() else (False, value)
    return None


#: What a value of these classes is written as, in a field error.
_WRITTEN_AS = {
    ("datetime", "datetime"): ' (ISO 8601, as in "2024-05-17T09:30:00+00:00")',
    ("datetime", "date"): ' (ISO 8601, as in "2024-05-17")',
    ("datetime", "time"): ' (ISO 8601, as in "09:30:00")',
    ("uuid", "UUID"): ' (as in "1b4e28ba-2fa1-11d2-883f-0016d3cca427")',
    ("decimal", "Decimal"): ' (a number, or a string as in "12.50")',
}


def _hint(annotation: Any) -> str:
    """How a value of `annotation` is written, when its name does not say it: an Enum's values,
    an ISO 8601 example; "" for the others. `X | None` gets the hint of X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        return _hint(members[0]) if len(members) == 1 else ""
    if not isinstance(annotation, type):
        return ""
    if issubclass(annotation, enum.Enum):
        values = [json.dumps(member.value, default=repr) for member in annotation]
        shown = ", ".join(values[:8]) + (f", ... ({len(values)} values)" if len(values) > 8 else "")
        return f" (one of {shown})"
    return _WRITTEN_AS.get((annotation.__module__, annotation.__qualname__), "")


def _misfit(key: type, problems: list[tuple[str, str]]) -> UsageError:
    expected = {name: annotation for name, annotation, _ in _fields_of(key) or ()}
    lines = [f"The arguments do not fit {key_name(key)}:"]
    for where, problem in problems:
        if problem == "required field missing" and where in expected:  # pydantic's and msgspec's
            problem += f" (expected {_type_text(expected[where])})"
        lines.append(f"  {where}: {problem}" if where else f"  {problem}")
    return UsageError("\n".join([*lines, _takes(key)]))


def _takes(key: type) -> str:
    """What `key` takes, and what to do: "PlaceOrder takes a JSON object with customer: str, ..."."""
    fields = _fields_of(key)
    if fields is None:
        return "Fix the JSON and run again"
    if not fields:
        return f"{key_name(key)} takes no fields: pass {{}} or nothing"
    shown = ", ".join(
        f"{name}: {_type_text(annotation)}" + ("" if required else " (optional)")
        for name, annotation, required in fields
    )
    return f"{key_name(key)} takes a JSON object with {shown}; fix the JSON and run again"


def _fields_of(key: type) -> list[tuple[str, object, bool]] | None:
    """(name in the JSON, annotation, required) for each field of `key`; None when not known."""
    if _is_subclass_of(key, "pydantic.main", "BaseModel"):
        import pydantic

        return [
            (
                info.validation_alias if isinstance(info.validation_alias, str) else info.alias or name,
                info.annotation,
                info.is_required(),
            )
            for name, info in typing.cast("type[pydantic.BaseModel]", key).model_fields.items()
        ]
    if _is_subclass_of(key, "msgspec", "Struct"):
        import msgspec

        return [(field.encode_name, field.type, field.required) for field in msgspec.structs.fields(key)]
    fields = _constructor_fields(key)
    if fields is None:
        return None
    return [(name, annotation, required) for name, (annotation, required) in fields.items()]


def _type_text(annotation: object) -> str:
    """An annotation as written in Python: `str | None`, `list[Item]`, `Literal['a', 'b']`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None) or annotation is None:
        return "None"
    if origin is typing.Annotated:
        return _type_text(args[0])
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(_type_text(member) for member in args)
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(choice) for choice in args)}]"
    if origin is not None and args:
        inner = ", ".join("..." if arg is Ellipsis else _type_text(arg) for arg in args)
        return f"{_type_text(origin)}[{inner}]"
    if isinstance(annotation, type):
        return key_name(annotation)
    return str(annotation).replace("typing.", "")


def _path(location: Sequence[object]) -> str:
    """A pydantic error location as `items[0].sku`."""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _shown(value: object) -> str:
    text = json.dumps(value, default=repr)
    return text if len(text) <= 60 else f"{text[:57]}..."


def to_json(value: object) -> str:
    """`value` as JSON: dataclasses, pydantic models and msgspec structs included; else its repr."""

    def encode(item: Any) -> Any:
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            return dataclasses.asdict(item)
        model_dump = getattr(item, "model_dump", None)
        if callable(model_dump):
            return model_dump(mode="json")
        if hasattr(item, "__struct_fields__"):
            import msgspec

            return msgspec.to_builtins(item)
        if isinstance(item, set | frozenset | tuple):
            return list(item)
        return repr(item)

    return json.dumps(value, default=encode)


async def _run(dp: Dispatcher, kind: Kind, message: object) -> object:
    async with dp:
        if kind == "command":
            return await dp.execute(message)
        if kind == "query":
            return await dp.query(message)
        await dp.publish(message)
        return None


def _exec(args: argparse.Namespace) -> int:
    dp = load_dispatcher(args.app)
    kind, key = find_message(dp, args.message)
    try:
        arguments = json.loads(args.arguments) if args.arguments is not None else None
    except json.JSONDecodeError as exc:
        hint = _takes(key) if isinstance(key, type) else f"{key!r} is a string message: pass no arguments"
        raise UsageError(
            f"The arguments for {key_name(key)} are not valid JSON ({exc}): {args.arguments}\n"
            """Write a JSON object in single quotes for the shell, as in '{"field": "value"}'\n""" + hint
        ) from exc
    message = build_message(key, arguments)
    try:
        result = asyncio.run(_run(dp, kind, message))
    except Exception as exc:
        print(f"pybus: {kind} {key_name(key)} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        for note in getattr(exc, "__notes__", []):
            print(f"  {note}", file=sys.stderr)
        return 1
    print(to_json(result))
    return 0


# -- worker ---------------------------------------------------------------------


def _worker(args: argparse.Namespace) -> int:
    _check_worker_options(args)  # before anything is imported, started or printed
    app, dp = load_app(args.app)
    if dp.transport is None:
        raise UsageError(f"{app} has no transport: build it with Dispatcher(transport=...) and dp.route(...)")
    services = [type(service).__name__ for service in dp._services]  # pybus's own CLI: it may look
    consumed = sorted(name for key, name in dp.routes.items() if _handled_here(dp, key))
    if not consumed and not services:
        raise UsageError(_nothing_to_consume(app, dp))
    if args.log_level is not None:
        handler = logging.StreamHandler()
        handler.setFormatter(_LogFormatter())
        logging.basicConfig(level=args.log_level, handlers=[handler])
    names = ", ".join(sorted(dp.routes.values())) or "none"
    also = f", services {', '.join(services)}" if services else ""
    print(
        f"pybus {__version__} worker: {app} on {type(dp.transport).__name__}, routes {names}{also}; "
        f"concurrency {args.concurrency}, prefetch {args.prefetch}, max deliveries {args.max_deliveries}",
        file=sys.stderr,
        flush=True,
    )
    try:
        unhandled = asyncio.run(
            dp.serve(
                drain_timeout=args.drain_timeout,
                concurrency=args.concurrency,
                prefetch=args.prefetch,
                max_deliveries=args.max_deliveries,
                wait=args.wait,
            )
        )
    except ImproperlyConfigured as exc:  # found at start(), e.g. two routes with one name
        raise UsageError(str(exc)) from exc
    except TransportError as exc:  # the consumer stopped on its own
        print(f"pybus: worker stopped: {exc}", file=sys.stderr)
        return 1
    if unhandled:
        print(f"pybus: stopped; {unhandled} message(s) left for other workers", file=sys.stderr)
    return 0


def _check_worker_options(args: argparse.Namespace) -> None:
    """Refuse worker options that cannot work, naming the option as it is typed."""
    for option, value in (
        ("--concurrency", args.concurrency),
        ("--prefetch", args.prefetch),
        ("--max-deliveries", args.max_deliveries),
    ):
        if value < 1:
            raise UsageError(f"{option} must be a whole number >= 1, not {value}")
    if not args.wait > 0:  # NaN too
        raise UsageError(f"--wait must be a number of seconds > 0, not {args.wait:g}")
    if not args.drain_timeout >= 0:
        raise UsageError(
            f"--drain-timeout must be a number of seconds >= 0 (inf: no limit), not {args.drain_timeout:g}"
        )


def _handled_here(dp: Dispatcher, key: object) -> bool:
    """Whether a routed `key` has a handler in `dp` (for a class, one of its bases may have it)."""
    if dp.registered_kind(key) is not None:
        return True
    return isinstance(key, type) and any(base in dp.events for base in key.__mro__)


def _nothing_to_consume(app: str, dp: Dispatcher) -> str:
    """Why a worker of `dp` would wait forever doing nothing, and what to do."""
    if not dp.routes:
        return (
            f"{app} routes no messages, so a worker would read nothing: route each message the "
            "worker handles with dp.route(Key) (its handlers registered in this dispatcher as usual), "
            "or run a service beside it with dp.add_service(...); see the transports guide "
            "(docs/transports.md)"
        )
    names = ", ".join(sorted(dp.routes.values()))
    return (
        f"{app} routes {names}, but has no handler for any of them, so a worker would read nothing: "
        "register the handlers of the messages it should consume in this dispatcher (a process that "
        "only sends them needs no worker)"
    )


class _LogFormatter(logging.Formatter):
    """`time LEVEL logger: message`, without the logger's name when the message starts with it
    (pybus's own records read "pybus: ..." by themselves)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._named = logging.Formatter("%(asctime)s %(levelname)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message
        if message.startswith(record.name) and message[len(record.name) : len(record.name) + 1] in (":", " "):
            return self._named.formatMessage(record)
        return super().formatMessage(record)


# -- dead letters -----------------------------------------------------------------


def _dlq(args: argparse.Namespace) -> int:
    transport = load_dispatcher(args.app).transport
    try:
        from pybus.redis_dead_letters import RedisDeadLetters
        from pybus.redis_streams import RedisTransport
    except ImportError as exc:  # without pybus-cqrs[redis], no transport here keeps dead letters
        raise UsageError(f"{args.app} has no transport that keeps dead letters ({exc})") from exc
    if not isinstance(transport, RedisTransport):
        raise UsageError(f"{args.app} has no transport that keeps dead letters (RedisTransport does)")
    return asyncio.run(_dlq_run(transport, RedisDeadLetters.of(transport), args))


async def _dlq_run(transport: RedisTransport, dead: RedisDeadLetters, args: argparse.Namespace) -> int:
    try:
        if args.action == "list":
            for letter in await dead.letters(count=args.count):
                envelope = letter.envelope
                attempts, message_id = f"attempts={envelope.attempt}", f"id={envelope.message_id}"
                print("  ".join((letter.id, envelope.name, attempts, message_id, letter.error)))
        elif args.action == "requeue":
            for dead_id in args.ids:
                print(f"{dead_id} -> {await dead.requeue(dead_id)}")
        else:
            print(f"purged {await dead.purge()} dead letter(s)")
    except PyBusError as exc:
        raise UsageError(str(exc)) from exc
    finally:
        try:
            await dead.aclose()
        finally:
            await transport.aclose()
    return 0


# -- entry point ----------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="pybus", description="Inspect and drive a pybus Dispatcher.")
    root.add_argument("--version", action="version", version=f"pybus {__version__}")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    app_help = "module:attribute of a Dispatcher, or of a callable returning one"

    listing = commands.add_parser("routes", help="list every registration")
    listing.add_argument("app", help=app_help)
    listing.add_argument("--json", action="store_true", help="print JSON for machines")
    listing.set_defaults(run=_routes)

    graph = commands.add_parser("graph", help="draw the message flow")
    graph.add_argument("app", help=app_help)
    graph.add_argument("--format", choices=("mermaid", "dot"), default="mermaid")
    graph.set_defaults(run=_graph)

    work = commands.add_parser("worker", help="consume the app's routed messages until SIGTERM or SIGINT")
    work.add_argument("app", help=app_help)
    work.add_argument("--concurrency", type=int, default=4, help="messages handled at a time (default 4)")
    work.add_argument(
        "--prefetch",
        type=int,
        default=100,
        help="messages read ahead and held besides those handled; reads take up to this many (default 100)",
    )
    work.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds to finish handlings in flight on a signal"
    )
    work.add_argument(
        "--max-deliveries",
        type=int,
        default=5,
        help="failed deliveries after which a message is dead-lettered (default 5)",
    )
    work.add_argument(
        "--wait", type=float, default=1.0, help="seconds a read waits for a message (default 1.0)"
    )
    work.add_argument(
        "--log-level",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        help="log records of this level and above to stderr (default: logging is left as the app set it)",
    )
    work.set_defaults(run=_worker)

    dlq = commands.add_parser("dlq", help="list, re-queue or purge dead-lettered messages")
    dlq.add_argument("app", help=app_help)
    actions = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")
    listed = actions.add_parser("list", help="the oldest dead letters")
    listed.add_argument("--count", type=int, default=100)
    requeued = actions.add_parser("requeue", help="send dead letters again (attempts start over)")
    requeued.add_argument("ids", nargs="+", help="ids printed by `pybus dlq APP list`")
    actions.add_parser("purge", help="delete every dead letter")
    dlq.set_defaults(run=_dlq)

    run = commands.add_parser("exec", help="build a message from JSON and execute, query or publish it")
    run.add_argument("app", help=app_help)
    run.add_argument("message", help="message class name (or module.QualifiedName, or a string key)")
    run.add_argument("arguments", nargs="?", help="the message's fields as a JSON object")
    run.set_defaults(run=_exec)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except UsageError as exc:
        _fail(str(exc))
    return code


def _fail(text: str) -> NoReturn:
    print(f"pybus: error: {text}", file=sys.stderr)
    raise SystemExit(2)
