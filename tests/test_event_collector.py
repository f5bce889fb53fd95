"""Class handlers that collect follow-up events: the EventCollector mixin, and the errors
for a class that would lose its events."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import NamedTuple

import pytest

from pybus import Dispatcher, EventCollector, HandlerSignatureError, ImproperlyConfigured


@dataclass(frozen=True)
class Place:
    n: int
    fail: bool = False


@dataclass(frozen=True)
class Placed:
    n: int


@dataclass(frozen=True)
class Billed:
    n: int


class PlaceOrder(EventCollector):
    async def handle(self, cmd: Place) -> str:
        self.add_event(Placed(cmd.n))
        self.add_event(Billed(cmd.n))
        if cmd.fail:
            raise ValueError("declined")
        return "placed"


async def test_the_mixin_collects_events_published_in_order_after_success() -> None:
    dp = Dispatcher()
    dp.commands.bind(Place, PlaceOrder)
    seen: list[object] = []
    dp.events.bind(Placed, seen.append)
    dp.events.bind(Billed, seen.append)
    async with dp:
        assert await dp.execute(Place(1)) == "placed"
        with pytest.raises(ValueError, match="declined"):
            await dp.execute(Place(2, fail=True))
        assert await dp.execute(Place(3)) == "placed"
    assert seen == [Placed(1), Billed(1), Placed(3), Billed(3)]
    collector = PlaceOrder()
    collector.add_event(Placed(9))
    assert collector.dump_events() == [Placed(9)]
    assert collector.dump_events() == []  # dumped events are forgotten


def test_a_class_with_add_event_but_no_dump_events_is_refused() -> None:
    class Forgetful:
        def __init__(self) -> None:
            self.events: list[object] = []

        def add_event(self, event: object) -> None:
            self.events.append(event)

        async def handle(self, cmd: Place) -> None:
            self.add_event(Placed(cmd.n))

    with pytest.raises(HandlerSignatureError, match=r"add_event\(\) but no dump_events\(\)"):
        Dispatcher().commands.bind(Place, Forgetful)


class Coordinates(NamedTuple):
    x: int
    y: int


@pytest.mark.parametrize("dumped", [Placed(1), Coordinates(1, 2), "Placed", {"n": 1}])
async def test_dump_events_returning_one_event_is_an_error_naming_the_handler(dumped: object) -> None:
    class OneEvent:
        async def handle(self, cmd: Place) -> None:
            pass

        def add_event(self, event: object) -> None:
            pass

        def dump_events(self) -> object:
            return dumped

    dp = Dispatcher()
    dp.commands.bind(Place, OneEvent)
    async with dp:
        with pytest.raises(
            ImproperlyConfigured, match=r"OneEvent .*dump_events\(\) returned .*not a list of events"
        ):
            await dp.execute(Place(1))


class SlowCharge(EventCollector):
    """A ready instance (one for every handling) that collects, then waits."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def handle(self, cmd: Place) -> None:
        self.add_event(Placed(cmd.n))
        await self.release.wait()
        if cmd.fail:
            raise RuntimeError(f"order {cmd.n} failed")


class SlowChargeWithClock(SlowCharge):
    """The same, with a Factory-injected value (the general per-handling scope)."""

    async def handle(self, cmd: Place, clock: int = 0) -> None:
        await super().handle(cmd)


@pytest.mark.parametrize("cls", [SlowCharge, SlowChargeWithClock])
async def test_a_ready_collector_refuses_a_second_handling_while_one_runs(cls: type[SlowCharge]) -> None:
    """Its events live in the instance: a concurrent handling would publish the first one's
    events as its own, or lose them. The second is refused before it runs; nothing is lost."""
    from pybus import Factory

    heard: list[int] = []
    handler = cls()
    dp = Dispatcher()
    if cls is SlowCharge:
        dp.commands.bind(Place, handler)
    else:
        dp.commands.bind(Place, handler, clock=Factory(lambda: 1))

    async def on_placed(event: Placed) -> None:
        heard.append(event.n)

    dp.events.bind(Placed, on_placed)
    async with dp:
        first = asyncio.ensure_future(dp.execute(Place(1, fail=True)))
        await asyncio.sleep(0.01)
        with pytest.raises(ImproperlyConfigured, match="handling another message now"):
            await dp.execute(Place(2))
        handler.release.set()
        with pytest.raises(RuntimeError, match="order 1 failed"):
            await first
        assert heard == []  # the failed handling's event is not published, by anyone
        await dp.execute(Place(3))  # one at a time is fine
        assert heard == [3]
