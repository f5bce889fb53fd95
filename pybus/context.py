"""The handling context: which handling is running, and what a transport delivered.

A leaf module: the engines, the handlers, the middleware and the transports all
use it, and it imports nothing of theirs. A transport consumer puts what it knows
of a delivery (its attempt and ids) in `current_delivery` when it starts a
handling; the in-process core reads it from there, without knowing transports.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

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


#: The delivery being handled in this context (set by a transport consumer for its
#: handling, follow-ups included); None outside one.
current_delivery: ContextVar[Delivery | None] = ContextVar("pybus_delivery", default=None)


@dataclass(frozen=True, slots=True)
class HandlingContext:
    """Which handling a middleware wraps: its kind, key and handler.

    `attempt` is the delivery count when the handling runs in a transport
    consumer (for the routed message and for the local follow-ups of its
    handling), else 1. `message_id`, `correlation_id` and `causation_id` are
    the ids of the delivery (`current_delivery`), and None for a handling that
    did not come from a transport.
    """

    kind: Kind
    key: object
    handler: str
    location: str

    @property
    def attempt(self) -> int:
        delivery = current_delivery.get()
        return 1 if delivery is None else delivery.attempt

    @property
    def message_id(self) -> str | None:
        delivery = current_delivery.get()
        return None if delivery is None else delivery.message_id

    @property
    def correlation_id(self) -> str | None:
        delivery = current_delivery.get()
        return None if delivery is None else delivery.correlation_id

    @property
    def causation_id(self) -> str | None:
        delivery = current_delivery.get()
        return None if delivery is None else delivery.causation_id

    def __str__(self) -> str:
        return f"{self.kind} {key_name(self.key)} -> {self.handler}"
