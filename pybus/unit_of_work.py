"""The unit of work: a handling's writes committed together, its events published once committed.

A `UnitOfWork` is made for one handling by a `Factory` provider and injected
into the handler, which does its writes inside `async with uow:` and adds
events (`uow.add_event`) and messages to send (`uow.send`) as it goes. On a
clean exit the unit commits; its events become follow-up events of the
handling (published after the handler returned, with the same cascade,
causation and tracking rules as returned events), its messages are sent to the
background workers. On an exception it rolls back, and nothing is published or
sent. If the handling fails after the commit (the handler raises later, or a
teardown fails), nothing is published either: the writes are committed, the
events are not (a transactional outbox, `pybus.sqlalchemy`, makes them durable
with the writes).

Subclasses connect it to a store: `begin`, `commit` and `rollback` are the
three hooks (the base class keeps nothing, for tests and in-memory stores).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Literal, Self, get_args, get_type_hints

from pybus.errors import ImproperlyConfigured

State = Literal["new", "open", "committed", "rolled back"]


class AlreadyHandled(Exception):
    """Raised by a unit of work's provider when its inbox shows that this handler already
    handled this message: pybus then counts the handling as done, without calling the
    handler (a redelivered message is acknowledged, nothing runs twice)."""


class UnitOfWork:
    """Writes committed together; events and messages released only by the commit.

    Equal events added twice are published once when their class says they may
    be: `class UserCreated(Event, unique=True)`, or a class attribute
    `pybus_unique = True` on any message class (equal means `==`; the event
    must be hashable). Other events are published once per `add_event`.
    """

    def __init__(self) -> None:
        self._state: State = "new"
        self._events: list[object] = []
        self._seen: set[Hashable] = set()
        self._sends: list[tuple[object, object]] = []
        #: Set by the handling that injected this unit (see `pybus.handlers`).
        self._handling: object = None
        self._handler = ""
        self._released: list[object] = []
        self._released_sends: list[tuple[object, object]] = []

    @property
    def state(self) -> State:
        """ "new", "open" (inside `async with`), "committed" or "rolled back"."""
        return self._state

    # -- what a handler calls --------------------------------------------------------

    def add_event(self, event: object) -> None:
        """Publish `event` as a follow-up of this handling once the unit has committed."""
        self._check_open("add_event")
        if getattr(type(event), "pybus_unique", False):
            try:
                seen = event in self._seen
            except TypeError as exc:  # no __hash__, or one that fails (a frozen dataclass with a list)
                raise ImproperlyConfigured(
                    f"{type(event).__name__} is marked unique but its instances are not hashable "
                    f"({exc}); make it a frozen dataclass of hashable fields (tuples, not lists) or "
                    "define __hash__, so that equal events can be found"
                ) from exc
            if seen:
                return
            self._seen.add(event)
        self._events.append(event)

    def send(self, message: object, /, *, key: object = None) -> None:
        """Send `message` to the background workers (`dp.send(message, key=key)`), or to
        the transport for a routed message, once the unit has committed."""
        self._check_open("send")
        self._sends.append((message, key))

    async def __aenter__(self) -> Self:
        if self._handling is None:
            raise ImproperlyConfigured(
                f"{type(self).__name__} was entered outside a handling that it was injected into: "
                "a unit of work belongs to one handling; bind it with a Factory "
                "(register(Key, uow=Factory(make_unit_of_work))) and use the one the handler receives"
            )
        if self._state != "new":
            raise ImproperlyConfigured(
                f"This {type(self).__name__} was already used ({self._state}); a unit of work is "
                "entered once per handling"
            )
        await self.begin()
        self._state = "open"
        return self

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            await self._roll_back()
            return
        try:
            await self.commit()
        except BaseException:
            await self._roll_back()
            raise
        self._state = "committed"
        self._released, self._events = self._events, []
        self._released_sends, self._sends = self._sends, []

    async def _roll_back(self) -> None:
        self._state = "rolled back"
        self._events, self._sends, self._seen = [], [], set()
        await self.rollback()

    def _check_open(self, call: str) -> None:
        if self._state != "open":
            raise ImproperlyConfigured(
                f"uow.{call}() was called outside `async with uow:` (the unit is {self._state}); "
                "add events and messages inside the block, so that they follow its commit"
            )

    # -- hooks for a store ------------------------------------------------------------

    async def begin(self) -> None:
        """Start the store's transaction (nothing here)."""

    async def commit(self) -> None:
        """Make the writes durable (nothing here). Raising rolls the unit back."""

    async def rollback(self) -> None:
        """Undo the writes (nothing here)."""

    # -- for the handling that injected it ---------------------------------------------

    def attach(self, handling: object, handler: str) -> None:
        """Belong to `handling` of `handler` (called by pybus when the unit is injected)."""
        if self._handling is not None and self._handling is not handling:
            raise ImproperlyConfigured(
                f"A {type(self).__name__} was injected into a handling of {handler} but already "
                f"belongs to one of {self._handler}: a unit of work is made per handling; bind it "
                "with a Factory, not a Singleton or a ready value"
            )
        self._handling, self._handler = handling, handler

    def released(self) -> tuple[list[object], list[tuple[object, object]]]:
        """The events and messages its commit released, handed over once."""
        events, sends = self._released, self._released_sends
        self._released, self._released_sends = [], []
        return events, sends


def makes_units(factory: Callable[..., Any]) -> bool:
    """Whether `factory` (a Factory's callable) says it makes a unit of work: it is a
    `UnitOfWork` class, or its return annotation names one (`-> MyUnit`,
    `-> AsyncIterator[MyUnit]` for a generator). Decided once, when plans are compiled."""
    if isinstance(factory, type):
        return issubclass(factory, UnitOfWork)
    try:
        returned = get_type_hints(factory).get("return")
    except Exception:  # an annotation that does not resolve: it says nothing
        return False
    return any(
        isinstance(candidate, type) and issubclass(candidate, UnitOfWork)
        for candidate in (returned, *get_args(returned))
    )


def units_in(values: dict[str, Any], per_handling: frozenset[str]) -> list[UnitOfWork]:
    """The units of work among a handling's injected values; `ImproperlyConfigured` for a
    unit whose parameter is not given one per handling (a Singleton, or a ready value)."""
    found = []
    for name, value in values.items():
        if isinstance(value, UnitOfWork):
            if name not in per_handling:
                raise ImproperlyConfigured(
                    f"The {type(value).__name__} bound to {name!r} is not made per handling (a "
                    "Singleton or a ready value would serve every handling): bind it with a Factory"
                )
            found.append(value)
    return found
