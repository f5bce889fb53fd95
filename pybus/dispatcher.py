"""The Dispatcher: one router per message kind, frozen and compiled by `start()`."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import signal
import typing
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Never, NoReturn, Protocol, Self, TypeVar, overload

from pybus.engines import EventEngine, RequestEngine
from pybus.errors import (
    ComingFromIambus,
    DispatcherClosed,
    DispatcherFrozen,
    DispatcherNotStarted,
    ImproperlyConfigured,
    InvalidMessage,
    Kind,
    TransportError,
    WouldDeadlock,
    drain_seconds,
    key_name,
    message_key,
    whole_number,
)
from pybus.handlers import Handler, callable_name, positive_seconds
from pybus.lifecycle import Lifecycle, State
from pybus.messages import Command, Query
from pybus.middleware import Middleware, checked
from pybus.providers import Provider, Resolver
from pybus.retry import Retry, checked_retry
from pybus.routers import EventRouter, RequestRouter, bind_any
from pybus.settings import Settings
from pybus.tracking import Instrumentation
from pybus.transport_routes import Routing
from pybus.workers import EngineStatistics, ErrorHook, Statistics, Supervisor, WorkerPool, checked_hook

# A transport's modules load when one is used (see pybus.transport_routes), not with
# `import pybus`; the observer's with the test tools that subclass it (pybus.testing).
if TYPE_CHECKING:
    from pybus.consumer import Consumer
    from pybus.observer import Observer
    from pybus.transport import Envelope, Transport

R = TypeVar("R")
logger = logging.getLogger("pybus")


#: Seconds a service (an outbox relay) gets to end when the dispatcher stops, before it is cancelled.
SERVICE_GRACE = 5.0


class Service(Protocol):
    """Something `serve()` runs beside the consumer (see `Dispatcher.add_service`)."""

    async def run(self) -> None: ...

    async def stop(self) -> None: ...


async def _refuse(
    error: type[DispatcherNotStarted | DispatcherClosed], kind: Kind, message: object, timeout: object = None
) -> NoReturn:
    raise error(kind, message)


class Dispatcher:
    """Routes commands, queries and events to their handlers.

    Register handlers on `dp.commands`, `dp.queries` and `dp.events` (or with
    `register_*_handler`), call `start()`, then `await execute(cmd)`,
    `await query(q)` and `await publish(event)`, or `send` messages to the
    background workers.

    `async with dp:` starts the dispatcher on entry and, on exit, drains the
    background queues and stops it. Every option is keyword-only; a value that
    cannot work raises `ImproperlyConfigured` here, not at the first message.

    Args:
        events_router_cls: Router class for events (an `EventRouter` subclass); `None`: `EventRouter`.
        commands_router_cls: Router class for commands (a `RequestRouter` subclass); `None`: `RequestRouter`.
        queries_router_cls: Router class for queries (a `RequestRouter` subclass); `None`: `RequestRouter`.
        concurrent_events: Run the handlers of one event concurrently (a task group), not one by one.
        max_cascade_depth: How deep follow-up events may nest before `CascadeDepthExceeded` (>= 0).
        handler_factory: Builds class handlers as `factory(cls)` or `factory(cls, **bound)` (a DI container);
            its result may be awaitable, and `__init__` is then not checked at registration.
        queue_size: Messages each engine's background queue holds (>= 1); past it, `send` waits for room.
        workers: Background worker tasks per engine (>= 1).
        on_error: `on_error(error, message)`, sync or async: hears the failures nobody awaits (background
            handlings, consumers, relays); `None`: an ERROR log record with the traceback.
        default_timeout: Seconds that bound every handling whose registration sets no `timeout`; `None`: none.
        transport: Carries the messages given to `route()` to other processes; `stop()` closes it.
            `None`: everything stays in this process.
        middleware: Wraps every handler, outside the routers' and the registrations' middleware.
        retry: A `pybus.Retry`: the policy of every handler whose registration and router set none.
        context: Track every handling's context (`pybus.current_context()`) even when nothing asks for it.
        **iambus: Not options: iambus's names (`listen_for_signals=`, `engine_workers=`) raise
            `ComingFromIambus` naming the pybus equivalent; any other name raises `TypeError`.
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
        queue_size: int = 10_000,
        workers: int = 4,
        on_error: ErrorHook | None = None,
        default_timeout: float | None = None,
        transport: Transport | None = None,
        middleware: Iterable[Middleware] = (),
        retry: Retry | None = None,
        context: bool = False,
        **iambus: Never,
    ) -> None:
        for name in iambus:
            raise _renamed(name, _IAMBUS_OPTIONS)
        self._events_router_cls = events_router_cls or EventRouter
        self._commands_router_cls = commands_router_cls or RequestRouter
        self._queries_router_cls = queries_router_cls or RequestRouter
        self.concurrent_events = concurrent_events
        self.max_cascade_depth = whole_number("max_cascade_depth", max_cascade_depth, 0)
        #: Builds class handlers as `handler_factory(cls)` or `handler_factory(cls, **bound)`.
        self.handler_factory = handler_factory
        self.queue_size = whole_number("queue_size", queue_size, 1)
        self.workers = whole_number("workers", workers, 1)
        if default_timeout is not None and not positive_seconds(default_timeout):
            raise ImproperlyConfigured(
                f"default_timeout must be None or seconds > 0, not {default_timeout!r}"
            )
        self.default_timeout = default_timeout
        self._supervisor = Supervisor(on_error)
        #: Resolves this dispatcher's providers; Singletons live here, not in the process.
        self.resolver = Resolver(bind=self._supervisor.bind)
        self._events: EventRouter | None = None
        self._commands: RequestRouter | None = None
        self._queries: RequestRouter | None = None
        #: Where routed messages go (see `route`); None: everything stays in this process.
        #: The dispatcher owns it: `stop()` closes it.
        self.transport = transport
        self._routing = Routing(transport, self._supervisor)
        self._middleware = checked(middleware, "every handler")
        self._retry = checked_retry(retry, "every handler")
        if not isinstance(context, bool):
            raise ImproperlyConfigured(f"context must be True or False, not {context!r}")
        self._context = context
        self._instrumentation: Instrumentation | None = None
        self._services: list[Service] = []
        self._provided: dict[object, object] = {}
        self._service_tasks: list[asyncio.Task[None]] = []
        self._services_deadline: float | None = None
        self._lifecycle = Lifecycle(self._supervisor, self.resolver, transport)
        self._lifecycle.before_close = self._stop_services
        self._bind_calls(functools.partial(_refuse, DispatcherNotStarted))

    def __repr__(self) -> str:
        return f"<Dispatcher {self.state.value}>"

    @property
    def on_error(self) -> ErrorHook:
        """The error hook: `on_error(error, message)` for background failures."""
        return self._supervisor.on_error

    @on_error.setter
    def on_error(self, hook: ErrorHook | None) -> None:
        # Checked as the constructor checks it; None puts the default (logging) back.
        self._supervisor.on_error = checked_hook(hook)

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
        self, key: object, /, handler: object, argname: str | None = None, **initkwargs: Any
    ) -> Handler:
        """Same as `dp.events.bind(...)`."""
        return bind_any(self.events, key, handler, argname=argname, **initkwargs)

    def register_command_handler(
        self, key: object, /, handler: object, argname: str | None = None, **initkwargs: Any
    ) -> Handler:
        """Same as `dp.commands.bind(...)`."""
        return bind_any(self.commands, key, handler, argname=argname, **initkwargs)

    def register_query_handler(
        self, key: object, /, handler: object, argname: str | None = None, **initkwargs: Any
    ) -> Handler:
        """Same as `dp.queries.bind(...)`."""
        return bind_any(self.queries, key, handler, argname=argname, **initkwargs)

    def add_middleware(self, *middleware: Middleware) -> None:
        """Wrap every handler, of every kind, in `middleware`: outermost, before
        the routers' and the registrations' middleware, in the order added.
        Raises `DispatcherFrozen` after `start()`."""
        if self.state is not State.NEW:
            names = ", ".join(callable_name(mw) for mw in middleware)
            raise DispatcherFrozen("event", None, f"middleware {names}", target="every handler")
        self._middleware += checked(middleware, "every handler")

    @property
    def middleware(self) -> tuple[Middleware, ...]:
        """The dispatcher-wide middleware, outermost first."""
        return self._middleware

    @property
    def retry(self) -> Retry | None:
        """The dispatcher-wide retry policy (None: handlers are not retried unless their
        registration or router says so). Settable until `start()`."""
        return self._retry

    @retry.setter
    def retry(self, policy: Retry | None) -> None:
        if self.state is not State.NEW:
            raise DispatcherFrozen("event", None, f"retry policy {policy}", target="every handler")
        self._retry = checked_retry(policy, "every handler")

    @property
    def instrumentation(self) -> Instrumentation | None:
        """What is told when each message's handling starts and ends (set by
        `pybus.otel.instrument(dp)`); settable until `start()`. Setting one turns
        context tracking on."""
        return self._instrumentation

    @instrumentation.setter
    def instrumentation(self, instrument: Instrumentation | None) -> None:
        if self.state is not State.NEW:
            raise DispatcherFrozen("event", None, f"instrumentation {instrument!r}", target="every handler")
        self._instrumentation = instrument

    @property
    def tracks_context(self) -> bool:
        """Whether handlings run inside their `HandlingContext` (`pybus.current_context()`).

        Decided by `start()`: True when something uses the context (any middleware,
        any retry policy, a transport route, a handler parameter annotated
        `HandlingContext`) or `Dispatcher(context=True)`; else False, and
        `execute` pays nothing for it. An attached observer or tracked session
        turns it on while attached. False before `start()`.
        """
        engine = self.events.engine  # the engines of a dispatcher track together
        return engine is not None and engine.tracking

    def _uses_context(self) -> bool:
        routers = self._routers().values()
        handlers = [h for router in routers for found in router.handlers.values() for h in found]
        return (
            self._context
            or self._instrumentation is not None
            or bool(self._middleware or self._retry is not None or self._routing.routes)
            or any(router.middleware or router.retry is not None for router in routers)
            or any(h.middleware or h.retry is not None or h.context_params for h in handlers)
        )

    @property
    def routes(self) -> Mapping[object, str]:
        """The routed keys and the names they travel under (read-only)."""
        return MappingProxyType({key: name for key, (name, _) in self._routing.routes.items()})

    def provide(self, type_: object, value: object, /) -> None:
        """Inject `value` (a `Singleton`, a `Factory` or a ready value) into every handler
        parameter annotated `type_` (or `type_ | None`) that is not given a value by name:
        injection by type. `type_` is a class or a generic one (`Repo[User]`); a provided
        class also serves its generic forms that are not provided themselves. Call it
        before registering the handlers that use it (registration checks each parameter as
        strictly as a value bound by name). Raises `DispatcherFrozen` after `start()`,
        `ImproperlyConfigured` for a `type_` that is not a class, one already provided, or
        a ready value that is not a `type_` (a function that makes one goes in a
        `Singleton` or a `Factory`)."""
        name = getattr(type_, "__qualname__", None) or repr(type_)
        if self.state is not State.NEW:
            raise DispatcherFrozen("event", None, f"a provider for {name}", target="every handler")
        origin = typing.get_origin(type_)
        if not isinstance(type_, type) and not isinstance(origin, type):
            raise ImproperlyConfigured(
                f"dp.provide() takes a class first (the annotation to match), not {type_!r}"
            )
        if type_ in self._provided:
            raise ImproperlyConfigured(
                f"{name} is provided already ({self._provided[type_]!r}); provide a type once, "
                "and bind a different value by name where one handler needs it"
            )
        if not isinstance(value, Provider) and not _is_instance(value, origin or type_):
            made = inspect.isroutine(value) or isinstance(value, type)
            raise ImproperlyConfigured(
                f"dp.provide({name}, {value!r:.80}): the value is not a {name}. "
                + (
                    f"To have {callable_name(value)} called to make one, wrap it: "
                    f"dp.provide({name}, Singleton({callable_name(value)})) for one per dispatcher, "
                    f"or Factory({callable_name(value)}) for one per handling"
                    if made
                    else f"Provide a {name} (a ready value), a Singleton or a Factory"
                )
            )
        self._provided[type_] = value

    @property
    def provided(self) -> Mapping[object, object]:
        """The values injected by type (see `provide`), read-only."""
        return MappingProxyType(self._provided)

    def add_header_source(self, source: Callable[[dict[str, str]], None]) -> None:
        """Call `source(headers)` for every routed message this dispatcher sends, in the
        sender's context, to add strings to the envelope's headers (the worker reads them
        as `current_context().headers`). Raises `DispatcherFrozen` after `start()`."""
        if self.state is not State.NEW:
            raise DispatcherFrozen(
                "event", None, f"header source {callable_name(source)}", target="every route"
            )
        if not callable(source):
            raise ImproperlyConfigured(f"add_header_source() takes a function f(headers), not {source!r}")
        if inspect.iscoroutinefunction(source) or inspect.isasyncgenfunction(source):
            raise ImproperlyConfigured(
                f"add_header_source({callable_name(source)}): a header source is a plain function "
                "f(headers) that adds strings to the dict before the message is sent; it is not awaited, "
                "so it cannot be async"
            )
        self._routing.outgoing.append(source)

    def envelope(self, message: object) -> Envelope:
        """The envelope `message` would travel in if it were sent now (for an outbox): its
        route's kind and name, its encoded body, ids that make it a child of the handling
        in progress, and the header sources' headers. Raises `ImproperlyConfigured` before
        `start()` or for a message that is not routed."""
        key = message_key(message)
        if key not in self._routing.routes:
            raise ImproperlyConfigured(
                f"{key_name(key)} is not routed: route it with dp.route({key_name(key)})"
            )
        if not self.started:
            raise ImproperlyConfigured("Routed messages get their envelope after dp.start()")
        return self._routing.envelope(self._routing.kind_of(key), message)

    def route(self, key: object, /, *, name: str | None = None, kind: Kind | None = None) -> None:
        """Send messages of `key` through the transport instead of handling them here.

        Publishing or sending a routed message (a follow-up event included)
        writes it to the transport; `execute` and `query` stay in-process.
        `name` is what it travels under (default: `module.QualifiedName`);
        `kind` defaults to the kind `key` is registered under, else to what its class
        says (a subclass of `Command` or `Query`), else "event".
        Raises `DispatcherFrozen` after `start()`.
        """
        if self.state is not State.NEW:
            raise DispatcherFrozen(kind or "event", key, "a transport route")
        self._routing.add(key, name, kind)

    # -- lifecycle -----------------------------------------------------------

    @property
    def state(self) -> State:
        """`State.NEW`, `STARTED`, `STOPPING` or `STOPPED` (see `pybus.lifecycle`)."""
        return self._lifecycle.state

    @property
    def started(self) -> bool:
        """True once `start()` has run (also while and after stopping)."""
        return self.events.engine is not None

    def start(self) -> None:
        """Freeze every router and compile the call plans; registering afterwards
        raises `DispatcherFrozen`. Calling it again does nothing; calling it once
        the dispatcher is stopping or stopped raises `DispatcherClosed`."""
        if not self._lifecycle.check_startable():
            return
        for router in self._routers().values():
            router.check_applied()
        kinds: dict[object, Kind] = {}
        for kind, router in self._routers().items():
            kinds.update(dict.fromkeys(router.handlers, kind))
        forwarders = self._routing.forwarders(kinds)
        settings = Settings(
            concurrent_events=self.concurrent_events,
            max_cascade_depth=self.max_cascade_depth,
            handler_factory=self.handler_factory,
            queue_size=self.queue_size,
            workers=self.workers,
            default_timeout=self.default_timeout,
            middleware=self._middleware,
            retry=self._retry,
            tracked=self._uses_context(),
            instrument=self._instrumentation,
        )
        supervisor = self._supervisor
        events = self.events.freeze(
            settings, supervisor, foreign=_except(kinds, "event"), forwarder=forwarders.get("event")
        )
        commands = self.commands.freeze(
            settings, supervisor, events=events, foreign=_except(kinds, "command"),
            forwarder=forwarders.get("command"),
        )  # fmt: skip
        queries = self.queries.freeze(
            settings, supervisor, events=events, foreign=_except(kinds, "query"),
            forwarder=forwarders.get("query"),
        )  # fmt: skip
        self._bind_engines(events, commands, queries)
        self._lifecycle.started((events, commands, queries))

    def consumer(
        self,
        *,
        concurrency: int = 4,
        prefetch: int = 100,
        max_deliveries: int = 5,
        wait: float = 1.0,
    ) -> Consumer:
        """A consumer of the routed messages this process has handlers for.

        Run it with `await consumer.run()`, end it with `await consumer.stop()`;
        `serve()` does both, and `dp.stop()` stops every consumer it made first.
        Reads of up to `prefetch` messages go out while a batch is handled.
        Raises `ImproperlyConfigured` without routes and a transport, before
        `start()`, or for sizes that cannot work, and `DispatcherClosed` once stopping.

        Args:
            concurrency: Messages handled at a time (>= 1).
            prefetch: Messages held besides those being handled, read ahead (>= 1).
            max_deliveries: Failed deliveries after which a message is dead-lettered (>= 1).
            wait: Seconds a read waits when there is nothing to read (> 0); a new message ends it at once.
        """
        engines = self._engines("consume from the transport")
        if self.state is not State.STARTED:
            raise DispatcherClosed(None, text="Cannot make a consumer: the dispatcher is stopping or stopped")
        consumer = self._routing.consumer(
            engines,
            concurrency=concurrency,
            prefetch=prefetch,
            max_deliveries=max_deliveries,
            wait=wait,
        )
        self._lifecycle.consumers.append(consumer)
        return consumer

    async def join(self) -> None:
        """Wait until every message sent to the background workers is handled,
        including what those handlings sent in turn.

        Raises `WouldDeadlock` when awaited from inside a background handling.
        """
        await self._supervisor.join()

    async def stop(self, timeout: float | None = None) -> int:
        """Stop: refuse new sends, drain, stop the workers and consumers, close the
        transport, tear down Singletons.

        Messages queued before the call are handled (and what they send in turn);
        past `timeout` seconds (None: no limit, 0: none) the rest are cancelled.
        Returns the number of messages that were not handled (background messages
        cancelled or never started, and routed messages the consumers gave back to
        the transport), also logged as a warning. Afterwards every call raises
        `DispatcherClosed`. Singleton teardowns run last, last created first, each
        exactly once; a failing teardown is raised after all ran.

        Safe to call twice, concurrently, or to interrupt: every call waits for the
        one shutdown (a shorter `timeout` brings its deadline closer) and returns its
        count; cancelling a call leaves the shutdown running. Called before `start()`,
        it closes the dispatcher for good. Raises `ImproperlyConfigured` for a
        `timeout` that is not None or seconds >= 0, and `WouldDeadlock` when awaited
        from inside a background handling of this dispatcher (it would wait for itself).
        """
        seconds = drain_seconds("timeout", timeout)
        if self._supervisor.inside():
            raise WouldDeadlock("dp.stop()")
        if self.state is State.NEW:  # closed for good, before anything is awaited
            self._bind_calls(functools.partial(_refuse, DispatcherClosed))
            for router in self._routers().values():
                router.close()
        return await self._lifecycle.stop(seconds)

    async def serve(
        self,
        *,
        stop_signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM),
        drain_timeout: float | None = None,
        concurrency: int = 4,
        prefetch: int = 100,
        max_deliveries: int = 5,
        wait: float = 1.0,
    ) -> int:
        """Start, run until one of `stop_signals` arrives or `stop()` is called, then stop.

        With a transport, also consumes the routed messages this process has
        handlers for (the last four options are `consumer`'s); on the signal it
        stops reading at once, lets handlings in flight finish within
        `drain_timeout`, and gives the rest back to the transport. Services added
        with `add_service` run beside the consumer. Returns what
        `stop(drain_timeout)` returns.

        The only place pybus installs signal handlers, and only while it runs: the
        ones it replaced are put back (it refuses to replace a handler the event loop
        itself holds). Stops the dispatcher whatever ends it (a signal, `dp.stop()`,
        its own cancellation); if the consumer ends on its own, serve() stops the
        dispatcher and raises `TransportError`.

        Args:
            stop_signals: Signals that stop it; `()` installs none (then call `dp.stop()` yourself).
            drain_timeout: Seconds handlings in flight and queued background work get to finish once
                stopping; `None`: no limit, `0`: none. What is left is given back or cancelled.
            concurrency: Messages the consumer handles at a time (>= 1).
            prefetch: Messages the consumer holds besides those being handled, read ahead (>= 1).
            max_deliveries: Failed deliveries after which a message is dead-lettered (>= 1).
            wait: Seconds a read waits when there is nothing to read (> 0).
        """
        drain_seconds("drain_timeout", drain_timeout)  # refused before anything starts
        previous = {sig: signal.getsignal(sig) for sig in stop_signals}
        for sig, handler in previous.items():
            if getattr(handler, "__module__", "").startswith("asyncio"):
                raise ImproperlyConfigured(
                    f"serve() would replace the event loop's own handler for {sig.name}, which could "
                    "not be restored afterwards; pass serve(stop_signals=()) and call dp.stop() from "
                    "your handler"
                )
        self.start()
        try:
            consumer = (
                self.consumer(
                    concurrency=concurrency, prefetch=prefetch, max_deliveries=max_deliveries, wait=wait
                )
                if self._routing.codec is not None
                else None
            )
        except BaseException:  # refused sizes: leave nothing started or installed
            await self.stop()
            raise
        loop = asyncio.get_running_loop()
        requested = self._lifecycle.watch(loop)
        installed: list[signal.Signals] = []
        reading: asyncio.Task[None] | None = None
        died = False

        def on_signal() -> None:
            if requested.done():
                self._lifecycle.hurry()  # a second signal: no more drain, give back at once
            else:
                requested.set_result(None)

        try:
            for sig in stop_signals:
                loop.add_signal_handler(sig, on_signal)
                installed.append(sig)
            if consumer is not None:
                reading = loop.create_task(consumer.run(), name="pybus-consumer")
            self._service_tasks = [
                loop.create_task(service.run(), name=f"pybus-{type(service).__name__}")
                for service in self._services
            ]
            await asyncio.wait(
                [requested, *([reading] if reading else [])], return_when=asyncio.FIRST_COMPLETED
            )
            died = reading is not None and reading.done() and not requested.done()
        finally:
            try:
                # The handlers stay while it stops: a second signal ends the drain at once
                # (what is still running is given back) instead of killing the process.
                unhandled = await self.stop(drain_timeout)
                if reading is not None:
                    await asyncio.wait([reading])
            finally:
                for sig in installed:
                    loop.remove_signal_handler(sig)
                    if previous[sig] not in (signal.getsignal(sig), None):
                        signal.signal(sig, previous[sig])  # the application's own handler, back
                self._lifecycle.unwatch(requested)
        if died and reading is not None:
            cause = reading.exception() if not reading.cancelled() else asyncio.CancelledError()
            raise TransportError(
                f"The consumer stopped on its own ({type(cause).__name__}: {cause}); serve() stopped "
                f"the dispatcher ({unhandled} message(s) not handled)"
            ) from cause
        return unhandled

    def add_service(self, service: Service) -> None:
        """Run `service` (an object with async `run()` and `stop()`, such as an outbox relay)
        while `serve()` runs: started with the consumer; when the dispatcher stops, told to
        stop once the consumers and workers are done (so it still runs during the drain), and
        cancelled if it has not ended `SERVICE_GRACE` seconds later, before the transport closes.
        Raises `ImproperlyConfigured` for an object without them."""
        run, stop = getattr(service, "run", None), getattr(service, "stop", None)
        if not (inspect.iscoroutinefunction(run) and inspect.iscoroutinefunction(stop)):
            raise ImproperlyConfigured(
                "add_service() takes an object with `async def run()` and `async def stop()`, "
                f"not {service!r}"
            )
        self._services.append(service)

    async def _stop_services(self) -> None:
        """Stop the services `serve()` runs (called by the shutdown once the consumers and
        workers are done, before the transport closes): told to stop once, each gets until
        `SERVICE_GRACE` seconds after that to end, then is cancelled; their failures go to the
        error hook. Called again after an interruption (the loop ending cancels the shutdown),
        it goes on waiting for the same tasks and deadline."""
        tasks = self._service_tasks
        if not tasks:
            return
        loop = asyncio.get_running_loop()
        if self._services_deadline is None:
            self._services_deadline = loop.time() + SERVICE_GRACE
            for service in self._services:
                try:
                    async with asyncio.timeout_at(self._services_deadline):
                        await service.stop()
                except Exception as exc:  # a TimeoutError too: it could not be told in time
                    await self._supervisor.report(exc, None, contextvars.copy_context())
        _, late = await asyncio.wait(tasks, timeout=max(0.0, self._services_deadline - loop.time()))
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)
        self._service_tasks = []
        for task in tasks:
            error = None if task.cancelled() else task.exception()
            if error is not None:
                await self._supervisor.report(error, None, contextvars.copy_context())

    def statistics(self) -> Statistics:
        """A frozen snapshot of each engine's queued, in-flight, handled and failed counts."""
        empty = EngineStatistics(0, 0, 0, 0)
        counts = {pool.kind: pool.statistics() for pool in self._pools()}
        return Statistics(
            events=counts.get("event", empty),
            commands=counts.get("command", empty),
            queries=counts.get("query", empty),
        )

    def _pools(self) -> list[WorkerPool]:
        if not self.started:
            return []
        return [engine.workers for engine in self._engines("count the workers")]

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

    def attach_observer(self, observer: Observer) -> None:
        """Report every handling to `observer` (see `pybus.observer`); one at a time.

        Raises `ImproperlyConfigured` before `start()`.
        """
        for engine in self._engines("attach an observer"):
            engine.observe(observer)

    def detach_observer(self) -> None:
        """Stop reporting; the engines take their fast paths again."""
        for engine in self._engines("detach an observer"):
            engine.observe(None)

    @contextlib.contextmanager
    def override_handler(
        self, key: object, handler: object, /, argname: str | None = None, **bound: Any
    ) -> Iterator[Handler]:
        """Replace the handler(s) of `key` inside a `with` block, after `start()`; for tests.

        `handler` is checked as at registration and gets the kind `key` is
        registered under (for an event, it replaces every handler registered for
        exactly `key`). The original handlers are back when the block ends::

            with dp.override_handler(ChargeCard, fake_charge):
                await dp.execute(PlaceOrder(...))
        """
        kind = self.registered_kind(key)
        if kind is None:
            raise ImproperlyConfigured(
                f"Cannot override the handler of {key_name(key)}: nothing is registered for it; "
                "override_handler replaces a registered handler, so register one first"
            )
        events, commands, queries = self._engines("override a handler")
        router = self._routers()[kind]
        registration = router.inspect(key, handler, argname, **bound)
        if registration.context_params and not events.tracked:
            raise ImproperlyConfigured(
                f"Cannot override the handler of {key_name(key)} with {registration}: it takes a "
                "HandlingContext, and this dispatcher does not track handlings (nothing asked for it "
                "at start()); create it with Dispatcher(context=True)"
            )
        plan = router.compile_plan(registration)
        if kind == "event":
            previous_events = events.replace(key, (plan,))
            try:
                yield registration
            finally:
                events.replace(key, previous_events)
            return
        engine = commands if kind == "command" else queries
        previous = engine.replace(key, plan)
        try:
            yield registration
        finally:
            engine.replace(key, previous)

    def _engines(self, action: str) -> tuple[EventEngine, RequestEngine, RequestEngine]:
        events, commands, queries = self.events.engine, self.commands.engine, self.queries.engine
        if events is None or commands is None or queries is None:
            if self.state is State.STOPPED:
                raise DispatcherClosed(
                    None, text=f"Cannot {action}: the dispatcher was stopped before it started"
                )
            raise ImproperlyConfigured(f"Cannot {action} before dp.start(): start the dispatcher first")
        return events, commands, queries

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

    def _bind_calls(self, refuse: Callable[..., Coroutine[Any, Any, NoReturn]]) -> None:
        """Make execute/query/publish raise (not started, or closed)."""
        self._execute = functools.partial(refuse, "command")
        self._query = functools.partial(refuse, "query")
        self._publish = functools.partial(refuse, "event")
        for name in ("execute", "query", "publish"):
            vars(self).pop(name, None)

    def handle(self, message: object, /, *args: object, **kwargs: object) -> NoReturn:
        """Not a pybus call: iambus's `dp.handle(...)` is `execute`, `query` or `publish` here."""
        raise ComingFromIambus(
            "pybus has no dp.handle(): the call says the kind, and results are always returned. "
            "Use await dp.execute(command), await dp.query(query) or await dp.publish(event) "
            "(dp.send(message, key=...) for the background workers); see docs/coming-from-iambus.md"
        )

    # -- sending -------------------------------------------------------------

    # Plain methods that return the engine's coroutine: one coroutine per call
    # instead of two. start() also binds the engines' methods on the instance.

    @overload
    def execute(self, command: Command[R], /, *, timeout: float | None = None) -> Coroutine[Any, Any, R]: ...
    @overload
    def execute(self, command: object, /, *, timeout: float | None = None) -> Coroutine[Any, Any, Any]: ...
    def execute(self, command: object, /, *, timeout: float | None = None) -> Coroutine[Any, Any, Any]:
        """Run the handler of a command; awaiting it gives the handler's result.

        Follow-up events are published before the await returns. Raises the
        handler's own exception unchanged, `HandlerNotFound`, an `ExceptionGroup`
        when follow-up handlers failed, or `TimeoutError` past `timeout` seconds
        (follow-ups included; the handling is cancelled).
        """
        return self._execute(command, timeout)

    @overload
    def query(self, query: Query[R], /, *, timeout: float | None = None) -> Coroutine[Any, Any, R]: ...
    @overload
    def query(self, query: object, /, *, timeout: float | None = None) -> Coroutine[Any, Any, Any]: ...
    def query(self, query: object, /, *, timeout: float | None = None) -> Coroutine[Any, Any, Any]:
        """Run the handler of a query; awaiting it gives the result (same rules as `execute`)."""
        return self._query(query, timeout)

    def publish(self, event: object, /, *, timeout: float | None = None) -> Coroutine[Any, Any, None]:
        """Run every handler of an event, then the follow-up events, when awaited.

        An event without handlers is not an error. Raises an `ExceptionGroup` of
        the handler failures once all handlers ran, or `TimeoutError` past `timeout`.
        """
        return self._publish(event, timeout)

    async def send(self, message: object, /, *, key: object = None) -> None:
        """Queue a message for the background workers of its kind and return once queued.

        The kind is the one its key is registered under; a message without a
        handler of any kind is an event. See `router.send` for waiting, ordering
        keys and errors.
        """
        if message is None or isinstance(message, type):
            raise InvalidMessage("dp.send()", message)
        await self._router_for(message).send(message, key=key)

    def send_nowait(self, message: object, /, *, key: object = None) -> None:
        """Like `send`, but raises `QueueFull` instead of waiting for room."""
        if message is None or isinstance(message, type):
            raise InvalidMessage("dp.send_nowait()", message)
        self._router_for(message).send_nowait(message, key=key)

    def _router_for(self, message: object) -> EventRouter | RequestRouter:
        for router in self._routers().values():
            if router.routes_message(message):
                return router
        kind = self.registered_kind(message_key(message))
        if kind == "command":
            return self.commands
        if kind == "query":
            return self.queries
        return self.events


_IAMBUS_OPTIONS = {
    "listen_for_signals": "pybus installs no signal handler on its own: await dp.serve() handles "
    "SIGINT and SIGTERM while it runs (serve(stop_signals=...))",
    "engine_workers": "Dispatcher(workers=4, queue_size=10_000): the background workers of each engine",
}


def _renamed(name: str, known: Mapping[str, str]) -> Exception:
    if name in known:
        return ComingFromIambus(f"Dispatcher({name}=...) is iambus's; in pybus: {known[name]}")
    return TypeError(f"Dispatcher() got an unexpected keyword argument {name!r}")


def _except(kinds: Mapping[object, Kind], kind: Kind) -> dict[object, Kind]:
    return {key: found for key, found in kinds.items() if found != kind}


def _is_instance(value: object, cls: object) -> bool:
    """Is `value` a `cls`? For a class that cannot tell (a Protocol that is not runtime
    checkable), anything but a function or a class, which would be a maker of one."""
    try:
        return isinstance(value, cls)  # type: ignore[arg-type]
    except TypeError:
        return not (inspect.isroutine(value) or isinstance(value, type))
