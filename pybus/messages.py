"""Optional base classes that give messages a type the checker can follow.

Any object can be a message; these bases only add typing. A `Command[R]` or
`Query[R]` tells mypy and pyright that `await dp.execute(cmd)` or
`await dp.query(q)` returns `R`::

    @dataclass(frozen=True, slots=True)
    class GetUser(Query[User]):
        user_id: int

    user = await dp.query(GetUser(7))   # User, for the type checker

The bases define no fields and empty `__slots__`, so they cost nothing at
runtime and work with `dataclass(slots=True)`, pydantic and msgspec models.
"""

from __future__ import annotations

from typing import Generic, TypeVar

R_co = TypeVar("R_co", covariant=True)


class Command(Generic[R_co]):
    """A request for one change, handled by exactly one handler that returns `R_co`."""

    __slots__ = ()


class Query(Generic[R_co]):
    """A request for data, handled by exactly one handler that returns `R_co`."""

    __slots__ = ()


class EventCollector:
    """Mixin for class handlers that collect follow-up events (iambus's abstract handler):
    `add_event(event)` remembers one, `dump_events()` returns them in order and forgets
    them. The dispatcher publishes them once `handle` has succeeded (see follow-up events).
    The events are kept in the instance's `__dict__` (the mixin declares no `__slots__`, so
    every subclass has one)."""

    _pybus_events: list[object]

    def add_event(self, event: object, /) -> None:
        """Publish `event` once this handling has succeeded."""
        try:
            self._pybus_events.append(event)
        except AttributeError:  # the first event of this handler
            self._pybus_events = [event]

    def dump_events(self) -> list[object]:
        """The events added so far, in order; the collector is empty afterwards."""
        events: list[object] = getattr(self, "_pybus_events", [])
        self._pybus_events = []
        return events


class Event:
    """A fact that happened; zero or more handlers receive it.

    `class UserCreated(Event, unique=True)` lets a unit of work publish equal
    instances once, however often they were added (see `pybus.UnitOfWork`).
    """

    __slots__ = ()

    def __init_subclass__(cls, unique: bool = False, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if unique:
            setattr(cls, "pybus_unique", True)  # noqa: B010 - a class attribute the checkers do not know
