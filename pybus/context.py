"""The handling context: which handling is running, its ids, and what a transport delivered.

A leaf module: the engines, the handlers, the middleware and the transports all
use it, and it imports nothing of theirs.

While the dispatcher tracks handlings (decided once, at `start()`), the engines
put a small record in `_current` around every handler call; `current_context()`
wraps it in a `HandlingContext` for whoever asks. With tracking off nothing is
set, and `current_context()` returns None.

A record is a plain tuple, built on the hot path: `(handler, attempt, ids)`.
`handler` is the registration (anything with `kind`, `key`, `name` and
`location`), `attempt` counts the tries of this handler (1, then one more per
retry), and `ids` is shared by every handler of one message:
`(message_id, correlation_id, causation_id, delivery)`. Ids made in this process
are numbers, formatted into strings only when read; ids that came with a
delivery are the transport's strings.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Protocol, TypeAlias

from pybus.errors import Kind, key_name


class Delivery(Protocol):
    """What a transport consumer knows of the message it delivered (a transport's
    `Envelope` is one)."""

    @property
    def attempt(self) -> int: ...

    @property
    def message_id(self) -> str: ...

    @property
    def correlation_id(self) -> str: ...

    @property
    def causation_id(self) -> str | None: ...

    @property
    def headers(self) -> Mapping[str, str]: ...


class Registration(Protocol):
    """What a record says of the handler (a `pybus.handlers.Handler` is one)."""

    @property
    def kind(self) -> Kind: ...

    @property
    def key(self) -> object: ...

    @property
    def name(self) -> str: ...

    @property
    def location(self) -> str: ...


#: (message_id, correlation_id, causation_id, delivery): ids are ints (made here) or strings.
Ids: TypeAlias = tuple[int | str, int | str, int | str | None, Delivery | None]
#: (handler, attempt, ids)
Record: TypeAlias = tuple[Registration, int, Ids]

#: The delivery being handled in this context (set by a transport consumer for its
#: handling, follow-ups included); None outside one.
current_delivery: ContextVar[Delivery | None] = ContextVar("pybus_delivery", default=None)

#: The record of the handling the calling code runs in (only while tracking).
_current: ContextVar[Record | None] = ContextVar("pybus_handling", default=None)

# Message ids: random per process, then a counter (a uuid4 per message costs more
# than the rest of a send); formatted only when read. A process forked from this one
# draws its own prefix: forked workers (gunicorn --preload, multiprocessing) would
# otherwise make the same ids, and a transport that drops duplicates by id would
# drop their messages. The prefix is 128 bits of os.urandom (a uuid4 has 122; the
# uuid module would add itself and platform to `import pybus`).
_PREFIX = f"{os.urandom(16).hex()}-"
_numbers = itertools.count(1)
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


def _new_prefix() -> None:
    global _PREFIX
    _PREFIX = f"{os.urandom(16).hex()}-"


os.register_at_fork(after_in_child=_new_prefix)


def new_number() -> int:
    """A message number unique in this process (`ident` makes it an id)."""
    return next(_numbers)


def ident(value: int | str) -> str:
    """The message id of a number made here, or an id that came from a transport."""
    return value if isinstance(value, str) else f"{_PREFIX}{value:x}"


def child_ids(record: Record | None) -> Ids:
    """The ids of a message sent or returned by the handling of `record` (None: a new root)."""
    if record is None:
        number = next(_numbers)
        return (number, number, None, None)
    return child_of(record[2])


def child_of(parent: Ids) -> Ids:
    """The ids of a message caused by the message with ids `parent`."""
    return (next(_numbers), parent[1], parent[0], parent[3])


def delivered_ids(delivery: Delivery) -> Ids:
    """The ids of a message a transport delivered: its own, from the envelope."""
    return (delivery.message_id, delivery.correlation_id, delivery.causation_id, delivery)


def current_record() -> Record | None:
    """The raw record of the current handling (for pybus's own code)."""
    return _current.get()


class HandlingContext:
    """One handling: which handler runs for which message, and the message's ids.

    - `kind`, `key`, `handler` (its name) and `location` (`file:line`) name the
      registration;
    - `attempt` counts the tries of this handler for this message, from 1 (a
      `Retry` policy adds one per retry);
    - `message_id` is the message's id (every handler of one event sees the
      same), `correlation_id` the id of the first message of its causal tree,
      and `causation_id` the id of the message whose handling sent or returned
      this one (None for a message sent from outside any handling);
    - `delivery` is the transport's delivery count (1 for an in-process
      handling), `headers` what the transport delivered with the message (empty
      in process); both hold for the routed message and the local follow-ups of
      its handling.

    `pybus.current_context()` returns the context of the running handling; a
    handler parameter annotated `HandlingContext` receives it. Two contexts are
    equal when all of the above are.
    """

    __slots__ = ("_record",)

    _record: Record

    def __init__(
        self,
        kind: Kind,
        key: object,
        handler: str,
        *,
        location: str = "<unknown>",
        attempt: int = 1,
        message_id: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        delivery: int = 1,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Build a context by hand, e.g. to call a handler that takes one in a unit test."""
        message_id = message_id if message_id is not None else ident(new_number())
        correlation_id = correlation_id or message_id
        given: Delivery | None = None
        if delivery != 1 or headers:
            given = _Given(delivery, message_id, correlation_id, causation_id, dict(headers or {}))
        ids: Ids = (message_id, correlation_id, causation_id, given)
        self._record = (_Named(kind, key, handler, location), attempt, ids)

    @property
    def kind(self) -> Kind:
        return self._record[0].kind

    @property
    def key(self) -> object:
        return self._record[0].key

    @property
    def handler(self) -> str:
        return self._record[0].name

    @property
    def location(self) -> str:
        return self._record[0].location

    @property
    def attempt(self) -> int:
        return self._record[1]

    @property
    def message_id(self) -> str:
        return ident(self._record[2][0])

    @property
    def correlation_id(self) -> str:
        return ident(self._record[2][1])

    @property
    def causation_id(self) -> str | None:
        cause = self._record[2][2]
        return None if cause is None else ident(cause)

    @property
    def delivery(self) -> int:
        delivery = self._record[2][3]
        return 1 if delivery is None else delivery.attempt

    @property
    def headers(self) -> Mapping[str, str]:
        delivery = self._record[2][3]
        return _NO_HEADERS if delivery is None else delivery.headers

    def _fields(self) -> tuple[object, ...]:
        return (
            self.kind, self.key, self.handler, self.location, self.attempt, self.message_id,
            self.correlation_id, self.causation_id, self.delivery, tuple(sorted(self.headers.items())),
        )  # fmt: skip

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HandlingContext):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            f"<HandlingContext {self} attempt={self.attempt} message_id={self.message_id!r} "
            f"correlation_id={self.correlation_id!r} causation_id={self.causation_id!r}>"
        )

    def __str__(self) -> str:
        return f"{self.kind} {key_name(self.key)} -> {self.handler}"


def wrap(record: Record) -> HandlingContext:
    """The public view of a record."""
    context = object.__new__(HandlingContext)
    context._record = record
    return context


def current_context() -> HandlingContext | None:
    """The context of the handling the calling code runs in: a handler, its
    middleware, code they call, tasks they start, or the error hook reporting its
    failure. None outside a handling, or while the dispatcher does not track
    handlings (see docs/context.md for what turns tracking on)."""
    record = _current.get()
    return None if record is None else wrap(record)


def remember_failure(error: BaseException, record: Record) -> None:
    """Note on `error` the handling it escaped from (the error hook runs in it).

    Each handling it escapes from notes itself over the one before: an error that
    propagates out of a nested `execute` and then out of the handler that awaited
    it belongs to that handler's handling, whose message is the one reported. The
    same exception object raised again later gets its new handling.
    """
    error._pybus_handling = record  # type: ignore[attr-defined]


def failure_record(error: BaseException) -> Record | None:
    """The handling `error` escaped from, if it was tracked."""
    record: Record | None = getattr(error, "_pybus_handling", None)
    return record


class _Named:
    __slots__ = ("key", "kind", "location", "name")

    kind: Kind
    key: object
    name: str
    location: str

    def __init__(self, kind: Kind, key: object, name: str, location: str) -> None:
        self.kind, self.key, self.name, self.location = kind, key, name, location


class _Given:
    __slots__ = ("attempt", "causation_id", "correlation_id", "headers", "message_id")

    def __init__(
        self, attempt: int, message_id: str, correlation_id: str, causation_id: str | None,
        headers: dict[str, str],
    ) -> None:  # fmt: skip
        self.attempt, self.message_id, self.correlation_id = attempt, message_id, correlation_id
        self.causation_id, self.headers = causation_id, MappingProxyType(headers)
