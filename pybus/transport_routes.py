"""Transport routes: which messages leave this process, and how they come back.

`Dispatcher.route(Key)` adds a route. At `start()` each router gets a
`Forwarder` for its routed keys, so that publishing or sending a routed message
(follow-up events included) writes an `Envelope` to the transport instead of
handling it here. `consumer()` builds the `Consumer` that reads the routed
messages this process has handlers for.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

from pybus.context import child_ids, current_record, ident
from pybus.errors import ImproperlyConfigured, Kind
from pybus.handlers import Handler, route_record
from pybus.messages import Command, Query
from pybus.workers import Supervisor

# Every dispatcher has a `Routing`, but the codec, the consumer and the transport's
# types are needed only once a route exists: their modules load then (see `add`,
# `forwarders` and `consumer`), so `import pybus` loads none of them.
if TYPE_CHECKING:
    from pybus.codec import JsonCodec
    from pybus.consumer import Consumer
    from pybus.engines import EventEngine, RequestEngine
    from pybus.transport import NO_HEADERS, Envelope, Transport


class Forwarder:
    """The routed keys of one kind, and the function that writes such a message to the transport.

    Nothing changes a forwarder once made (its attributes are `Final` to the type checkers).
    """

    # A plain class rather than a dataclass, for the cost of `import pybus` (see `pybus.settings`).
    __slots__ = ("forward", "handlers", "keys")

    #: The routed keys: those of `handlers`.
    keys: Final[frozenset[object]]
    forward: Final[Callable[[object], Awaitable[None]]]
    #: Per routed key, the registration-like record the engines name the transport by.
    handlers: Final[Mapping[object, Handler]]

    def __init__(
        self, forward: Callable[[object], Awaitable[None]], handlers: Mapping[object, Handler]
    ) -> None:
        self.keys = frozenset(handlers)
        self.forward = forward
        self.handlers = handlers


def route_kind(key: object, kinds: Mapping[object, Kind]) -> Kind:
    """The kind a route without `kind=` travels as: the kind its key is registered under
    here, else what its class says (a `Command[R]` or `Query[R]`), else "event"."""
    registered = kinds.get(key)
    if registered is not None:
        return registered
    if isinstance(key, type) and issubclass(key, Command):
        return "command"
    if isinstance(key, type) and issubclass(key, Query):
        return "query"
    return "event"


class Routing:
    """The transport routes of one dispatcher and the transport they lead to."""

    def __init__(self, transport: Transport | None, supervisor: Supervisor) -> None:
        self.transport = transport
        self.routes: dict[object, tuple[str, Kind | None]] = {}
        self.codec: JsonCodec | None = None
        self._supervisor = supervisor
        self._handlers: set[Handler] = set()
        self._kinds: dict[object, Kind] = {}
        #: Called with the headers of each envelope sent, to add to them (e.g. the
        #: OpenTelemetry trace context); in the sender's context.
        self.outgoing: list[Callable[[dict[str, str]], None]] = []

    def add(self, key: object, name: str | None, kind: Kind | None) -> None:
        if key is str or not isinstance(key, type | str):
            raise ImproperlyConfigured(f"Cannot route {key!r}: a route is a message class or a string")
        from pybus.codec import default_name

        self.routes[key] = (name or default_name(key), kind)

    def forwarders(self, kinds: Mapping[object, Kind]) -> dict[Kind, Forwarder]:
        """The forwarder of each kind that has routed keys (built once, at `start()`).

        `kinds` maps the registered keys to their kind; a route takes the kind given
        to `route()`, else `route_kind`.
        """
        if not self.routes:
            return {}
        if self.transport is None:
            raise ImproperlyConfigured(
                "Messages are routed with dp.route(), but the dispatcher has no transport: "
                "pass Dispatcher(transport=...)"
            )
        # Bound here, once, for envelope(), which runs per routed message and only after
        # this (it needs the codec made here): an import there would cost every send.
        global Envelope, NO_HEADERS
        from pybus.codec import JsonCodec
        from pybus.transport import NO_HEADERS, Envelope

        self.codec = JsonCodec({key: name for key, (name, _) in self.routes.items()})
        self._kinds = {key: given or route_kind(key, kinds) for key, (_, given) in self.routes.items()}
        found: dict[Kind, Forwarder] = {}
        for kind in ("event", "command", "query"):
            keys = [key for key, routed_as in self._kinds.items() if routed_as == kind]
            if keys:
                forward = functools.partial(self.forward, kind)
                handlers = {key: route_record(kind, forward, "transport", key) for key in keys}
                self._handlers.update(handlers.values())
                found[kind] = Forwarder(forward, handlers)
        return found

    async def forward(self, kind: Kind, message: object) -> None:
        """Write `message` to the transport, as a consequence of the handling in progress, if any.

        Refused with `DispatcherClosed` once the dispatcher stops taking messages
        (from outside a background handling while it drains, from anywhere after).
        """
        supervisor = self._supervisor
        if supervisor.closing:
            supervisor.check_open(kind, message)
        transport = self.transport
        if transport is None:  # pragma: no cover - forwarders() sets it with the routes
            raise ImproperlyConfigured("No transport is attached")
        await transport.send(self.envelope(kind, message))

    def envelope(self, kind: Kind, message: object) -> Envelope:
        """The envelope of a routed `message`: encoded, with its ids (a child of the handling
        in progress, if any) and the headers the header sources add."""
        codec = self.codec
        if codec is None:
            raise ImproperlyConfigured(
                f"{message!r} cannot be put in an envelope: no route was compiled (route it with "
                "dp.route() before dp.start())"
            )
        record = current_record()
        if record is not None and record[0] in self._handlers:
            ids = record[2]  # published by an engine, which gave the message its ids
        else:
            ids = child_ids(record)  # sent: a child of the handling it is sent from, if any
        headers: dict[str, str] = {}
        for add in self.outgoing:
            if add(headers) is not None:
                raise ImproperlyConfigured(
                    f"The header source {add!r} returned a value: a header source adds strings to the "
                    "dict it is given and returns None (an async function cannot be one)"
                )
        for name, value in headers.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise ImproperlyConfigured(
                    f"A header source added {name!r}: {value!r} to the headers of {codec.name_of(message)}; "
                    "headers are strings (a transport carries them as text): convert the value with str()"
                )
        return Envelope(
            kind=kind,
            name=codec.name_of(message),
            body=codec.encode(message),
            message_id=ident(ids[0]),
            correlation_id=ident(ids[1]),
            causation_id=None if ids[2] is None else ident(ids[2]),
            headers=MappingProxyType(dict(headers)) if headers else NO_HEADERS,
        )

    def kind_of(self, key: object) -> Kind:
        """The kind a routed key travels as (known once `forwarders()` ran)."""
        return self._kinds[key]

    def consumer(
        self,
        engines: tuple[EventEngine, RequestEngine, RequestEngine],
        *,
        concurrency: int,
        prefetch: int,
        max_deliveries: int,
        wait: float,
    ) -> Consumer:
        """A consumer of the routed messages that have a handler in this process."""
        if self.transport is None or self.codec is None:
            raise ImproperlyConfigured(
                "Nothing to consume: route messages with dp.route() and pass Dispatcher(transport=...)"
            )
        from pybus.consumer import Consumer

        events, commands, queries = engines
        names = [
            name
            for key, (name, _) in self.routes.items()
            if commands.has_handler(key) or queries.has_handler(key) or events.local_plans(key)
        ]
        return Consumer(
            self.transport,
            self.codec,
            {"event": events.deliver, "command": commands.deliver, "query": queries.deliver},
            names,
            supervisor=self._supervisor,
            concurrency=concurrency,
            prefetch=prefetch,
            max_deliveries=max_deliveries,
            wait=wait,
        )
