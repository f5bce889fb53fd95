"""Routers: where handlers are registered, one router per message kind.

A router checks every registration when it is made, keeps the handler map
until `start()`, then freezes it and hands compiled call plans to its engine.
Subclass `EventRouter` or `RequestRouter` and pass the class to `Dispatcher`
to customise registration; `register` always goes through `bind`, so
overriding `bind` is enough.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Concatenate,
    Generic,
    NoReturn,
    ParamSpec,
    Protocol,
    TypeVar,
    overload,
)

from pybus.engines import EventEngine, RequestEngine
from pybus.errors import (
    ROUTERS,
    ComingFromIambus,
    DispatcherClosed,
    DispatcherFrozen,
    DispatcherNotStarted,
    HandlerAlreadyRegistered,
    ImproperlyConfigured,
    Kind,
    key_name,
    message_key,
    with_article,
)
from pybus.handlers import CallPlan, Handler, by_type, callable_name, compile_handler, inspect_handler
from pybus.middleware import Middleware, checked, with_middleware
from pybus.retry import Retry, checked_retry
from pybus.settings import Settings

if TYPE_CHECKING:
    from pybus.dispatcher import Dispatcher
    from pybus.transport_routes import Forwarder
    from pybus.workers import Supervisor

H = TypeVar("H")
M = TypeVar("M")
C = TypeVar("C", bound=type[Any])
P = ParamSpec("P")
R = TypeVar("R")


def bind_any(router: _Router[Any], key: object, handler: object, **options: Any) -> Handler:
    """`router.bind(...)` without the overloads that type-check user calls (for pybus's own calls)."""
    bind: Callable[..., Handler] = router.bind
    return bind(key, handler, **options)


class SupportsHandle(Protocol):
    """A ready handler instance: anything with a `handle` method (checked at registration)."""

    @property
    def handle(self) -> Callable[..., Any]: ...


class HandlerDecorator(Protocol[M]):
    """What `register(Key)` returns: accepts a function whose first parameter takes a `Key`
    (or no parameter at all), a class, or an object with `handle`, and returns it unchanged."""

    @overload
    def __call__(self, handler: C, /) -> C: ...
    @overload
    def __call__(self, handler: Callable[Concatenate[M, P], R], /) -> Callable[Concatenate[M, P], R]: ...
    @overload
    def __call__(self, handler: Callable[[], R], /) -> Callable[[], R]: ...
    @overload
    def __call__(self, handler: SupportsHandle, /) -> SupportsHandle: ...


E = TypeVar("E", EventEngine, RequestEngine)


class _Router(Generic[E]):
    """Registration shared by both routers; subclasses decide how many handlers a key has."""

    def __init__(self, dispatcher: Dispatcher, kind: Kind) -> None:
        self.dispatcher = dispatcher
        self.kind: Kind = kind
        self._handlers: dict[object, list[Handler]] = {}
        self._unapplied: dict[Callable[..., Any], object] = {}  # decorators of register(), by key
        self._frozen = False
        self._closed = False
        self._middleware: tuple[Middleware, ...] = ()
        self._retry: Retry | None = None
        # Given by freeze(): the dispatcher's settings, and the routed keys of this kind.
        self._settings = Settings()
        self._forwarder: Forwarder | None = None
        self._send_call = f"dp.{ROUTERS[kind]}.send()"  # named in errors
        # Message classes whose sends `engine.check` accepted (the maps are frozen by then).
        self._sendable: set[type] = set()
        self._send_nowait_call = f"dp.{ROUTERS[kind]}.send_nowait()"

    @overload
    def register(
        self,
        key: type[M],
        /,
        argname: None = None,
        *,
        timeout: float | None = None,
        emits: Iterable[object] = (),
        middleware: Iterable[Middleware] = (),
        retry: Retry | None = None,
        **initkwargs: Any,
    ) -> HandlerDecorator[M]: ...
    @overload
    def register(
        self,
        key: str,
        /,
        argname: str | None = None,
        *,
        timeout: float | None = None,
        emits: Iterable[object] = (),
        middleware: Iterable[Middleware] = (),
        retry: Retry | None = None,
        **initkwargs: Any,
    ) -> Callable[[H], H]: ...
    @overload
    def register(
        self,
        key: object,
        /,
        argname: str,
        *,
        timeout: float | None = None,
        emits: Iterable[object] = (),
        middleware: Iterable[Middleware] = (),
        retry: Retry | None = None,
        **initkwargs: Any,
    ) -> Callable[[H], H]: ...
    def register(
        self,
        key: object,
        /,
        argname: str | None = None,
        *,
        timeout: float | None = None,
        emits: Iterable[object] = (),
        middleware: Iterable[Middleware] = (),
        retry: Retry | None = None,
        **initkwargs: Any,
    ) -> Any:
        """Decorator form of `bind`; returns the handler unchanged.

        ::

            @dp.commands.register(CreateUser, repo=repo)
            async def create_user(cmd: CreateUser, repo: Repo) -> UserCreated: ...

        For the type checker, a function whose first parameter does not accept
        instances of the key's class is an error (unless `argname` names another
        parameter); classes and objects with `handle` are checked at runtime.
        Raises `ImproperlyConfigured` at once when used without the key
        (`@register` instead of `@register(Key)`) or given the handler
        (`register(Key, handler)`, which is `bind`).
        """
        router = f"dp.{ROUTERS[self.kind]}"
        if not isinstance(key, type | str) and callable(key):
            name = callable_name(key)
            raise ImproperlyConfigured(
                f"@{router}.register needs the message key: write @{router}.register(SomeMessage) "
                f"above {name}; used without it, it would register nothing"
            )
        if argname is not None and not isinstance(argname, str):
            name = callable_name(argname)
            raise ImproperlyConfigured(
                f"{router}.register({key_name(key)}, {name}) does not register {name}: register(Key) "
                "makes a decorator; to register a handler directly, call "
                f"{router}.bind({key_name(key)}, {name})"
            )

        def decorator(handler: H) -> H:
            self._unapplied.pop(decorator, None)
            bind_any(
                self, key, handler, argname=argname, timeout=timeout, emits=emits,
                middleware=middleware, retry=retry, **initkwargs,
            )  # fmt: skip
            return handler

        # Checked at start(): `@register` written without the key above a class takes
        # the class for the key and registers nothing (see check_applied).
        self._unapplied[decorator] = key
        return decorator

    def check_applied(self) -> None:
        """Raise `ImproperlyConfigured` if a decorator made by `register` was never applied
        (called by `start()`, before anything is frozen)."""
        if not self._unapplied:
            return
        router = f"dp.{ROUTERS[self.kind]}"
        key = next(iter(self._unapplied.values()))
        name = key_name(key)
        if isinstance(key, type) and callable(getattr(key, "handle", None)):
            raise ImproperlyConfigured(
                f"@{router}.register was written without the message key above the class {name}, "
                f"which looks like a handler: nothing was registered; write @{router}.register(SomeMessage)"
            )
        raise ImproperlyConfigured(
            f"{router}.register({name}) made a decorator that was never applied to a handler, so "
            f"nothing was registered for {name}; write @{router}.register({name}) right above the "
            f"handler, or call {router}.bind({name}, handler)"
        )

    def handle(self, message: object, /, *args: object, **kwargs: object) -> NoReturn:
        """Not a pybus call: iambus's `dp.events.handle(...)` is `dp.publish(...)` here."""
        call = {"event": "publish", "command": "execute", "query": "query"}[self.kind]
        raise ComingFromIambus(
            f"pybus routers do not handle messages: the dispatcher does, and the call says the kind. "
            f"Use await dp.{call}({self.kind}) (dp.send(message, key=...) for the background "
            "workers); see docs/coming-from-iambus.md"
        )

    @overload
    def bind(
        self,
        key: type[M],
        /,
        handler: Callable[Concatenate[M, P], Any] | Callable[[], Any] | type[Any] | SupportsHandle,
        argname: None = None,
        *,
        timeout: float | None = None,
        emits: Iterable[object] = (),
        middleware: Iterable[Middleware] = (),
        retry: Retry | None = None,
        **initkwargs: Any,
    ) -> Handler: ...
    @overload
    def bind(
        self,
        key: str,
        /,
        handler: object,
        argname: str | None = None,
        *,
        timeout: float | None = None,
        emits: Iterable[object] = (),
        middleware: Iterable[Middleware] = (),
        retry: Retry | None = None,
        **initkwargs: Any,
    ) -> Handler: ...
    @overload
    def bind(
        self,
        key: object,
        /,
        handler: object,
        argname: str,
        *,
        timeout: float | None = None,
        emits: Iterable[object] = (),
        middleware: Iterable[Middleware] = (),
        retry: Retry | None = None,
        **initkwargs: Any,
    ) -> Handler: ...
    def bind(
        self,
        key: object,
        /,
        handler: object,
        argname: str | None = None,
        *,
        timeout: float | None = None,
        emits: Iterable[object] = (),
        middleware: Iterable[Middleware] = (),
        retry: Retry | None = None,
        **initkwargs: Any,
    ) -> Handler:
        """Register `handler` for messages whose key is `key` and return the inspected registration.

        `key` is a class (its instances are the messages) or a string (the
        message is that string). `handler` may be passed by keyword, as iambus
        code does (`bind(Key, handler=f)`), so no value can be bound to a
        parameter named `handler`. `argname` names the parameter that receives the
        message when it is not the first. `timeout` (seconds) cancels a handling
        that runs longer (default: the dispatcher's `default_timeout`). `emits`
        declares the message types the handler returns, collects or sends, for
        `pybus graph` (return annotations are read too). `middleware` wraps
        this handler only, inside the dispatcher's and the router's. `retry` (a
        `pybus.Retry`) is this handler's retry policy, instead of the router's or
        the dispatcher's. A parameter annotated `HandlingContext` receives the
        current handling context at each call. The other
        keyword arguments are bound values: passed to `__init__` for a class
        handler, to each call otherwise.

        Raises `DispatcherFrozen` after `start()`, `ImproperlyConfigured` for a
        key or handler that cannot work, `HandlerSignatureError` for parameters
        the registration does not satisfy and `HandlerAlreadyRegistered` for a
        duplicate.
        """
        self._check_open(callable_name(handler), key)
        _check_key(self.kind, key)
        if "response_event" in initkwargs:
            raise ComingFromIambus(
                f"bind({key_name(key)}, {callable_name(handler)}, response_event=...) is iambus's: in "
                "pybus every value a handler returns (not None) is published as a follow-up event, so "
                "drop response_event= and return the event"
            )
        other = self.dispatcher.registered_kind(key)
        if other is not None and other != self.kind:
            raise ImproperlyConfigured(
                f"Cannot register {callable_name(handler)} for {self.kind} {key_name(key)}: "
                f"{key_name(key)} is already registered as {with_article(other)}; a message key "
                "belongs to one kind, so give the two roles their own message classes"
            )
        registration = self.inspect(
            key, handler, argname, timeout=timeout, emits=emits, middleware=middleware, retry=retry,
            **initkwargs,
        )  # fmt: skip
        self._add(registration)
        return registration

    def inspect(
        self,
        key: object,
        handler: object,
        argname: str | None = None,
        *,
        timeout: float | None = None,
        emits: Iterable[object] = (),
        middleware: Iterable[Middleware] = (),
        retry: Retry | None = None,
        **initkwargs: Any,
    ) -> Handler:
        """Check `handler` for `key` as `bind` does, without registering it (for `override_handler`)."""
        # Parameters annotated with a provided type (dp.provide) or Annotated[T, provider]
        # are bound as if given by name; what is given by name wins.
        initkwargs = {**by_type(handler, argname, self.dispatcher.provided, initkwargs), **initkwargs}
        registration = inspect_handler(
            self.kind,
            key,
            handler,
            argname,
            initkwargs,
            check_init=self.dispatcher.handler_factory is None,
            timeout=timeout,
            emits=emits,
            middleware=checked(middleware, f"{self.kind} {key_name(key)}"),
            retry=checked_retry(retry, f"{self.kind} {key_name(key)}"),
        )
        self.dispatcher.resolver.adopt(initkwargs)
        return registration

    def _add(self, handler: Handler) -> None:
        raise NotImplementedError

    def _check_open(self, what: str, key: object, target: str | None = None) -> None:
        if self._closed:
            raise DispatcherClosed(
                self.kind,
                key,
                text=f"Cannot register {what}: the dispatcher was stopped; register on a new Dispatcher",
            )
        if self._frozen:
            raise DispatcherFrozen(self.kind, key, what, target=target)

    def close(self) -> None:
        """Refuse every registration from now on (the dispatcher was stopped before it started)."""
        self._closed = True

    def add_middleware(self, *middleware: Middleware) -> None:
        """Wrap every handler of this kind in `middleware` (inside the dispatcher's,
        outside each registration's; in the order added). Raises `DispatcherFrozen`
        after `start()`."""
        names = ", ".join(callable_name(mw) for mw in middleware)
        if self._frozen or self._closed:
            self._check_open(f"middleware {names}", None, target=f"every {self.kind}")
        self._middleware += checked(middleware, f"every {self.kind}")

    @property
    def middleware(self) -> tuple[Middleware, ...]:
        """This router's middleware, outermost first."""
        return self._middleware

    @property
    def retry(self) -> Retry | None:
        """The retry policy of this router's handlers that set none of their own
        (None: the dispatcher's). Settable until `start()`."""
        return self._retry

    @retry.setter
    def retry(self, policy: Retry | None) -> None:
        if self._frozen or self._closed:
            self._check_open(f"retry policy {policy}", None, target=f"every {self.kind}")
        self._retry = checked_retry(policy, f"every {self.kind}")

    def compile_plan(self, handler: Handler) -> CallPlan:
        """The call plan of a registration: its timeout (or the dispatcher's default),
        inside the dispatcher's, this router's and its own middleware, with the
        closest retry policy."""
        settings = self._settings
        timeout = handler.timeout if handler.timeout is not None else settings.default_timeout
        plan = compile_handler(
            handler, self.dispatcher.resolver, settings.handler_factory, timeout, self.dispatcher.send
        )
        plan = with_middleware(plan, self.middleware_for(handler))
        policy = self.retry_for(handler)
        return plan if policy is None else plan.with_retry(policy)

    def retry_for(self, handler: Handler) -> Retry | None:
        """The retry policy of a registration: its own, else this router's, else the dispatcher's."""
        if handler.retry is not None:
            return handler.retry
        if self._retry is not None:
            return self._retry
        return self._settings.retry if self._frozen else self.dispatcher.retry

    def middleware_for(self, handler: Handler) -> tuple[Middleware, ...]:
        """The middleware around a registration, outermost first: the dispatcher's,
        this router's, then its own."""
        outer: tuple[Middleware, ...] = (
            self._settings.middleware if self._frozen else self.dispatcher.middleware
        )
        return (*outer, *self._middleware, *handler.middleware)

    def _freeze(self, settings: Settings, forwarder: Forwarder | None) -> None:
        self._frozen = True
        self._settings = settings
        self._forwarder = forwarder

    async def send(self, message: object, /, *, key: object = None) -> None:
        """Queue `message` for the background workers and return once it is queued.

        Waits while the queue is full. Messages with the same `key` are handled
        one at a time, in the order sent. Raises `DispatcherNotStarted` before
        `start()`, `DispatcherClosed` once stopping, and `HandlerNotFound` (now,
        not in a worker) for a command or query without a handler.
        """
        forwarder = self._forwarder
        if forwarder is not None and message_key(message) in forwarder.keys:
            await forwarder.forward(message)  # a routed message goes to the transport
            return
        engine = self.engine
        if engine is None:
            engine = self._started_engine(message)  # raises
        if message.__class__ not in self._sendable:
            self._check_sendable(engine, message, self._send_call)
        workers = engine.workers
        if not workers.put_if_room(message, key):
            await workers.send(message, key)

    def send_nowait(self, message: object, /, *, key: object = None) -> None:
        """Like `send`, but raises `QueueFull` instead of waiting for room."""
        if self.routes_message(message):
            raise ImproperlyConfigured(
                f"{key_name(message_key(message))} is routed to the transport, which send_nowait "
                "cannot wait for: use await send()"
            )
        engine = self._started_engine(message)
        if message.__class__ not in self._sendable:
            self._check_sendable(engine, message, self._send_nowait_call)
        engine.workers.send_nowait(message, key)

    def _check_sendable(self, engine: E, message: object, call: str) -> None:
        engine.check(message, call)
        if not isinstance(message, str):
            self._sendable.add(message.__class__)  # checked once per class (the maps are frozen)

    def routes_message(self, message: object) -> bool:
        """True when `message` goes to the transport instead of this process's engine."""
        forwarder = self._forwarder
        return forwarder is not None and message_key(message) in forwarder.keys

    #: Built by `freeze()`.
    engine: E | None = None

    def _started_engine(self, message: object) -> E:
        engine = self.engine
        if engine is None:
            if self._closed:
                raise DispatcherClosed(self.kind, message)
            raise DispatcherNotStarted(self.kind, message)
        return engine

    @property
    def handlers(self) -> Mapping[object, tuple[Handler, ...]]:
        """A read-only view of the registrations, by key, in registration order."""
        return MappingProxyType({key: tuple(found) for key, found in self._handlers.items()})

    @property
    def frozen(self) -> bool:
        """True once `start()` has frozen this router's handler map."""
        return self._frozen

    def __contains__(self, key: object) -> bool:
        return key in self._handlers


class EventRouter(_Router[EventEngine]):
    """Registers event handlers: any number per key, matched along the class MRO."""

    engine_cls: ClassVar[type[EventEngine]] = EventEngine

    def _add(self, handler: Handler) -> None:
        found = self._handlers.setdefault(handler.key, [])
        for existing in found:
            if existing.target is handler.target:
                raise HandlerAlreadyRegistered(self.kind, handler.key, str(existing), str(handler))
        found.append(handler)

    def freeze(
        self,
        settings: Settings,
        supervisor: Supervisor,
        *,
        foreign: Mapping[object, Kind],
        forwarder: Forwarder | None = None,
    ) -> EventEngine:
        """Freeze the map and build the engine with the dispatcher's `settings`;
        `foreign` are the keys of the other kinds, `forwarder` writes the routed ones."""
        self._freeze(settings, forwarder)
        plans = {key: tuple(self.compile_plan(h) for h in found) for key, found in self._handlers.items()}
        self.engine = self.engine_cls(
            plans, settings=settings, supervisor=supervisor, foreign=foreign, forwarder=forwarder
        )
        return self.engine


class RequestRouter(_Router[RequestEngine]):
    """Registers command or query handlers: exactly one per key, matched by exact key."""

    engine_cls: ClassVar[type[RequestEngine]] = RequestEngine

    def _add(self, handler: Handler) -> None:
        found = self._handlers.get(handler.key)
        if found:
            raise HandlerAlreadyRegistered(self.kind, handler.key, str(found[0]), str(handler))
        self._handlers[handler.key] = [handler]

    def freeze(
        self,
        settings: Settings,
        supervisor: Supervisor,
        *,
        events: EventEngine,
        foreign: Mapping[object, Kind],
        forwarder: Forwarder | None = None,
    ) -> RequestEngine:
        """Freeze the map and build the engine, which hands follow-up events to `events`;
        `forwarder` writes the routed keys of this kind when they are sent."""
        self._freeze(settings, forwarder)
        plans = {key: self.compile_plan(found[0]) for key, found in self._handlers.items()}
        self.engine = self.engine_cls(
            self.kind, plans, events=events, settings=settings, supervisor=supervisor, foreign=foreign
        )
        return self.engine


def _check_key(kind: Kind, key: object) -> None:
    if key is str:
        raise ImproperlyConfigured(
            f"Cannot register str as a {kind} key: string messages are matched by their "
            "value, so register the string itself, e.g. register('on startup')"
        )
    if not isinstance(key, type | str):
        raise ImproperlyConfigured(
            f"Cannot register {key!r} as a {kind} key: a key is a message class or a "
            "string; pass the class (CreateUser), not an instance (CreateUser(...))"
        )
