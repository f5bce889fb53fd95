"""Handler inspection at registration, and the call plans compiled at start.

`inspect_handler` runs once per `bind`: it decides how the handler is called
(which parameter receives the message, which values are bound to the others)
and raises `HandlerSignatureError` for anything that could not work. `compile`
turns the result into a `CallPlan` whose `invoke` is the cheapest callable that
does the job; for a plain async function with the message as its only
argument, `invoke` is the function itself.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import FrozenInstanceError
from types import MappingProxyType, SimpleNamespace, UnionType
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    Final,
    NoReturn,
    Protocol,
    TypeGuard,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

from pybus.context import HandlingContext, current_context
from pybus.errors import HandlerSignatureError, ImproperlyConfigured, Kind, key_name
from pybus.factory_plans import factory_invoke, in_order
from pybus.providers import Factory, Provider, Resolver, Singleton
from pybus.unit_of_work import AlreadyHandled, UnitOfWork, makes_units, units_in

if TYPE_CHECKING:
    from pybus.middleware import Middleware
    from pybus.retry import Retry

_MISSING: Final = object()
_EMPTY = inspect.Parameter.empty
_POSITIONAL_ONLY = inspect.Parameter.POSITIONAL_ONLY
_KEYWORD_ONLY = inspect.Parameter.KEYWORD_ONLY
_VAR_POSITIONAL = inspect.Parameter.VAR_POSITIONAL
_VAR_KEYWORD = inspect.Parameter.VAR_KEYWORD


class HandlerProtocol(Protocol):
    """A class handler that collects follow-up events while it handles a message.

    After `handle` returns, the dispatcher calls `dump_events()` and publishes
    what it returns, in order, before the handler's own return value. Each method
    may be sync or async. A class handler is instantiated for every handling, so
    collected events never leak between handlings.
    """

    def handle(self, message: Any, /) -> Any:
        """Handle the message; may call `add_event` any number of times."""

    def add_event(self, event: Any, /) -> Any:
        """Remember an event to publish once `handle` has succeeded."""

    def dump_events(self) -> Any:
        """Return the events added so far (an iterable, or an awaitable of one)."""


class Handler:
    """A registration, as inspected by `bind`: frozen (assigning to it raises
    `dataclasses.FrozenInstanceError`), equal only to itself.

    `target` is what was registered (function, class or instance); `bound` are
    the keyword values given at registration, which go to the class's `__init__`
    for a class and to the call otherwise. `message_param` is the parameter that
    receives the message (`None`: the handler takes no message), passed by
    keyword when `message_by_keyword` is true.
    """

    # A plain class rather than a dataclass: `@dataclass` compiles each method it makes
    # when the module is imported, a cost every `import pybus` paid (docs/benchmarks.md).
    __slots__ = (  # noqa: RUF023 - in the order of the fields, which __repr__ prints them in
        "kind",
        "key",
        "target",
        "name",
        "location",
        "message_param",
        "message_by_keyword",
        "bound",
        "is_class",
        "method",
        "is_async",
        "collects_events",
        "timeout",
        "emits",
        "middleware",
        "retry",
        "context_params",
    )

    kind: Kind
    key: object
    target: object
    name: str
    location: str
    message_param: str | None
    message_by_keyword: bool
    bound: Mapping[str, object]
    is_class: bool
    method: str | None
    is_async: bool
    collects_events: bool
    timeout: float | None
    emits: tuple[object, ...]
    #: The registration's own middleware (checked by the router), outermost first.
    middleware: tuple[Middleware, ...]
    #: The registration's own retry policy (None: the router's or the dispatcher's).
    retry: Retry | None
    #: Parameters annotated `HandlingContext`: each call receives the current one.
    context_params: tuple[str, ...]

    def __init__(
        self,
        kind: Kind,
        key: object,
        target: object,
        name: str,
        location: str,
        message_param: str | None,
        message_by_keyword: bool,
        bound: Mapping[str, object],
        is_class: bool,
        method: str | None,
        is_async: bool,
        collects_events: bool,
        timeout: float | None = None,
        emits: tuple[object, ...] = (),
        middleware: tuple[Middleware, ...] = (),
        retry: Retry | None = None,
        context_params: tuple[str, ...] = (),
    ) -> None:
        # Through object.__setattr__, since the class's own refuses (as a frozen dataclass's does).
        set_field = object.__setattr__
        set_field(self, "kind", kind)
        set_field(self, "key", key)
        set_field(self, "target", target)
        set_field(self, "name", name)
        set_field(self, "location", location)
        set_field(self, "message_param", message_param)
        set_field(self, "message_by_keyword", message_by_keyword)
        set_field(self, "bound", bound)
        set_field(self, "is_class", is_class)
        set_field(self, "method", method)
        set_field(self, "is_async", is_async)
        set_field(self, "collects_events", collects_events)
        set_field(self, "timeout", timeout)
        set_field(self, "emits", emits)
        set_field(self, "middleware", middleware)
        set_field(self, "retry", retry)
        set_field(self, "context_params", context_params)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __repr__(self) -> str:
        fields = ", ".join(f"{field}={getattr(self, field)!r}" for field in self.__slots__)
        return f"{type(self).__qualname__}({fields})"

    def __reduce__(self) -> tuple[type[Handler], tuple[object, ...]]:
        # copy would restore the fields with setattr, which refuses.
        return type(self), tuple(getattr(self, field) for field in self.__slots__)

    def __str__(self) -> str:
        return f"{self.name} ({self.location})"

    @property
    def qualified_name(self) -> str:
        """`module.QualifiedName` of what was registered."""
        target = self.target
        module = getattr(target, "__module__", None) or type(target).__module__
        return f"{module}.{self.name}"


def route_record(kind: Kind, target: Callable[..., Any], description: str, key: object = None) -> Handler:
    """The registration-like record of a transport route (of `key`), for error notes,
    observers and the handling context of the hand-off to the transport."""
    return Handler(
        kind=kind,
        key=key,
        target=target,
        name=description,
        location="<transport>",
        message_param="message",
        message_by_keyword=False,
        bound=MappingProxyType({}),
        is_class=False,
        method=None,
        is_async=True,
        collects_events=False,
    )


class CallPlan:
    """How the engines call one handler.

    `invoke(message)` returns the result, or an awaitable of it when `is_async`.
    When `collect` is set (a `HandlerProtocol` class or instance), the engines
    call `await collect(message, followups)` instead, which appends the
    collected events to `followups` and returns the handler's result. `retry`
    is the policy the engines apply when the call fails (tracked dispatchers only).
    `direct` says that `invoke(message)` does nothing but return a coroutine, and that
    the coroutine's result is always None (proven at start, `pybus.returns`): `execute`
    may then hand it to its caller as it is.

    A plan never changes once made (its attributes are `Final` to the type checkers):
    `with_retry` makes another. Equal only to itself.
    """

    # A plain class rather than a dataclass, for the cost of `import pybus` (see `Handler`).
    __slots__ = ("collect", "direct", "handler", "invoke", "is_async", "retry")

    handler: Final[Handler]
    invoke: Final[Callable[[Any], Any]]
    is_async: Final[bool]
    collect: Final[Callable[[Any, list[Any]], Awaitable[Any]] | None]
    retry: Final[Retry | None]
    direct: Final[bool]

    def __init__(
        self,
        handler: Handler,
        invoke: Callable[[Any], Any],
        is_async: bool,
        collect: Callable[[Any, list[Any]], Awaitable[Any]] | None,
        retry: Retry | None = None,
        direct: bool = False,
    ) -> None:
        self.handler = handler
        self.invoke = invoke
        self.is_async = is_async
        self.collect = collect
        self.retry = retry
        self.direct = direct

    def with_retry(self, retry: Retry | None) -> CallPlan:
        """This plan with `retry` as its retry policy."""
        return CallPlan(self.handler, self.invoke, self.is_async, self.collect, retry, self.direct)


def callable_name(target: object) -> str:
    """A readable name for a function, class, partial or instance."""
    if isinstance(target, functools.partial):
        return f"partial({callable_name(target.func)})"
    name = getattr(target, "__qualname__", None)
    if isinstance(name, str):
        # A function defined inside another is named from there on; its location tells the rest.
        return name.rpartition("<locals>.")[2]
    return f"{type(target).__qualname__} instance"


def _location(func: object) -> str:
    func = inspect.unwrap(func.func if isinstance(func, functools.partial) else func)  # type: ignore[arg-type]
    code = getattr(getattr(func, "__func__", func), "__code__", None)
    if code is None:
        return "<unknown>"
    return f"{code.co_filename}:{code.co_firstlineno}"


def _signature(kind: Kind, key: object, name: str, func: Callable[..., Any]) -> inspect.Signature:
    try:
        return inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise HandlerSignatureError(
            kind, key, name, f"its signature cannot be inspected ({exc}); wrap it in a function"
        ) from exc


def _method_params(cls: type, method: str, sig: inspect.Signature) -> list[inspect.Parameter]:
    """The method's parameters without `self` (none to drop for static and class methods)."""
    params = list(sig.parameters.values())
    raw = inspect.getattr_static(cls, method)
    if isinstance(raw, staticmethod | classmethod):
        return params
    return params[1:]


def _find_method(target: object) -> str | None:
    handle = getattr(target, "handle", None)
    if callable(handle):
        return "handle"
    cls = target if isinstance(target, type) else type(target)
    if any("__call__" in vars(c) for c in cls.__mro__[:-1]):
        return "__call__"
    return None


def inspect_handler(
    kind: Kind,
    key: object,
    target: object,
    argname: str | None,
    bound: Mapping[str, object],
    *,
    check_init: bool = True,
    timeout: float | None = None,
    emits: Iterable[object] = (),
    middleware: tuple[Middleware, ...] = (),
    retry: Retry | None = None,
) -> Handler:
    """Check that `target` can handle `key` as registered, and describe how to call it.

    Raises `ImproperlyConfigured` for something that is not a handler and
    `HandlerSignatureError` for parameters the registration cannot satisfy.
    `check_init=False` leaves a class's `__init__` to a handler factory.
    """
    name = callable_name(target)
    is_class = isinstance(target, type)
    method: str | None = None
    if is_class or not (inspect.isroutine(target) or isinstance(target, functools.partial)):
        method = _find_method(target)
        if method is None:
            raise ImproperlyConfigured(
                f"{name} cannot handle {kind} {key_name(key)}: a handler is an async or sync "
                "function, a class with a handle() or __call__() method, or an instance "
                "of one"
            )
    func: Callable[..., Any] = getattr(target, method) if method else target  # type: ignore[assignment]
    _refuse_generator(kind, key, f"{name}.{method}" if is_class else name, func)
    sig = _signature(kind, key, name, func)
    cls = target if isinstance(target, type) else None
    if cls is not None:
        assert method is not None  # a class always has a method here
        params = _method_params(cls, method, sig)
        call_bound: Mapping[str, object] = {}
    else:
        params = list(sig.parameters.values())
        call_bound = bound
    where = f"{name}.{method}" if is_class else name
    context_params, unresolved = _context_params(kind, key, where, func, params, argname, call_bound)
    rest = [param for param in params if param.name not in context_params]
    message_param, by_keyword = _message_param(kind, key, where, rest, argname, call_bound)
    if message_param is not None and not by_keyword and rest and params[0] is not rest[0]:
        by_keyword = True  # a HandlingContext parameter comes first: the message goes by name
    try:
        _check_rest(kind, key, where, rest, message_param, call_bound, is_class)
    except HandlerSignatureError as exc:
        unresolved_params = {name: why for name, why in unresolved.items() if name != "return"}
        if unresolved_params:
            exc.add_note(
                "the annotations of "
                + ", ".join(f"{name!r} ({why})" for name, why in unresolved_params.items())
                + " could not be resolved: a parameter annotated with a provided type (or "
                "HandlingContext) is recognised by its annotation, so import that type where the "
                "handler is defined, at module level (not under `if TYPE_CHECKING:`)"
            )
        raise
    if cls is not None and check_init:
        _check_init(kind, key, name, cls, bound)
    collects = method is not None and callable(getattr(target, "dump_events", None))
    if method is not None and not collects and callable(getattr(target, "add_event", None)):
        raise HandlerSignatureError(
            kind, key, name,
            "it has add_event() but no dump_events(), so the events it adds would be lost: add a "
            "dump_events() that returns them (and forgets them), or subclass pybus.EventCollector",
        )  # fmt: skip
    return Handler(
        kind=kind,
        key=key,
        target=target,
        name=name,
        location=_location(func),
        message_param=message_param,
        message_by_keyword=by_keyword,
        bound=MappingProxyType(dict(bound)),
        is_class=is_class,
        method=method,
        is_async=inspect.iscoroutinefunction(func),
        collects_events=collects,
        timeout=_check_timeout(kind, key, name, timeout),
        emits=_check_emits(kind, key, name, emits),
        middleware=middleware,
        retry=retry,
        context_params=context_params,
    )


def _context_params(
    kind: Kind,
    key: object,
    where: str,
    func: Callable[..., Any],
    params: list[inspect.Parameter],
    argname: str | None,
    bound: Mapping[str, object],
) -> tuple[tuple[str, ...], dict[str, str]]:
    """The parameters annotated `HandlingContext` (string annotations resolved when they
    can be), and why the annotations that could not be resolved could not, by name."""
    hints, unresolved = resolved_hints(func)
    found: list[str] = []
    for param in params:
        annotation = hints.get(param.name, param.annotation)
        if _is_context(annotation):
            if param.name in bound or param.name == argname:
                raise HandlerSignatureError(
                    kind, key, where,
                    f"parameter {param.name!r} is annotated HandlingContext, which pybus passes to "
                    f"each call, but it is also {'bound' if param.name in bound else 'named by argname='}; "
                    "drop one of them",
                )  # fmt: skip
            if param.kind in (_POSITIONAL_ONLY, _VAR_POSITIONAL, _VAR_KEYWORD):
                raise HandlerSignatureError(
                    kind, key, where,
                    f"parameter {param.name!r} is annotated HandlingContext but cannot be passed by "
                    "keyword; make it a normal or keyword-only parameter",
                )  # fmt: skip
            found.append(param.name)
    return tuple(found), unresolved


_CONTEXT_NAMES = frozenset({"HandlingContext", "pybus.HandlingContext", "pybus.context.HandlingContext"})


def resolved_hints(
    func: Callable[..., Any], *, extras: bool = False
) -> tuple[dict[str, Any], dict[str, str]]:
    """`func`'s resolved annotations, and for those that do not resolve (say, a return type
    imported under `if TYPE_CHECKING:`), why; each annotation is resolved on its own, so one
    that does not resolve leaves the others' as they are."""
    plain = func.func if isinstance(func, functools.partial) else func
    try:
        return get_type_hints(plain, include_extras=extras), {}
    except Exception:  # one of them does not resolve: each on its own below
        pass
    annotations = getattr(plain, "__annotations__", None)
    if not isinstance(annotations, Mapping):
        return {}, {}
    namespace = getattr(inspect.unwrap(getattr(plain, "__func__", plain)), "__globals__", {})
    hints: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for name, annotation in annotations.items():
        holder = SimpleNamespace(__annotations__={name: annotation})
        try:
            hints[name] = get_type_hints(holder, globalns=namespace, include_extras=extras)[name]
        except Exception as exc:
            failed[name] = f"{type(exc).__name__}: {exc}"
    return hints, failed


def _is_context(annotation: object) -> bool:
    """`HandlingContext`, or `HandlingContext | None` (as a class or as text)."""
    if isinstance(annotation, str):
        names = {part.strip() for part in annotation.split("|")}
        return bool(names & _CONTEXT_NAMES) and names <= _CONTEXT_NAMES | {"None"}
    if annotation is HandlingContext:
        return True
    args = get_args(annotation)
    return HandlingContext in args and all(arg in (HandlingContext, type(None)) for arg in args)


def by_type(
    target: object, argname: str | None, provided: Mapping[object, object], bound: Mapping[str, object]
) -> dict[str, object]:
    """The values to bind, by name, to the parameters of `target` that are annotated with a
    type in `provided` (injection by type) or `Annotated[T, provider]`, and not already
    bound. The parameters are those bound values go to: a class's `__init__`, else the
    handler's call (its function, or an instance's handle/__call__)."""
    is_class = isinstance(target, type)
    if is_class:
        func: Any = getattr(target, "__init__", None)
    elif inspect.isroutine(target) or isinstance(target, functools.partial):
        func = target
    else:
        method = _find_method(target)
        func = getattr(target, method) if method else None
    if func is None:
        return {}
    hints, _ = resolved_hints(func, extras=True)
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):  # no signature: nothing to find
        return {}
    found: dict[str, object] = {}
    for name, param in params.items():
        if name in bound or name == argname or name == "self" or name not in hints:
            continue
        if param.kind in (_VAR_POSITIONAL, _VAR_KEYWORD, _POSITIONAL_ONLY):
            continue
        hint = hints[name]
        if get_origin(hint) is Annotated:
            providers = [item for item in get_args(hint)[1:] if isinstance(item, Provider)]
            if providers:
                found[name] = providers[-1]
                continue
            hint = get_args(hint)[0]
        value = provided_for(hint, provided)
        if value is not _MISSING:
            found[name] = value
    return found


def provided_for(hint: object, provided: Mapping[object, object]) -> object:
    """What `provided` gives a parameter annotated `hint` (`_MISSING`: nothing): the type
    itself (`Repo`, or a generic one such as `Repo[User]`), else the generic's class
    (`Repo` serves `Repo[User]`), and the same for `T | None` (`Optional[T]`)."""
    args = get_args(hint)
    if type(None) in args and get_origin(hint) in (Union, UnionType):
        others = [arg for arg in args if arg is not type(None)]
        if len(others) != 1:
            return _MISSING
        hint = others[0]
    try:
        if hint in provided:
            return provided[hint]
    except TypeError:  # an annotation that cannot be a dict key
        return _MISSING
    origin = get_origin(hint)
    if isinstance(origin, type) and origin in provided:
        return provided[origin]
    return _MISSING


def _refuse_generator(kind: Kind, key: object, name: str, func: Callable[..., Any]) -> None:
    plain = inspect.unwrap(func.func if isinstance(func, functools.partial) else func)
    if inspect.isasyncgenfunction(plain) or inspect.isgeneratorfunction(plain):
        what = "an async generator" if inspect.isasyncgenfunction(plain) else "a generator"
        raise HandlerSignatureError(
            kind, key, name,
            f"it is {what} function (it uses yield), so calling it would run none of its code; "
            "a handler returns its result: replace yield with return (to publish several "
            "follow-up events, collect them with add_event on a class handler)",
        )  # fmt: skip


def _check_emits(kind: Kind, key: object, name: str, emits: Iterable[object]) -> tuple[object, ...]:
    declared = tuple(emits)
    for message_type in declared:
        if not isinstance(message_type, type | str):
            raise HandlerSignatureError(
                kind, key, name,
                f"emits= lists message classes or strings, not {message_type!r}",
            )  # fmt: skip
    return declared


def _check_timeout(kind: Kind, key: object, name: str, timeout: object) -> float | None:
    if timeout is None:
        return None
    if not positive_seconds(timeout):
        raise HandlerSignatureError(
            kind, key, name, f"timeout={timeout!r} is not a number of seconds > 0; pass e.g. timeout=2.0"
        )
    return float(timeout)


def _names(params: list[inspect.Parameter]) -> str:
    return ", ".join(repr(p.name) for p in params) or "none"


def _message_param(
    kind: Kind,
    key: object,
    where: str,
    params: list[inspect.Parameter],
    argname: str | None,
    bound: Mapping[str, object],
) -> tuple[str | None, bool]:
    takes_any_keyword = any(p.kind is _VAR_KEYWORD for p in params)
    if argname is not None:
        if argname in bound:
            raise HandlerSignatureError(
                kind, key, where,
                f"argname={argname!r} names the message parameter, but a value is also "
                f"bound to {argname!r}; drop one of them",
            )  # fmt: skip
        named = [p for p in params if p.name == argname and p.kind not in (_VAR_POSITIONAL, _VAR_KEYWORD)]
        if not named:
            if takes_any_keyword:
                return argname, True
            raise HandlerSignatureError(
                kind, key, where,
                f"argname={argname!r} names no parameter; its parameters are {_names(params)}",
            )  # fmt: skip
        param = named[0]
        if param is params[0] and param.kind is not _KEYWORD_ONLY:
            return argname, False
        if param.kind is _POSITIONAL_ONLY:
            raise HandlerSignatureError(
                kind, key, where,
                f"argname={argname!r} names a positional-only parameter that is not the "
                "first; make it the first parameter or let it be passed by keyword",
            )  # fmt: skip
        return argname, True
    if not params or params[0].kind in (_KEYWORD_ONLY, _VAR_KEYWORD):
        return None, False
    first = params[0]
    if first.name in bound:
        raise HandlerSignatureError(
            kind, key, where,
            f"its first parameter {first.name!r} receives the message, but a value is "
            f"bound to it; put the message parameter first, or name it with argname=",
        )  # fmt: skip
    return first.name, False


def _check_rest(
    kind: Kind,
    key: object,
    where: str,
    params: list[inspect.Parameter],
    message_param: str | None,
    bound: Mapping[str, object],
    is_class: bool,
) -> None:
    for param in params:
        if param.name == message_param or param.kind in (_VAR_POSITIONAL, _VAR_KEYWORD):
            continue
        if param.default is not _EMPTY:
            continue
        if param.kind is _POSITIONAL_ONLY:
            raise HandlerSignatureError(
                kind, key, where,
                f"parameter {param.name!r} is positional-only and has no default; pybus "
                "passes only the message by position: give it a default or make it a "
                "normal parameter",
            )  # fmt: skip
        if param.name in bound:
            continue
        if is_class:
            reason = (
                f"parameter {param.name!r} has no default; values bound at registration "
                "go to __init__, so take it there or give it a default"
            )
        else:
            reason = (
                f"parameter {param.name!r} has no value; bind one at registration "
                f"(register(..., {param.name}=...)), provide one for its type before registering "
                "(dp.provide(Type, provider)), or give it a default"
            )
        if message_param is None and param.kind is _KEYWORD_ONLY:
            reason += (
                f"; if {param.name!r} is meant to receive the message, name it with "
                f"argname={param.name!r} (a keyword-only parameter is never given the message by position)"
            )
        raise HandlerSignatureError(kind, key, where, reason)
    if not is_class:
        _check_bound_accepted(kind, key, where, params, bound)


def _check_bound_accepted(
    kind: Kind,
    key: object,
    where: str,
    params: list[inspect.Parameter],
    bound: Mapping[str, object],
) -> None:
    if any(p.kind is _VAR_KEYWORD for p in params):
        return
    accepted = {p.name for p in params if p.kind not in (_POSITIONAL_ONLY, _VAR_POSITIONAL)}
    for name in bound:
        if name not in accepted:
            raise HandlerSignatureError(
                kind, key, where,
                f"a value is bound to {name!r}, which it does not take by keyword; "
                f"its parameters are {_names(params)}",
            )  # fmt: skip


def _check_init(kind: Kind, key: object, name: str, cls: type, bound: Mapping[str, object]) -> None:
    params = list(_signature(kind, key, name, cls).parameters.values())
    hints, _ = resolved_hints(getattr(cls, "__init__"))  # noqa: B009 - mypy refuses cls.__init__
    for param in params:
        if param.default is _EMPTY and _is_context(hints.get(param.name, param.annotation)):
            raise HandlerSignatureError(
                kind, key, f"{name}.__init__",
                f"parameter {param.name!r} is annotated HandlingContext, which pybus passes to the "
                "handling method, not to __init__: take it as a parameter of handle()",
            )  # fmt: skip
    _check_rest(kind, key, f"{name}.__init__", params, None, bound, is_class=False)


def compile_handler(
    handler: Handler,
    resolver: Resolver,
    handler_factory: Callable[..., Any] | None = None,
    timeout: float | None = None,
    send: Callable[..., Awaitable[None]] | None = None,
) -> CallPlan:
    """Build the call plan for one registration (done once, at `start()`).

    Plain registrations call the handler directly. Providers, a `handler_factory`
    or collected events add a per-handling scope whose teardowns run after the
    handler, whether it succeeded or not. A `timeout` (seconds) cancels the
    handling past it, which then fails with `TimeoutError`.
    """
    plan = _compile(handler, resolver, handler_factory, send)
    return plan if timeout is None else _timed(plan, timeout)


async def within(seconds: float, awaitable: Awaitable[Any], note: str) -> Any:
    """Await `awaitable`, cancelling it past `seconds`; the `TimeoutError` gets `note`
    only when this timeout expired (not when the awaited code raised its own)."""
    timeout = asyncio.timeout(seconds)
    try:
        async with timeout:
            return await awaitable
    except TimeoutError as exc:
        if timeout.expired():
            exc.add_note(note)
        raise


def positive_seconds(value: object) -> TypeGuard[float]:
    """True for a number of seconds > 0 (booleans are not numbers here)."""
    return not isinstance(value, bool) and isinstance(value, int | float) and value > 0


def awaiting(plan: CallPlan) -> Callable[[Any], Awaitable[Any]]:
    """`plan.invoke` as an async function (itself when the plan is async)."""
    invoke = plan.invoke
    if plan.is_async:
        return invoke

    async def call(message: Any) -> Any:
        result = invoke(message)
        return await result if inspect.isawaitable(result) else result

    return call


def _timed(plan: CallPlan, seconds: float) -> CallPlan:
    invoke, collect, handler = awaiting(plan), plan.collect, plan.handler
    note = f"{handler} did not finish within its timeout of {seconds} s"

    async def timed_invoke(message: Any) -> Any:
        return await within(seconds, invoke(message), note)

    async def timed_collect(message: Any, followups: list[Any]) -> Any:
        assert collect is not None  # only used when the plan collects
        return await within(seconds, collect(message, followups), note)

    return CallPlan(
        handler,
        timed_invoke,
        True,
        timed_collect if collect is not None else None,
        direct=plan.direct and collect is None,
    )


#: Whether `start()` compiles the written-out plans (handed-over coroutines, collectors
#: and Factories without an exit stack). Only tests turn it off, to compare them with
#: the general plans (tests/test_fast_paths.py).
WRITTEN_OUT = True


def _compile(
    handler: Handler,
    resolver: Resolver,
    handler_factory: Callable[..., Any] | None,
    send: Callable[..., Awaitable[None]] | None = None,
) -> CallPlan:
    target: Any = handler.target
    method = handler.method
    bound = dict(handler.bound)
    call = _caller(handler.message_param, handler.message_by_keyword, handler.context_params)
    has_providers = any(isinstance(value, Provider) for value in bound.values())
    # A plan is `direct` (CallPlan) when its handler provably returns None and its invoke
    # does nothing before the coroutine it returns is awaited: the handler itself, or it
    # with values fixed at registration, or a coroutine function of pybus's. Not a class
    # handler: the method a handling calls is looked up on an instance made then, which
    # may not be the method proven at start (set in __init__, patched on the class).
    from pybus.returns import returns_none  # at start only: it imports ast

    none = (
        WRITTEN_OUT
        and handler.is_async
        and not handler.is_class
        and returns_none(getattr(target, method) if method else target)
    )
    if WRITTEN_OUT and handler.collects_events and not has_providers and handler_factory is None:
        return _collecting_plan(handler, call, bound)
    if handler.collects_events or (handler.is_class and (has_providers or handler_factory is not None)):
        # A handler_factory may make an instance of another class than the one proven.
        none = none and handler_factory is None
        return _scoped_plan(handler, resolver, handler_factory, call, send, none)
    if handler.is_class:

        def invoke(message: Any) -> Any:
            return call(getattr(target(**bound), method), message, {})  # type: ignore[arg-type]

        return CallPlan(handler, invoke, handler.is_async, None)
    func = getattr(target, method) if method else target
    positional = (
        handler.message_param is not None and not handler.message_by_keyword and not handler.context_params
    )
    if not has_providers and handler.context_params:
        # Not direct: it reads the handling context when called.
        return CallPlan(handler, _context_invoke(handler, func, call, bound), handler.is_async, None)
    if not has_providers:
        if positional:
            # The common case costs nothing: the function itself, a call passing the bound
            # values by position, or a C-level partial passing them by keyword.
            return CallPlan(handler, _bound_invoke(func, bound), handler.is_async, None, direct=none)
        return CallPlan(
            handler, lambda message: call(func, message, bound), handler.is_async, None, direct=none
        )
    scoped = _scoped_plan(handler, resolver, None, call, send, none)
    singletons = {name: value.identity for name, value in bound.items() if isinstance(value, Singleton)}
    if len(singletons) < sum(isinstance(value, Provider) for value in bound.values()):
        # A Factory: every handling makes its own value. Written out when it can be.
        written = None
        if WRITTEN_OUT and positional and scoped.collect is None:
            written = factory_invoke(
                func,
                bound,
                resolver,
                scoped.invoke,
                lambda unit: _attach([unit], handler, None),
                handler.is_async,
            )
        if written is None:
            return scoped
        made, returns_handlers = written
        is_async = handler.is_async if returns_handlers else True
        # A plain call makes the Factories' values when called: not for execute to hand over.
        return CallPlan(handler, made, is_async, None, direct=none and not returns_handlers)
    # For an async handler both paths return a coroutine, so the plan stays async
    # (and eligible for the engines' fast paths); a sync handler's result is
    # awaited only when it is the coroutine of the first, resolving handling.
    with_singletons = _singleton_invoke(func, positional, call, bound, singletons, resolver, scoped.invoke)
    # Direct only as a coroutine function: a plain call reads the Singletons (or an
    # override of them) when called, not when awaited.
    handed = none and inspect.iscoroutinefunction(with_singletons)
    return CallPlan(handler, with_singletons, handler.is_async, None, direct=handed)


def _bound_invoke(func: Callable[..., Any], bound: dict[str, object]) -> Callable[[Any], Any]:
    """`func(message, **bound)` at the least cost."""
    if not bound:
        return func
    if not in_order(func, list(bound)):
        return functools.partial(func, **bound)
    values = tuple(bound.values())
    if len(values) == 1:
        (value,) = values
        return lambda message: func(message, value)
    return lambda message: func(message, *values)


def _context_invoke(
    handler: Handler, func: Callable[..., Any], call: Caller, bound: dict[str, object]
) -> Callable[[Any], Any]:
    """A call that passes the current `HandlingContext` to the parameters that take it."""
    if handler.message_param is not None and not handler.message_by_keyword and not bound:
        if len(handler.context_params) == 1:
            (name,) = handler.context_params

            def invoke_with_context(message: Any) -> Any:
                return func(message, **{name: current_context()})

            return invoke_with_context
    return lambda message: call(func, message, bound)


def _singleton_invoke(
    func: Callable[..., Any],
    positional: bool,
    call: Caller,
    bound: dict[str, object],
    singletons: dict[str, object],
    resolver: Resolver,
    resolve_first: Callable[[Any], Any],
) -> Callable[[Any], Any]:
    """Once its Singletons exist, a handling costs a dict lookup per Singleton.

    Until then (or while an override replaces one with a provider), the handling
    goes through `resolve_first`, which creates them. The result is the handler's
    coroutine or its sync result, which the engines tell apart.
    """
    values = resolver.singletons
    plain = {name: value for name, value in bound.items() if name not in singletons}
    if len(singletons) == 1 and not plain and positional:
        ((name, identity),) = singletons.items()

        # The call bound to the Singleton's current value, rebuilt when the value
        # changes (first resolution, an override, a stop): a C-level partial call.
        current: Any = _MISSING
        bound_call: Callable[[Any], Any] = func

        def invoke_only(message: Any) -> Any:
            nonlocal current, bound_call
            value = values.get(identity, _MISSING)
            if value is _MISSING:
                return resolve_first(message)
            if value is not current:
                current, bound_call = value, functools.partial(func, **{name: value})
            return bound_call(message)

        def invoke_second(message: Any) -> Any:
            """`invoke_only` for a handler whose Singleton is its second positional parameter."""
            value = values.get(identity, _MISSING)
            if value is _MISSING:
                return resolve_first(message)
            return func(message, value)

        async def invoke_second_when_awaited(message: Any) -> Any:
            """`invoke_second` for an async handler, reading the Singleton when awaited: a
            coroutine that does nothing until then, which execute may hand over."""
            value = values.get(identity, _MISSING)
            if value is _MISSING:
                return await resolve_first(message)
            return await func(message, value)

        if not in_order(func, [name]):
            return invoke_only
        return invoke_second_when_awaited if inspect.iscoroutinefunction(func) else invoke_second

    if len(singletons) == 1:
        ((name, identity),) = singletons.items()

        def invoke_one(message: Any) -> Any:
            value = values.get(identity, _MISSING)
            if value is _MISSING:
                return resolve_first(message)
            return call(func, message, {name: value, **plain})

        return invoke_one

    def invoke(message: Any) -> Any:
        kwargs = dict(plain)
        for name, identity in singletons.items():
            value = values.get(identity, _MISSING)
            if value is _MISSING:
                return resolve_first(message)
            kwargs[name] = value
        return call(func, message, kwargs)

    return invoke


def _scoped_plan(
    handler: Handler,
    resolver: Resolver,
    handler_factory: Callable[..., Any] | None,
    call: Caller,
    send: Callable[..., Awaitable[None]] | None = None,
    none: bool = False,
) -> CallPlan:
    target: Any = handler.target
    method = handler.method
    is_class = handler.is_class
    init_values = dict(handler.bound) if is_class else {}
    call_values = {} if is_class else dict(handler.bound)
    collects = handler.collects_events
    # A Factory may make a unit of work, whose committed events are this handling's
    # follow-ups: the engines must hand the plan their list (see `pybus.unit_of_work`).
    # Only a plan whose Factory says it makes one collects (a collecting plan leaves the
    # engines' fast path): decided here, once.
    factories = frozenset(name for name, value in handler.bound.items() if isinstance(value, Factory))
    per_handling = any(
        isinstance(value, Factory) and makes_units(value.factory) for value in handler.bound.values()
    )

    async def make(stack: AsyncExitStack, units: list[UnitOfWork]) -> Any:
        init = await resolver.resolve_all(init_values, stack) if init_values else init_values
        units.extend(units_in(init, factories))
        if handler_factory is None:
            return target(**init)
        instance = handler_factory(target, **init) if init else handler_factory(target)
        if inspect.isawaitable(instance):
            instance = await instance
        return instance

    async def run(message: Any, followups: list[Any] | None = None) -> Any:
        events: Any = None
        dumped = False
        units: list[UnitOfWork] = []
        try:
            async with AsyncExitStack() as stack:
                instance = await make(stack, units) if is_class else target
                func = getattr(instance, method) if method else instance
                kwargs = await resolver.resolve_all(call_values, stack) if call_values else call_values
                units.extend(units_in(kwargs, factories))
                if units:
                    _attach(units, handler, followups)
                result = call(func, message, kwargs)
                if inspect.isawaitable(result):
                    result = await result
                if collects:
                    dumped = True
                    events = instance.dump_events()
                    if events.__class__ is not list:
                        events = await _dumped(handler, events)
        except AlreadyHandled:
            if not per_handling:
                raise  # no Factory here makes a unit of work: not an inbox's to skip for
            return None  # an idempotent unit's inbox: this handler already handled this message
        except BaseException as exc:
            if collects and not is_class and not dumped:
                # A ready instance serves every handling: what this failed one collected must
                # not be published by the next.
                await _discard_events(target, exc)
            raise
        # Only once the scope closed cleanly (teardowns included) does the handling count
        # as a success whose collected events may be published.
        if events:
            assert followups is not None  # the engines call a collecting plan's `collect`
            followups.extend(events)
        for unit in units:
            released, sends = unit.released()
            if released:
                assert followups is not None  # checked by _attach
                followups.extend(released)
            for sent, key in sends:
                assert send is not None  # the routers compile plans with the dispatcher's send
                await send(sent, key=key)
        return result

    invoke: Collect = _one_at_a_time(handler, target, run) if collects and not is_class else run
    collect = invoke if collects or per_handling else None
    # `run` returns the handler's result (None when an idempotent unit skipped it).
    return CallPlan(handler, invoke, True, collect, direct=none and collect is None)


def _collecting_plan(handler: Handler, call: Caller, bound: dict[str, object]) -> CallPlan:
    """A class handler (made per handling) or a ready instance that collects events, without
    providers: the general scope's steps written out, without an exit stack (it has nothing
    to tear down). Its events are taken once the handler returned, and only then."""
    target: Any = handler.target
    method = handler.method
    assert method is not None  # a collecting handler is a class or an instance with a method
    is_class = handler.is_class
    is_async = handler.is_async
    positional = (
        handler.message_param is not None and not handler.message_by_keyword and not handler.context_params
    )

    async def collect(message: Any, followups: list[Any] | None = None) -> Any:
        instance = target(**bound) if is_class else target
        dumped = False
        try:
            if positional:
                result = getattr(instance, method)(message)
            else:
                result = call(getattr(instance, method), message, {})
            if is_async or inspect.isawaitable(result):
                result = await result
            dumped = True
            events = instance.dump_events()
            if events.__class__ is not list:
                events = await _dumped(handler, events)
        except BaseException as exc:
            if not is_class and not dumped:
                # A ready instance serves every handling: what this failed one collected must
                # not be published by the next.
                await _discard_events(target, exc)
            raise
        if events:
            assert followups is not None  # the engines call a collecting plan's `collect`
            followups.extend(events)
        return result

    invoke: Collect = collect if is_class else _one_at_a_time(handler, target, collect)
    return CallPlan(handler, invoke, True, invoke)


class Collect(Protocol):
    """A collecting plan's call: the message, and the list its follow-ups go to."""

    def __call__(self, message: Any, followups: list[Any] | None = None, /) -> Coroutine[Any, Any, Any]: ...


#: The ready instances that collect events and are handling a message now (by id).
_HANDLING: set[int] = set()


def _one_at_a_time(handler: Handler, instance: object, run: Collect) -> Collect:
    """`run` for a ready instance that collects events: its events live in the instance, so a
    second handling while one is in progress (concurrent calls, or the handler calling
    itself) would mix them, publishing one handling's events with the other's or losing
    them. It is refused, before it runs, with the fix."""
    busy = id(instance)

    async def one_at_a_time(message: Any, followups: list[Any] | None = None) -> Any:
        if busy in _HANDLING:
            raise ImproperlyConfigured(
                f"{handler} is a ready instance that collects events, and it is handling another "
                "message now: the events of the two handlings would mix in it. Register its class "
                "instead (bind(Key, TheClass)), so that each handling gets an instance of its own, "
                "or do not handle its messages concurrently"
            )
        _HANDLING.add(busy)
        try:
            return await run(message, followups)
        finally:
            _HANDLING.discard(busy)

    return one_at_a_time


def _attach(units: list[UnitOfWork], handler: Handler, followups: list[Any] | None) -> None:
    if followups is None:  # the plan was compiled as not collecting: nowhere to hand its events
        raise ImproperlyConfigured(
            f"{handler} was given a {type(units[0]).__name__} by a Factory whose callable does not "
            "say it makes a unit of work, so its events would have nowhere to go: annotate the "
            "callable's return type (-> MyUnit, or AsyncIterator[MyUnit] for a generator), or pass "
            "the unit's class to Factory"
        )
    handling = object()
    for unit in units:
        unit.attach(handling, str(handler))


async def _dumped(handler: Handler, events: object) -> Any:
    """What `dump_events()` gave when it is not a list: awaited if awaitable, then checked."""
    if inspect.isawaitable(events):
        events = await events
    _check_dumped(handler, events)
    return events


def _check_dumped(handler: Handler, events: object) -> None:
    """`dump_events()` returns a collection of events; a single event would be taken apart."""
    single = events is not None and (
        isinstance(events, str | bytes | Mapping)
        or (isinstance(events, tuple) and hasattr(events, "_fields"))  # a NamedTuple event
        or not isinstance(events, Iterable)
    )
    if single:
        raise ImproperlyConfigured(
            f"{handler}.dump_events() returned {type(events).__name__} {events!r:.80}, not a list of "
            "events: return [event] for one event (pybus.EventCollector does it for you)"
        )


async def _discard_events(instance: Any, error: BaseException) -> None:
    """Empty a shared handler instance's collected events after a failed handling."""
    try:
        dropped = instance.dump_events()
        if inspect.isawaitable(dropped):
            await dropped
    except Exception as exc:
        error.add_note(
            f"dump_events() raised {type(exc).__name__}: {exc} while pybus dropped the events this "
            "failed handling collected"
        )


Caller = Callable[[Callable[..., Any], Any, Mapping[str, Any]], Any]


def _caller(param: str | None, by_keyword: bool, context: tuple[str, ...] = ()) -> Caller:
    """A function that calls `func` with `message` the way the handler takes it (and the
    current `HandlingContext` for each of the `context` parameters)."""
    if context:
        plain = _caller(param, by_keyword)

        def with_context(func: Callable[..., Any], message: Any, kwargs: Mapping[str, Any]) -> Any:
            return plain(func, message, {**kwargs, **dict.fromkeys(context, current_context())})

        return with_context
    if param is None:
        return lambda func, message, kwargs: func(**kwargs)
    if by_keyword:
        return lambda func, message, kwargs: func(**{param: message}, **kwargs)
    return lambda func, message, kwargs: func(message, **kwargs)
