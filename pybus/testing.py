"""Tracked sessions: act, wait for everything the act caused, then assert on it.

::

    async with track(dp) as session:
        await dp.execute(PlaceOrder(7))
    assert session.handled.single(OrderPlaced).order_id == 7

A session records every handling caused by what ran inside its block: inline
`execute`/`query`/`publish`, their follow-up events, messages sent to the
background workers, and whatever those cause in turn. On exit it waits until
all of it is done. Membership is causal, not temporal: the session lives in a
`ContextVar`, which every handling started inside the block inherits (`send`
copies it into the queued message), so work started before the session, or by
another session, is never counted. Waiting is a count of outstanding
handlings, not a poll or an idle timer.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from collections.abc import Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any, Self, TypeVar, overload

from pybus.dispatcher import Dispatcher
from pybus.errors import ACTIVITY_LINES, ImproperlyConfigured, Kind, TrackingTimeout, key_name, message_key
from pybus.handlers import Handler
from pybus.observer import Observer

T = TypeVar("T")

_current: ContextVar[TrackedSession | None] = ContextVar("pybus_tracked_session", default=None)


@dataclass(frozen=True, slots=True)
class Record:
    """One handler's handling of one message (`handler` is None for an event nobody handles)."""

    kind: Kind
    message: Any
    handler: str | None
    result: Any = None
    error: BaseException | None = None


class Records(Sequence[Record]):
    """The records of one outcome, in the order they happened."""

    def __init__(self, outcome: str) -> None:
        self.outcome = outcome
        self._records: list[Record] = []

    @overload
    def __getitem__(self, index: int) -> Record: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Record]: ...
    def __getitem__(self, index: int | slice) -> Record | Sequence[Record]:
        return self._records[index]

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return f"<{self.outcome}: {self._records!r}>"

    def append(self, record: Record) -> None:
        self._records.append(record)

    @property
    def messages(self) -> list[Any]:
        """The distinct messages (an event handled by three handlers appears once), in order."""
        seen: dict[int, Any] = {}
        for record in self._records:
            seen.setdefault(id(record.message), record.message)
        return list(seen.values())

    def of_type(self, cls: type[T]) -> list[T]:
        """The distinct messages that are instances of `cls`, in order."""
        return [message for message in self.messages if isinstance(message, cls)]

    def single(self, cls: type[T]) -> T:
        """The one message of type `cls`; `AssertionError` listing what there is otherwise."""
        found = self.of_type(cls)
        if len(found) != 1:
            everything = ", ".join(repr(message) for message in self.messages) or "nothing"
            raise AssertionError(
                f"Expected exactly one {cls.__qualname__} in session.{self.outcome}, found "
                f"{len(found)}; session.{self.outcome} holds: {everything}"
            )
        return found[0]

    def handlers(self) -> list[str]:
        """The handler names, one per record, in order."""
        return [record.handler or "" for record in self._records]


class TrackedSession:
    """What `track(dp)` returns: an async context manager, or a one-shot runner.

    `handled`, `failed` and `no_handler` hold what happened; `result` is the
    result of a one-shot `execute`/`query`.
    """

    def __init__(self, dispatcher: Dispatcher, timeout: float, allow_errors: bool) -> None:
        self.dispatcher = dispatcher
        self.timeout = timeout
        self.allow_errors = allow_errors
        self.handled = Records("handled")
        self.failed = Records("failed")
        self.no_handler = Records("no_handler")
        self.result: Any = None
        # Per message (by id): what it is, and how many of it wait in a queue, run, or ran
        # from a queue and are not dequeued yet. A queued message that starts running
        # is one handling: it moves from waiting to running.
        self._outstanding: dict[int, _Outstanding] = {}
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._activity: deque[str] = deque(maxlen=ACTIVITY_LINES)
        self._start = time.monotonic()
        self._token: Token[TrackedSession | None] | None = None

    # -- one-shot forms --------------------------------------------------------------

    async def execute(self, command: object) -> Self:
        """Run `dp.execute(command)` in the session, wait for everything it caused, return the session."""
        async with self:
            self.result = await self.dispatcher.execute(command)
        return self

    async def query(self, query: object) -> Self:
        """Like `execute`, for a query."""
        async with self:
            self.result = await self.dispatcher.query(query)
        return self

    async def publish(self, event: object) -> Self:
        """Like `execute`, for an event."""
        async with self:
            await self.dispatcher.publish(event)
        return self

    async def send(self, message: object, *, key: object = None) -> Self:
        """Send `message` to the background workers in the session and wait for all it caused."""
        async with self:
            await self.dispatcher.send(message, key=key)
        return self

    # -- the block -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._token is not None:
            raise ImproperlyConfigured("A tracked session runs once; call track(dp) again for another")
        _hub_of(self.dispatcher).add(self)
        self._token = _current.set(self)
        self._start = time.monotonic()
        return self

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            if exc is None:
                await self._wait()
        finally:
            if self._token is not None:
                _current.reset(self._token)
            _hub_of(self.dispatcher).remove(self)
        if exc is None and self.failed and not self.allow_errors:
            errors = [record.error for record in self.failed if record.error is not None]
            # A BaseExceptionGroup is an ExceptionGroup unless a handler failed with
            # CancelledError (raised, or its own task cancelled).
            raise BaseExceptionGroup(
                f"{len(errors)} handler(s) failed during the tracked session; open it with "
                "track(dp, allow_errors=True) to assert on failures instead",
                errors,
            )

    async def _wait(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._idle.wait()
        except TimeoutError:
            outstanding = [line for entry in self._outstanding.values() for line in entry.lines()]
            raise TrackingTimeout(self.timeout, outstanding, list(self._activity)) from None

    # -- what the hub reports ----------------------------------------------------

    def _log(self, text: str) -> None:
        self._activity.append(f"+{time.monotonic() - self._start:.3f}s {text}")

    def begin(self, kind: Kind, message: object, how: str) -> None:
        self._pending += 1
        self._idle.clear()
        entry = self._outstanding.get(id(message))
        if entry is None:
            entry = self._outstanding[id(message)] = _Outstanding(f"{kind} {message!r}")
        if how == "queued":
            entry.waiting += 1
        else:
            if entry.waiting:
                entry.waiting -= 1
                entry.from_queue += 1
            entry.running += 1
        self._log(f"{how} {kind} {_name(message)}")

    def end(self, kind: Kind, message: object, how: str) -> None:
        entry = self._outstanding.get(id(message))
        if entry is not None:
            if how == "finished":
                entry.running -= 1
            elif entry.from_queue:
                entry.from_queue -= 1
            else:
                entry.waiting -= 1  # dropped unstarted (the dispatcher stopped)
            if not (entry.waiting or entry.running or entry.from_queue):
                del self._outstanding[id(message)]
        self._log(f"{how} {kind} {_name(message)}")
        self._pending -= 1
        if self._pending == 0:
            self._idle.set()

    def record(self, outcome: Records, record: Record) -> None:
        outcome.append(record)
        by = f" by {record.handler}" if record.handler else ""
        self._log(f"{outcome.outcome} {record.kind} {_name(record.message)}{by}")


@dataclass(slots=True)
class _Outstanding:
    line: str
    waiting: int = 0
    running: int = 0
    from_queue: int = 0

    def lines(self) -> list[str]:
        return [f"{self.line} (running)"] * self.running + [f"{self.line} (queued)"] * self.waiting


def _name(message: object) -> str:
    return key_name(message_key(message))


class _Hub(Observer):
    """The one observer of a dispatcher, handing each report to the session in context."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.sessions: set[TrackedSession] = set()

    def add(self, session: TrackedSession) -> None:
        if not self.sessions:
            self.dispatcher.attach_observer(self)
        self.sessions.add(session)

    def remove(self, session: TrackedSession) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self.dispatcher.detach_observer()

    def _session(self) -> TrackedSession | None:
        session = _current.get()
        return session if session in self.sessions else None

    def started(self, kind: Kind, message: object) -> None:
        if session := self._session():
            session.begin(kind, message, "running")

    def finished(self, kind: Kind, message: object) -> None:
        if session := self._session():
            session.end(kind, message, "finished")

    def queued(self, kind: Kind, message: object) -> None:
        if session := self._session():
            session.begin(kind, message, "queued")

    def dequeued(self, kind: Kind, message: object) -> None:
        if session := self._session():
            session.end(kind, message, "dequeued")

    def handled(self, kind: Kind, message: object, handler: Handler, result: Any) -> None:
        if session := self._session():
            session.record(session.handled, Record(kind, message, handler.name, result))

    def failed(self, kind: Kind, message: object, handler: Handler, error: BaseException) -> None:
        if session := self._session():
            session.record(session.failed, Record(kind, message, handler.name, error=error))

    def no_handler(self, message: object) -> None:
        if session := self._session():
            session.record(session.no_handler, Record("event", message, None))


_hubs: weakref.WeakKeyDictionary[Dispatcher, _Hub] = weakref.WeakKeyDictionary()


def _hub_of(dispatcher: Dispatcher) -> _Hub:
    hub = _hubs.get(dispatcher)
    if hub is None:
        hub = _hubs[dispatcher] = _Hub(dispatcher)
    return hub


def track(dispatcher: Dispatcher, timeout: float = 5.0, allow_errors: bool = False) -> TrackedSession:
    """A session that records and waits for everything caused inside it.

    `async with track(dp) as session: ...`, or one-shot:
    `session = await track(dp).execute(cmd)`. On exit it waits (at most
    `timeout` seconds, else `TrackingTimeout` naming what is outstanding) and
    then raises an `ExceptionGroup` of the handler failures, unless
    `allow_errors`. The dispatcher must be started.
    """
    return TrackedSession(dispatcher, timeout, allow_errors)
