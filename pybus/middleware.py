"""Middleware: code that runs around the handlings of the handlers it wraps.

A middleware is `async def mw(message, call_next)` (or an object with such an
async `__call__`): it may look at or replace the message (`call_next(other)`),
answer without calling the handler, and sees the handler's result and
exception. `call_next.context` says which handling it wraps (kind, key,
handler, attempt). Middleware is added to the dispatcher (every handler), to a
router (the handlers of one kind) or to one registration; the dispatcher's is
outermost, then the router's, then the registration's, each in the order
given. Chains are composed once, at `start()`; a handler without middleware is
called exactly as before.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from typing import Any, Protocol, TypeAlias, cast

from pybus.context import HandlingContext, Registration, current_record, wrap
from pybus.errors import ImproperlyConfigured, key_name
from pybus.handlers import CallPlan, awaiting, callable_name


class CallNext(Protocol):
    """What a middleware calls to run the rest of the chain and the handler."""

    @property
    def context(self) -> HandlingContext:
        """The handling this chain runs for (`pybus.current_context()` in it)."""
        ...

    def __call__(self, message: Any, /) -> Awaitable[Any]: ...


#: `async def mw(message, call_next) -> result`
Middleware: TypeAlias = Callable[[Any, CallNext], Awaitable[Any]]


def checked(middleware: Iterable[object], where: str) -> tuple[Middleware, ...]:
    """Check that each item can be called as `await mw(message, call_next)`."""
    if isinstance(middleware, str) or callable(middleware):
        name = callable_name(middleware).replace(" instance", "(...)")
        raise ImproperlyConfigured(
            f"middleware= for {where} takes a list, and {name} is one middleware; pass middleware=[{name}]"
        )
    found: list[Middleware] = []
    for item in middleware:
        name = callable_name(item)
        if isinstance(item, type) or not callable(item):
            raise ImproperlyConfigured(
                f"{name} cannot be middleware for {where}: middleware is an async function "
                "`async def mw(message, call_next)` or an object with such an async __call__ "
                "(pass an instance, not the class)"
            )
        routine = inspect.isroutine(item) or isinstance(item, functools.partial)
        if not inspect.iscoroutinefunction(item if routine else type(item).__call__):
            raise ImproperlyConfigured(
                f"{name} cannot be middleware for {where}: it is not async; define it with "
                "`async def` and return `await call_next(message)`"
            )
        try:
            inspect.signature(item).bind(None, None)
        except TypeError:
            raise ImproperlyConfigured(
                f"{name} cannot be middleware for {where}: it must accept two positional "
                "arguments, (message, call_next)"
            ) from None
        except ValueError:
            pass  # no inspectable signature: trust it
        found.append(cast(Middleware, item))
    return tuple(found)


def with_middleware(plan: CallPlan, middleware: tuple[Middleware, ...]) -> CallPlan:
    """`plan` run inside its middleware, outermost first (composed once, at start)."""
    if not middleware:
        return plan
    handler = plan.handler
    if plan.collect is None:
        return CallPlan(handler, _chain(awaiting(plan), middleware, handler), True, None)
    collect = plan.collect

    async def innermost(message: Any) -> Any:
        # The events collected by the last successful call of the handler count;
        # a middleware that answers without calling it collects none.
        events: list[Any] = []
        result = await collect(message, events)
        sink = _collected.get()
        assert sink is not None  # set by `run` below for this handling
        sink[:] = events
        return result

    chain = _chain(innermost, middleware, handler)

    async def run(message: Any, followups: list[Any] | None = None) -> Any:
        assert followups is not None  # the engines call a collecting plan's `collect`
        collected: list[Any] = []
        token = _collected.set(collected)
        try:
            result = await chain(message)
        finally:
            _collected.reset(token)
        followups.extend(collected)
        return result

    return CallPlan(handler, run, True, run)


#: Where the innermost layer of a collecting handler's chain puts the events of
#: the handling in progress (the chain itself is composed once, at start).
_collected: ContextVar[list[Any] | None] = ContextVar("pybus_collected", default=None)


class _CallNext(functools.partial[Awaitable[Any]]):
    """The rest of a chain: a C-level partial whose `context` is the running handling's."""

    handler: Registration

    @property
    def context(self) -> HandlingContext:
        record = current_record()
        if record is None:  # pragma: no cover - the engines track every dispatcher with middleware
            return HandlingContext(self.handler.kind, self.handler.key, self.handler.name)
        return wrap(record)


def _chain(
    call: Callable[[Any], Awaitable[Any]], middleware: tuple[Middleware, ...], handler: Registration
) -> Callable[[Any], Awaitable[Any]]:
    # Each layer hands its middleware the rest of the chain as a partial, which costs
    # no Python frame of its own.
    inner: Callable[[Any], Awaitable[Any]] = call
    for mw in reversed(middleware):
        call_next = _CallNext(inner)
        call_next.handler = handler
        inner = _layer(mw, call_next)
    return inner


def _is_level(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layer(mw: Middleware, call_next: CallNext) -> Callable[[Any], Awaitable[Any]]:
    def layer(message: Any) -> Awaitable[Any]:
        return mw(message, call_next)

    return layer


#: The default of `before` and `after`: the record is logged at `level`.
SAME_AS_LEVEL: Any = object()


class LoggingMiddleware:
    """Logs each handling twice: what was asked, before the handler runs, and
    the outcome with its duration, after.

    Records go to `logger` (default: the `pybus` logger; a name is accepted) at
    `level` (default INFO; `before` and `after` set the two records' levels
    apart, `before=None` skips the first record), with structured fields in
    `extra`: `pybus_kind`, `pybus_key`, `pybus_handler`, `pybus_attempt`,
    `pybus_delivery`, `pybus_message_id`, `pybus_correlation_id`,
    `pybus_causation_id` and `pybus_message` (`describe(message)`, default
    `repr`); the second record adds `pybus_outcome` ("ok", "failed" or
    "cancelled") and `pybus_duration_ms`, and for a failure `pybus_error` and the
    traceback, at `failure_level`. The handler's exception is re-raised
    unchanged. `on_timing(context, seconds, exception_or_None)` is called after
    every handling: a hook for metrics. Neither a failing `on_timing` nor a
    failing `describe` changes the handling's outcome: the first is logged, the
    second replaced by a placeholder in the record.
    """

    def __init__(
        self,
        *,
        level: int = logging.INFO,
        logger: logging.Logger | str | None = None,
        before: int | None = SAME_AS_LEVEL,
        after: int = SAME_AS_LEVEL,
        failure_level: int = logging.ERROR,
        describe: Callable[[Any], object] = repr,
        on_timing: Callable[[HandlingContext, float, BaseException | None], None] | None = None,
    ) -> None:
        for name, value in (
            ("level", level),
            ("before", before),
            ("after", after),
            ("failure_level", failure_level),
        ):
            if value is SAME_AS_LEVEL or (value is None and name == "before"):
                continue
            if not _is_level(value):
                raise ImproperlyConfigured(
                    f"LoggingMiddleware({name}={value!r}): a logging level is an int such as logging.INFO"
                    + (" (or None: no first record)" if name == "before" else "")
                )
        if logger is not None and not isinstance(logger, logging.Logger | str):
            raise ImproperlyConfigured(
                f"LoggingMiddleware(logger={logger!r}): pass a logging.Logger or a logger's name"
            )
        self.logger = (
            logger
            if isinstance(logger, logging.Logger)
            else logging.getLogger("pybus" if logger is None else logger)
        )
        self.before = level if before is SAME_AS_LEVEL else before
        self.after = level if after is SAME_AS_LEVEL else after
        self.failure_level = failure_level
        for name, hook in (("describe", describe), ("on_timing", on_timing)):
            if hook is not None and not callable(hook):
                raise ImproperlyConfigured(f"LoggingMiddleware({name}={hook!r}): pass a function")
        self.describe = describe
        self.on_timing = on_timing

    def __repr__(self) -> str:
        return f"LoggingMiddleware(logger={self.logger.name!r})"

    async def __call__(self, message: Any, call_next: CallNext) -> Any:
        context = call_next.context
        fields: dict[str, object] | None = None
        if self.before is not None and self.logger.isEnabledFor(self.before):
            fields = self._fields(context, message)
            self.logger.log(self.before, "%s: handling %s", context, fields["pybus_message"], extra=fields)
        started = time.perf_counter()
        try:
            result = await call_next(message)
        except (Exception, asyncio.CancelledError) as exc:
            self._finished(context, message, fields, started, exc)
            raise
        self._finished(context, message, fields, started, None)
        return result

    def _fields(self, context: HandlingContext, message: Any) -> dict[str, object]:
        return {
            "pybus_kind": context.kind,
            "pybus_key": key_name(context.key),
            "pybus_handler": context.handler,
            "pybus_attempt": context.attempt,
            "pybus_delivery": context.delivery,
            "pybus_message_id": context.message_id,
            "pybus_correlation_id": context.correlation_id,
            "pybus_causation_id": context.causation_id,
            "pybus_message": self._described(message),
        }

    def _finished(
        self,
        context: HandlingContext,
        message: Any,
        before: dict[str, object] | None,
        started: float,
        error: BaseException | None,
    ) -> None:
        elapsed = time.perf_counter() - started
        if error is None:
            outcome, level, text = "ok", self.after, "ok"
        elif isinstance(error, asyncio.CancelledError):
            outcome, level, text = "cancelled", self.after, "cancelled"
        else:
            outcome, level = "failed", self.failure_level
            text = f"failed ({type(error).__name__}: {error})"
        if self.logger.isEnabledFor(level):
            # The first record's fields, described once; a copy, since a handler may keep a record.
            fields = dict(before) if before is not None else self._fields(context, message)
            fields["pybus_outcome"] = outcome
            fields["pybus_duration_ms"] = round(elapsed * 1000, 3)
            if outcome == "failed":
                fields["pybus_error"] = f"{type(error).__name__}: {error}"
            self.logger.log(
                level, "%s: %s in %.3f ms", context, text, elapsed * 1000,
                exc_info=error if outcome == "failed" else None, extra=fields,
            )  # fmt: skip
        if self.on_timing is not None:
            try:
                self.on_timing(context, elapsed, error)
            except Exception:  # a metrics hook must not change the outcome of the handling
                self.logger.exception("pybus: LoggingMiddleware's on_timing hook failed for %s", context)

    def _described(self, message: Any) -> object:
        try:
            return self.describe(message)
        except Exception as exc:  # logging must not change the outcome of the handling
            return f"<{type(message).__name__}: describe() raised {type(exc).__name__}: {exc}>"
