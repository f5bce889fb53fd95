"""The transport seam: how routed messages leave one process and reach another.

A `Transport` moves `Envelope`s: `send` one, `receive` a batch for this
consumer, then `ack` each handled one, `retry` a failed one (it comes back
with a higher `attempt`), `release` one that was not handled because the
consumer stopped (it comes back with the same `attempt`), or `dead_letter`
one that must not come back.
`InMemoryTransport` is the implementation for tests and single-process
setups; broker transports (Redis Streams) implement the same five methods.

Delivery through a transport is at least once: an envelope is acked only
after its handling, follow-ups included, succeeded, so a crash between the
handling and the ack hands it to someone else again. Handlers of routed
messages should therefore be idempotent, or check `message_id`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Self

from pybus.errors import Kind

#: The headers of an envelope that has none.
NO_HEADERS: Mapping[str, str] = MappingProxyType({})


@dataclass(slots=True, eq=False)
class Envelope:
    """A message on its way: what it is, its ids, and how often it was delivered.

    `correlation_id` is the id of the first message of the causal chain,
    `causation_id` the id of the message whose handling sent this one (None
    for a message sent from outside any handling). `headers` are strings the
    transport carries with the message (e.g. the OpenTelemetry trace context);
    the consumer shows them in the handling context. `receipt` is the
    transport's own handle for `ack`/`retry`/`dead_letter`.

    Treat it as read-only (a transport makes a new one with
    `dataclasses.replace`); it is not frozen because one is made for every
    message sent and received, and a frozen dataclass takes five times as long
    to build.
    """

    kind: Kind
    name: str
    body: bytes
    message_id: str
    correlation_id: str
    causation_id: str | None = None
    attempt: int = 1
    receipt: object = None
    headers: Mapping[str, str] = field(default_factory=lambda: NO_HEADERS)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An envelope that will not be delivered again, and why."""

    envelope: Envelope
    reason: str


class Transport:
    """Base class of transports. Subclasses implement the five coroutine methods.

    Use one as an async context manager (`aclose` on exit) or call `aclose()`.
    """

    async def send(self, envelope: Envelope) -> str:
        """Write `envelope` for every consumer group; return the transport's id for it."""
        raise NotImplementedError

    async def receive(self, names: Sequence[str], *, max_count: int, wait: float) -> list[Envelope]:
        """Up to `max_count` envelopes of the named messages for this consumer, waiting at
        most `wait` seconds for one."""
        raise NotImplementedError

    async def ack(self, envelope: Envelope) -> None:
        """The handling of `envelope` succeeded: it is not delivered again."""
        raise NotImplementedError

    async def retry(self, envelope: Envelope, error: BaseException) -> None:
        """The handling failed: deliver it again (with `attempt` one higher)."""
        raise NotImplementedError

    async def dead_letter(self, envelope: Envelope, reason: str) -> None:
        """Stop delivering `envelope` and keep it, with `reason`, among the dead letters."""
        raise NotImplementedError

    async def release(self, envelope: Envelope) -> None:
        """Give back an envelope whose handling did not fail: it never started, or a shutdown
        cancelled it. It is delivered again, here or to another consumer, and this delivery
        does not count as an attempt (the next one has the same `attempt`).

        The default calls `retry`, which counts it; transports should override it.
        """
        await self.retry(envelope, asyncio.CancelledError())

    async def flush(self) -> None:
        """Make buffered outcomes (acks) durable now; nothing to do by default."""

    async def aclose(self) -> None:
        """Release connections; nothing to do by default."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


@dataclass
class _Group:
    """One consumer group's view of one stream: where it reads, what it has in hand."""

    position: int = 0
    again: deque[tuple[int, int]] = field(default_factory=deque)  # (entry number, deliveries so far)
    pending: dict[int, int] = field(default_factory=dict)  # entry number -> deliveries


class InMemoryBroker:
    """The shared state of `InMemoryTransport`s: a stream per message name, a cursor per
    group and stream, and the dead letters."""

    def __init__(self) -> None:
        self.streams: dict[str, list[Envelope]] = {}
        self.groups: dict[tuple[str, str], _Group] = {}
        self.dead_letters: list[DeadLetter] = []
        self._arrived = asyncio.Event()

    def append(self, envelope: Envelope) -> int:
        stream = self.streams.setdefault(envelope.name, [])
        stream.append(replace(envelope, receipt=(envelope.name, len(stream) + 1)))
        self.notify()
        return len(stream)

    def notify(self) -> None:
        """Wake every consumer waiting for something to read."""
        self._arrived.set()
        self._arrived = asyncio.Event()

    def group(self, group: str, stream: str) -> _Group:
        # A group starts at the beginning of a stream, like a Redis group created
        # with id 0: it misses nothing that is still kept.
        return self.groups.setdefault((group, stream), _Group())

    async def wait(self, seconds: float) -> None:
        arrived = self._arrived
        try:
            async with asyncio.timeout(seconds):
                await arrived.wait()
        except TimeoutError:
            pass


class InMemoryTransport(Transport):
    """A transport inside one process, with the delivery rules of a broker.

    Transports that share a `broker` see the same streams (one per message
    name); each `group` (a service) receives every message once, shared among
    its consumers; a failed message returns to its group with a higher `attempt`.
    """

    def __init__(self, broker: InMemoryBroker | None = None, *, group: str = "default") -> None:
        self.broker = broker if broker is not None else InMemoryBroker()
        self.group_name = group

    async def send(self, envelope: Envelope) -> str:
        return f"{envelope.name}-{self.broker.append(envelope)}"

    async def receive(self, names: Sequence[str], *, max_count: int, wait: float) -> list[Envelope]:
        envelopes = self._take(names, max_count)
        if not envelopes and wait > 0:
            await self.broker.wait(wait)
            envelopes = self._take(names, max_count)
        return envelopes

    def _take(self, names: Sequence[str], max_count: int) -> list[Envelope]:
        taken: list[Envelope] = []
        for name in names:
            group = self.broker.group(self.group_name, name)
            while group.again and len(taken) < max_count:
                number, deliveries = group.again.popleft()
                taken.append(self._deliver(group, name, number, deliveries + 1))
            stream = self.broker.streams.get(name, [])
            while group.position < len(stream) and len(taken) < max_count:
                group.position += 1
                taken.append(self._deliver(group, name, group.position, 1))
        return taken

    def _deliver(self, group: _Group, name: str, number: int, deliveries: int) -> Envelope:
        group.pending[number] = deliveries
        return replace(self.broker.streams[name][number - 1], attempt=deliveries)

    async def ack(self, envelope: Envelope) -> None:
        group, number = self._locate(envelope)
        group.pending.pop(number, None)

    async def retry(self, envelope: Envelope, error: BaseException) -> None:
        self._hand_back(envelope, counted=True)

    async def release(self, envelope: Envelope) -> None:
        self._hand_back(envelope, counted=False)

    def _hand_back(self, envelope: Envelope, *, counted: bool) -> None:
        group, number = self._locate(envelope)
        if group.pending.pop(number, None) is None:
            return  # acked or handed back already: as on a broker, it is not handed out again
        group.again.append((number, envelope.attempt if counted else envelope.attempt - 1))
        self.broker.notify()

    async def dead_letter(self, envelope: Envelope, reason: str) -> None:
        group, number = self._locate(envelope)
        group.pending.pop(number, None)
        self.broker.dead_letters.append(DeadLetter(envelope, reason))

    def _locate(self, envelope: Envelope) -> tuple[_Group, int]:
        receipt = envelope.receipt
        assert isinstance(receipt, tuple)  # (stream name, entry number), set by this transport
        name, number = receipt
        return self.broker.group(self.group_name, name), number
