"""The Dispatcher: one router per message kind, frozen and compiled by `start()`."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, NoReturn, Self, TypeVar, overload

from pybus.engines import EventEngine, RequestEngine
from pybus.errors import DispatcherNotStarted, ImproperlyConfigured, Kind
from pybus.handlers import Handler
from pybus.messages import Command, Query
from pybus.providers import Provider, Resolver
from pybus.routers import EventRouter, RequestRouter

R = TypeVar("R")


async def _not_started(kind: Kind, message: object) -> NoReturn:
    raise DispatcherNotStarted(kind, message)


class Dispatcher:
    """Routes commands, queries and events to their handlers.

    Register handlers on `dp.commands`, `dp.queries` and `dp.events` (or with
    `register_*_handler`), call `start()`, then `await execute(cmd)`,
    `await query(q)` and `await publish(event)`.

    Router classes are pluggable; `None` creates the default router on first use.
    `concurrent_events=True` runs the handlers of one event concurrently in a
    task group instead of one after the other. `max_cascade_depth` bounds how
    deep follow-up events may nest before `CascadeDepthExceeded`.
    `handler_factory` builds class handlers (for a DI container); its result may
    be awaitable, and `__init__` is then not checked at registration.

    `async with dp:` starts the dispatcher on entry and stops it on exit.
    """

    def __init__(
        self,
        *,
        events_router_cls: type[EventRouter] | None = None,
        commands_router_cls: type[RequestRouter] | None = None,
        queries_router_cls: type[RequestRouter] | None = None,
        concurrent_events: bool = False,
        max_cascade_depth: int = 64,
        handler_factory: Callable[..., Any] | None = None,
    ) -> None:
        if (
            isinstance(max_cascade_depth, bool)
            or not isinstance(max_cascade_depth, int)
            or max_cascade_depth < 0
        ):
            raise ImproperlyConfigured(
                f"max_cascade_depth must be a whole number >= 0, not {max_cascade_depth!r}"
            )
        self._events_router_cls = events_router_cls or EventRouter
        self._commands_router_cls = commands_router_cls or RequestRouter
        self._queries_router_cls = queries_router_cls or RequestRouter
        self.concurrent_events = concurrent_events
        self.max_cascade_depth = max_cascade_depth
        #: Builds class handlers as `handler_factory(cls)` or `handler_factory(cls, **bound)`.
        self.handler_factory = handler_factory
        #: Resolves this dispatcher's providers; Singletons live here, not in the process.
        self.resolver = Resolver()
        self._events: EventRouter | None = None
        self._commands: RequestRouter | None = None
        self._queries: RequestRouter | None = None
        self._started = False
        # Bound to the engines by start(); until then they raise DispatcherNotStarted.
        self._execute: Callable[[object], Coroutine[Any, Any, Any]] = functools.partial(
            _not_started, "command"
        )
        self._query: Callable[[object], Coroutine[Any, Any, Any]] = functools.partial(_not_started, "query")
        self._publish: Callable[[object], Coroutine[Any, Any, None]] = functools.partial(
            _not_started, "event"
        )

    def __repr__(self) -> str:
        state = "started" if self._started else "not started"
        return f"<Dispatcher {state}>"

    # -- routers -----------------------------------------------------------

    @property
    def events(self) -> EventRouter:
        """The event router (created on first use)."""
        if self._events is None:
            self._events = self._events_router_cls(self, "event")
        return self._events

    @property
    def commands(self) -> RequestRouter:
        """The command router (created on first use)."""
        if self._commands is None:
            self._commands = self._commands_router_cls(self, "command")
        return self._commands

    @property
    def queries(self) -> RequestRouter:
        """The query router (created on first use)."""
        if self._queries is None:
            self._queries = self._queries_router_cls(self, "query")
        return self._queries

    def _routers(self) -> dict[Kind, EventRouter | RequestRouter]:
        return {"event": self.events, "command": self.commands, "query": self.queries}

    def registered_kind(self, key: object) -> Kind | None:
        """The kind `key` is registered under, or None if it has no handler yet."""
        for kind, router in self._routers().items():
            if key in router:
                return kind
        return None

    # -- registration --------------------------------------------------------

    def register_event_handler(
        self, key: object, handler: object, /, argname: str | None = None, **initkwargs: Any
    ) -> Handler:
        """Same as `dp.events.bind(...)`."""
        return self.events.bind(key, handler, argname=argname, **initkwargs)

    def register_command_handler(
        self, key: object, handler: object, /, argname: str | None = None, **initkwargs: Any
    ) -> Handler:
        """Same as `dp.commands.bind(...)`."""
        return self.commands.bind(key, handler, argname=argname, **initkwargs)

    def register_query_handler(
        self, key: object, handler: object, /, argname: str | None = None, **initkwargs: Any
    ) -> Handler:
        """Same as `dp.queries.bind(...)`."""
        return self.queries.bind(key, handler, argname=argname, **initkwargs)

    # -- lifecycle -----------------------------------------------------------

    @property
    def started(self) -> bool:
        """True once `start()` has run."""
        return self._started

    def start(self) -> None:
        """Freeze every router and compile the call plans; registering afterwards
        raises `DispatcherFrozen`. Calling it again does nothing."""
        if self._started:
            return
        kinds: dict[object, Kind] = {}
        for kind, router in self._routers().items():
            kinds.update(dict.fromkeys(router.handlers, kind))
        events = self.events.freeze(
            foreign=_except(kinds, "event"),
            concurrent=self.concurrent_events,
            max_cascade_depth=self.max_cascade_depth,
        )
        commands = self.commands.freeze(events=events, foreign=_except(kinds, "command"))
        queries = self.queries.freeze(events=events, foreign=_except(kinds, "query"))
        self._bind_engines(events, commands, queries)
        self._started = True

    async def stop(self) -> None:
        """Tear down every Singleton this dispatcher created, last created first.

        Every teardown runs; if one raises, that exception propagates once all
        have run (earlier ones chained as its `__context__`).
        """
        await self.resolver.aclose()

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def override(self, provider: Provider, replacement: Any) -> contextlib.AbstractContextManager[None]:
        """Resolve `provider` as `replacement` (a value or another provider) inside a `with` block.

        Works before and after `start()`, nests, and restores the provider (and a
        Singleton's existing instance) when the block ends::

            with dp.override(repo_provider, FakeRepo()):
                await dp.execute(CreateUser("ada"))
        """
        return self.resolver.override(provider, replacement)

    def _bind_engines(self, events: EventEngine, commands: RequestEngine, queries: RequestEngine) -> None:
        self._execute = commands.handle
        self._query = queries.handle
        self._publish = events.publish
        # `dp.execute(cmd)` is the hottest call of an application. Binding the
        # engines' coroutine functions on the instance makes it one Python call
        # instead of two (a tenth of the dispatch cost). A subclass that
        # overrides one of these methods keeps its override.
        for name, bound in (
            ("execute", commands.handle),
            ("query", queries.handle),
            ("publish", events.publish),
        ):
            if getattr(type(self), name) is getattr(Dispatcher, name):
                setattr(self, name, bound)

    # -- sending -------------------------------------------------------------

    # Plain methods that return the engine's coroutine: one coroutine per call
    # instead of two. start() also binds the engines' methods on the instance.

    @overload
    def execute(self, command: Command[R], /) -> Coroutine[Any, Any, R]: ...
    @overload
    def execute(self, command: object, /) -> Coroutine[Any, Any, Any]: ...
    def execute(self, command: object, /) -> Coroutine[Any, Any, Any]:
        """Run the handler of a command; awaiting it gives the handler's result.

        Follow-up events are published before the await returns. Raises the
        handler's own exception unchanged, `HandlerNotFound`, or an
        `ExceptionGroup` when follow-up handlers failed.
        """
        return self._execute(command)

    @overload
    def query(self, query: Query[R], /) -> Coroutine[Any, Any, R]: ...
    @overload
    def query(self, query: object, /) -> Coroutine[Any, Any, Any]: ...
    def query(self, query: object, /) -> Coroutine[Any, Any, Any]:
        """Run the handler of a query; awaiting it gives the result (same rules as `execute`)."""
        return self._query(query)

    def publish(self, event: object, /) -> Coroutine[Any, Any, None]:
        """Run every handler of an event, then the follow-up events, when awaited.

        An event without handlers is not an error. Raises an `ExceptionGroup` of
        the handler failures once all handlers ran.
        """
        return self._publish(event)


def _except(kinds: Mapping[object, Kind], kind: Kind) -> dict[object, Kind]:
    return {key: found for key, found in kinds.items() if found != kind}
