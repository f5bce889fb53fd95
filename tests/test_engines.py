"""Event fan-out, failure isolation, and follow-up events."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from pybus import CascadeDepthExceeded, Dispatcher, Factory, HandlerNotFound
from tests.cancelling import cancel_own_task


class Boom(Exception):
    pass


class Base:
    pass


class Mid(Base):
    pass


class Leaf(Mid):
    pass


@dataclass
class Recorder:
    calls: list[str] = field(default_factory=list)

    def handler(self, name: str, result: object = None, fail: bool = False) -> Any:
        async def handle(event: object) -> object:
            self.calls.append(name)
            if fail:
                raise Boom(name)
            return result

        handle.__qualname__ = name
        return handle


# -- fan-out -------------------------------------------------------------------------


async def test_handlers_run_in_registration_order_then_base_classes_in_mro_order() -> None:
    dp, rec = Dispatcher(), Recorder()
    dp.events.bind(Base, rec.handler("base"))
    dp.events.bind(Leaf, rec.handler("leaf-1"))
    dp.events.bind(Mid, rec.handler("mid"))
    dp.events.bind(Leaf, rec.handler("leaf-2"))
    dp.start()
    await dp.publish(Leaf())
    assert rec.calls == ["leaf-1", "leaf-2", "mid", "base"]
    rec.calls.clear()
    await dp.publish(Mid())
    assert rec.calls == ["mid", "base"]


async def test_subclass_first_seen_after_start_is_resolved_once() -> None:
    dp, rec = Dispatcher(), Recorder()
    dp.events.bind(Base, rec.handler("base"))
    dp.start()

    class Late(Leaf):
        pass

    engine = dp.events.engine
    assert engine is not None
    await dp.publish(Late())
    assert rec.calls == ["base"]
    first = engine.handlers_for(Late())
    assert engine.handlers_for(Late()) is first  # cached, not walked again
    assert [plan.handler.name for plan in first] == ["base"]


async def test_a_failing_handler_does_not_stop_the_others() -> None:
    dp, rec = Dispatcher(), Recorder()
    dp.events.bind(Leaf, rec.handler("first"))
    dp.events.bind(Leaf, rec.handler("second", fail=True))
    dp.events.bind(Leaf, rec.handler("third"))
    dp.events.bind(Leaf, rec.handler("fourth", fail=True))
    dp.start()
    with pytest.raises(ExceptionGroup) as info:
        await dp.publish(Leaf())
    assert rec.calls == ["first", "second", "third", "fourth"]
    group = info.value
    assert group.message == "publishing Leaf: 2 event handler(s) failed"
    assert [str(exc) for exc in group.exceptions] == ["second", "fourth"]
    note = group.exceptions[0].__notes__[0]
    assert note.startswith("raised by second (")
    assert note.endswith(") handling event Leaf")


async def test_the_same_function_for_a_class_and_its_base_runs_twice_and_fails_by_name() -> None:
    dp, rec = Dispatcher(), Recorder()
    shared = rec.handler("shared", fail=True)
    dp.events.bind(Leaf, shared)
    dp.events.bind(Base, shared)
    dp.start()
    with pytest.raises(ExceptionGroup) as info:
        await dp.publish(Leaf())
    assert rec.calls == ["shared", "shared"]
    assert len(info.value.exceptions) == 2


async def test_sync_and_class_handlers_mix_with_async_ones_in_order() -> None:
    dp = Dispatcher()
    calls: list[str] = []

    def sync_handler(event: Leaf) -> None:
        calls.append("sync")
        raise Boom("sync")

    class ClassHandler:
        async def handle(self, event: Leaf) -> None:
            calls.append("class")

    async def async_handler(event: Leaf) -> None:
        calls.append("async")

    dp.events.bind(Leaf, async_handler)
    dp.events.bind(Leaf, sync_handler)
    dp.events.bind(Leaf, ClassHandler)
    dp.start()
    with pytest.raises(ExceptionGroup) as info:
        await dp.publish(Leaf())
    assert calls == ["async", "sync", "class"]
    assert [str(e) for e in info.value.exceptions] == ["sync"]


async def test_concurrent_events_run_handlers_at_the_same_time() -> None:
    dp = Dispatcher(concurrent_events=True)
    both_started = asyncio.Event()
    started: list[str] = []

    async def first(event: Leaf) -> str:
        started.append("first")
        await asyncio.wait_for(both_started.wait(), 1)  # would time out if run one after the other
        return "from-first"

    async def second(event: Leaf) -> str:
        started.append("second")
        both_started.set()
        return "from-second"

    followups: list[str] = []
    dp.events.bind(Leaf, first)
    dp.events.bind(Leaf, second)
    dp.events.bind("from-first", lambda: followups.append("from-first"))
    dp.events.bind("from-second", lambda: followups.append("from-second"))
    dp.start()
    await dp.publish(Leaf())
    assert sorted(started) == ["first", "second"]
    # Follow-ups keep registration order although second finished first.
    assert followups == ["from-first", "from-second"]


async def test_concurrent_events_isolate_failures() -> None:
    dp, rec = Dispatcher(concurrent_events=True), Recorder()
    dp.events.bind(Leaf, rec.handler("ok"))
    dp.events.bind(Leaf, rec.handler("bad", fail=True))
    dp.events.bind(Leaf, rec.handler("also-ok"))
    dp.start()
    with pytest.raises(ExceptionGroup) as info:
        await dp.publish(Leaf())
    assert sorted(rec.calls) == ["also-ok", "bad", "ok"]
    assert [str(e) for e in info.value.exceptions] == ["bad"]


async def test_cancellation_is_not_collected_as_a_failure() -> None:
    dp, rec = Dispatcher(), Recorder()

    async def cancelled(event: Leaf) -> None:
        raise asyncio.CancelledError

    dp.events.bind(Leaf, cancelled)
    dp.events.bind(Leaf, rec.handler("after"))
    dp.start()
    with pytest.raises(asyncio.CancelledError):
        await dp.publish(Leaf())
    assert rec.calls == []


# -- follow-up events ------------------------------------------------------------------


@dataclass(frozen=True)
class PlaceOrder:
    order_id: int
    fail: bool = False


@dataclass(frozen=True)
class OrderPlaced:
    order_id: int


@dataclass(frozen=True)
class StockReserved:
    order_id: int


@dataclass(frozen=True)
class InvoiceSent:
    order_id: int


async def test_return_value_is_the_result_and_is_published_before_execute_returns() -> None:
    dp = Dispatcher()
    seen: list[object] = []

    @dp.commands.register(PlaceOrder)
    async def place(cmd: PlaceOrder) -> OrderPlaced:
        return OrderPlaced(cmd.order_id)

    @dp.events.register(OrderPlaced)
    async def on_placed(event: OrderPlaced) -> None:
        await asyncio.sleep(0.01)
        seen.append(event)

    dp.start()
    assert await dp.execute(PlaceOrder(1)) == OrderPlaced(1)
    assert seen == [OrderPlaced(1)]


async def test_query_results_are_published_too() -> None:
    dp = Dispatcher()
    seen: list[object] = []
    dp.queries.bind(PlaceOrder, lambda q: OrderPlaced(q.order_id))
    dp.events.bind(OrderPlaced, seen.append)
    dp.start()
    assert await dp.query(PlaceOrder(2)) == OrderPlaced(2)
    assert seen == [OrderPlaced(2)]


class PlaceOrderHandler:
    """Collects events; a new instance per handling."""

    def __init__(self) -> None:
        self.events: list[object] = []

    async def add_event(self, event: object) -> None:
        self.events.append(event)

    async def dump_events(self) -> list[object]:
        return self.events

    async def handle(self, cmd: PlaceOrder) -> OrderPlaced:
        await self.add_event(StockReserved(cmd.order_id))
        await asyncio.sleep(0)
        await self.add_event(InvoiceSent(cmd.order_id))
        if cmd.fail:
            raise Boom("payment declined")
        return OrderPlaced(cmd.order_id)


def order_dispatcher(seen: list[object]) -> Dispatcher:
    dp = Dispatcher()
    dp.commands.bind(PlaceOrder, PlaceOrderHandler)
    for event_cls in (OrderPlaced, StockReserved, InvoiceSent):
        dp.events.bind(event_cls, seen.append)
    dp.start()
    return dp


async def test_collected_events_are_published_in_order_then_the_return_value() -> None:
    seen: list[object] = []
    dp = order_dispatcher(seen)
    assert await dp.execute(PlaceOrder(1)) == OrderPlaced(1)
    assert seen == [StockReserved(1), InvoiceSent(1), OrderPlaced(1)]


async def test_follow_ups_are_published_only_when_the_handler_succeeded() -> None:
    seen: list[object] = []
    dp = order_dispatcher(seen)
    with pytest.raises(Boom):
        await dp.execute(PlaceOrder(1, fail=True))
    assert seen == []


async def test_concurrent_handlings_do_not_share_collected_events() -> None:
    seen: list[object] = []
    dp = order_dispatcher(seen)
    results = await asyncio.gather(*(dp.execute(PlaceOrder(i)) for i in range(50)))
    assert results == [OrderPlaced(i) for i in range(50)]
    assert sorted(e.order_id for e in seen if isinstance(e, StockReserved)) == list(range(50))
    assert len(seen) == 150


async def test_ready_instance_collecting_events() -> None:
    class Collector:
        def __init__(self) -> None:
            self.events: list[object] = []

        def add_event(self, event: object) -> None:
            self.events.append(event)

        def dump_events(self) -> list[object]:
            events, self.events = self.events, []
            return events

        def handle(self, order_id: int) -> None:
            self.add_event(OrderPlaced(order_id))

    seen: list[object] = []
    dp = Dispatcher()
    dp.events.bind("order", Collector(), argname="order_id")
    dp.events.bind(OrderPlaced, seen.append)
    dp.start()
    await dp.publish("order")
    assert seen == [OrderPlaced("order")]  # type: ignore[arg-type]


async def test_cascades_run_breadth_first_in_emission_order() -> None:
    dp, rec = Dispatcher(), Recorder()
    dp.commands.bind("start", rec.handler("start", result="A"))
    dp.events.bind("A", rec.handler("A-1", result="B1"))
    dp.events.bind("A", rec.handler("A-2", result="B2"))
    dp.events.bind("B1", rec.handler("B1", result="C"))
    dp.events.bind("B2", rec.handler("B2"))
    dp.events.bind("C", rec.handler("C"))
    dp.start()
    assert await dp.execute("start") == "A"
    assert rec.calls == ["start", "A-1", "A-2", "B1", "B2", "C"]


async def test_publish_cascades_too() -> None:
    dp, rec = Dispatcher(), Recorder()
    dp.events.bind("A", rec.handler("A", result="B"))
    dp.events.bind("B", rec.handler("B", result="C"))
    dp.events.bind("C", rec.handler("C", fail=True))
    dp.start()
    with pytest.raises(ExceptionGroup) as info:
        await dp.publish("A")
    assert rec.calls == ["A", "B", "C"]
    assert info.value.message == "publishing 'A': 1 event handler(s) failed"


async def test_failing_follow_up_handlers_raise_from_execute() -> None:
    dp, rec = Dispatcher(), Recorder()
    dp.commands.bind(PlaceOrder, lambda cmd: OrderPlaced(cmd.order_id))
    dp.events.bind(OrderPlaced, rec.handler("mailer", fail=True))
    dp.events.bind(OrderPlaced, rec.handler("ledger"))
    dp.start()
    with pytest.raises(ExceptionGroup) as info:
        await dp.execute(PlaceOrder(1))
    assert info.value.message == "command PlaceOrder succeeded, but 1 follow-up event handler(s) failed"
    assert rec.calls == ["mailer", "ledger"]


async def test_a_returned_command_is_reported_not_dropped() -> None:
    dp = Dispatcher()
    dp.commands.bind(PlaceOrder, lambda cmd: "ship it")
    dp.commands.bind("ship it", lambda: None)
    dp.start()
    with pytest.raises(ExceptionGroup) as info:
        await dp.execute(PlaceOrder(1))
    (error,) = info.value.exceptions
    assert isinstance(error, HandlerNotFound)
    assert str(error) == (
        "No handler registered for event 'ship it'; it is registered as a command: use dp.execute()"
    )
    assert error.__notes__ == ["it was returned or collected by a handler as a follow-up event"]


async def test_results_nobody_listens_to_cost_nothing_and_raise_nothing() -> None:
    dp = Dispatcher(max_cascade_depth=0)
    dp.queries.bind("rows", lambda: [1, 2, 3])
    dp.queries.bind("name", lambda: "nobody listens to this string")
    dp.start()
    assert await dp.query("rows") == [1, 2, 3]
    assert await dp.query("rows") == [1, 2, 3]
    assert await dp.query("name") == "nobody listens to this string"


async def test_a_handler_cycle_stops_at_max_cascade_depth() -> None:
    dp, rec = Dispatcher(max_cascade_depth=5), Recorder()
    dp.events.bind("ping", rec.handler("ping", result="pong"))
    dp.events.bind("pong", rec.handler("pong", result="ping"))
    dp.start()
    with pytest.raises(CascadeDepthExceeded) as info:
        await dp.publish("ping")
    # The published event plus five levels of follow-ups ran.
    assert rec.calls == ["ping", "pong", "ping", "pong", "ping", "pong"]
    assert str(info.value).startswith("Follow-up event 'ping' would be published at depth 6")
    assert info.value.__cause__ is None


async def test_failures_before_the_depth_limit_are_kept_as_the_cause() -> None:
    dp, rec = Dispatcher(max_cascade_depth=2), Recorder()
    dp.commands.bind("go", rec.handler("go", result="ping"))
    dp.events.bind("ping", rec.handler("ping", result="pong"))
    dp.events.bind("ping", rec.handler("ping-fails", fail=True))
    dp.events.bind("pong", rec.handler("pong", result="ping"))
    dp.start()
    with pytest.raises(CascadeDepthExceeded) as info:
        await dp.execute("go")
    cause = info.value.__cause__
    assert isinstance(cause, ExceptionGroup)
    assert [str(e) for e in cause.exceptions] == ["ping-fails"]


async def test_depth_zero_forbids_follow_ups_that_have_handlers() -> None:
    dp, rec = Dispatcher(max_cascade_depth=0), Recorder()
    dp.commands.bind(PlaceOrder, lambda cmd: OrderPlaced(cmd.order_id))
    dp.events.bind(OrderPlaced, rec.handler("never"))
    dp.start()
    with pytest.raises(CascadeDepthExceeded, match=r"past max_cascade_depth=0"):
        await dp.execute(PlaceOrder(1))
    assert rec.calls == []


async def test_event_handlers_return_values_are_published_as_follow_ups() -> None:
    dp = Dispatcher()
    seen: list[object] = []

    @dp.events.register(OrderPlaced)
    async def bill(event: OrderPlaced) -> InvoiceSent:
        return InvoiceSent(event.order_id)

    @dp.events.register(InvoiceSent)
    async def archive(event: InvoiceSent) -> None:
        seen.append(event)

    dp.start()
    await dp.publish(OrderPlaced(9))
    assert seen == [InvoiceSent(9)]


# -- under faults --------------------------------------------------------------------------


@dataclass(frozen=True)
class Ping:
    n: int


@dataclass(frozen=True)
class Pong:
    n: int


@pytest.mark.parametrize("concurrent", [False, True])
async def test_a_handler_raising_cancelled_error_propagates_the_same_in_both_fan_out_modes(
    concurrent: bool,
) -> None:
    dp, rec = Dispatcher(concurrent_events=concurrent), Recorder()

    async def cancelled(event: Leaf) -> None:
        raise asyncio.CancelledError()

    dp.events.bind(Leaf, cancelled)
    dp.events.bind(Leaf, rec.handler("other"))
    dp.start()
    with pytest.raises(asyncio.CancelledError):
        await dp.publish(Leaf())


async def test_a_cycle_of_nested_publish_calls_ends_with_one_readable_error() -> None:
    dp = Dispatcher()

    @dp.events.register(Ping)
    async def ping(event: Ping) -> None:
        await dp.publish(Pong(event.n + 1))

    @dp.events.register(Pong)
    async def pong(event: Pong) -> None:
        await dp.publish(Ping(event.n + 1))

    dp.start()
    with pytest.raises(RecursionError) as info:
        await dp.publish(Ping(0))
    error = info.value
    assert not isinstance(error, BaseExceptionGroup)
    notes = getattr(error, "__notes__", [])
    assert len(notes) == 2  # where it happened, and what to do; not one note per level
    assert notes[0].startswith("raised by p")
    assert "handlers probably publish or execute each other in a cycle" in notes[1]


async def test_a_cycle_through_execute_and_publish_ends_with_one_readable_error() -> None:
    dp = Dispatcher()

    @dp.commands.register(Ping)
    async def ping(cmd: Ping) -> None:
        await dp.publish(Pong(cmd.n))

    @dp.events.register(Pong)
    async def pong(event: Pong) -> None:
        await dp.execute(Ping(event.n))

    dp.start()
    with pytest.raises(RecursionError) as info:
        await dp.execute(Ping(0))
    assert not isinstance(info.value, BaseExceptionGroup)
    assert len(getattr(info.value, "__notes__", [])) == 2


class CollectsPong:
    """Collects a Pong for the Ping it handles; `session` is a Factory whose teardown fails."""

    def __init__(self, session: str = "") -> None:
        self.events: list[Pong] = []

    async def handle(self, message: Ping) -> None:
        self.events.append(Pong(message.n))

    def add_event(self, event: Pong) -> None:
        self.events.append(event)

    def dump_events(self) -> list[Pong]:
        return self.events


def failing_commit() -> Iterator[str]:
    yield "session"
    raise Boom("commit failed")


async def test_collected_events_are_not_published_when_a_factory_teardown_fails() -> None:
    published: list[Pong] = []
    dp = Dispatcher()
    dp.commands.bind(Ping, CollectsPong, session=Factory(failing_commit))
    dp.events.bind(Pong, published.append)
    dp.start()
    with pytest.raises(Boom, match="commit failed"):
        await dp.execute(Ping(1))
    assert published == []


async def test_collected_events_are_not_published_when_a_middleware_fails_after_the_handler() -> None:
    published: list[Pong] = []

    async def fails_after(message: object, call_next: Any) -> object:
        await call_next(message)
        raise Boom("after the handler")

    dp = Dispatcher()
    dp.commands.bind(Ping, CollectsPong, middleware=[fails_after])
    dp.events.bind(Pong, published.append)
    dp.start()
    with pytest.raises(Boom):
        await dp.execute(Ping(1))
    assert published == []


async def test_collected_events_of_a_failing_event_handler_are_not_published_with_the_others() -> None:
    published: list[Pong] = []

    async def fine(event: Ping) -> Pong:
        return Pong(-event.n)

    dp = Dispatcher()
    dp.events.bind(Ping, CollectsPong, session=Factory(failing_commit))
    dp.events.bind(Ping, fine)
    dp.events.bind(Pong, published.append)
    dp.start()
    with pytest.raises(ExceptionGroup):
        await dp.publish(Ping(1))
    assert published == [Pong(-1)]  # the handler that succeeded keeps its follow-up


@pytest.mark.parametrize(
    ("call", "given", "text"),
    [
        (
            "execute",
            Ping,
            "dp.execute() got the class Ping, not a message; pass an instance, as in dp.execute(Ping(...))",
        ),
        ("execute", None, "dp.execute() got None, which is not a message; pass the message to handle"),
        ("query", Ping, "dp.query() got the class Ping, not a message"),
        ("publish", Ping, "dp.publish() got the class Ping, not a message"),
        ("publish", None, "dp.publish() got None, which is not a message"),
        ("send", Ping, "dp.send() got the class Ping, not a message"),
        ("send", None, "dp.send() got None"),
    ],
    ids=[
        "execute-class",
        "execute-none",
        "query-class",
        "publish-class",
        "publish-none",
        "send-class",
        "send-none",
    ],
)
async def test_a_class_or_none_given_as_a_message_is_named(call: str, given: object, text: str) -> None:
    from pybus import InvalidMessage

    dp = Dispatcher()
    dp.commands.bind(Ping, lambda cmd: None)
    dp.start()
    with pytest.raises(InvalidMessage) as info:
        await getattr(dp, call)(given)
    assert str(info.value).startswith(text)
    with pytest.raises(InvalidMessage, match=r"dp.commands.send\(\) got the class Ping"):
        await dp.commands.send(Ping)
    with pytest.raises(InvalidMessage, match=r"dp.events.send\(\) got the class Pong"):
        await dp.events.send(Pong)


async def test_a_concurrent_handler_that_cancels_its_own_task_fails_like_a_sequential_one() -> None:
    dp = Dispatcher(concurrent_events=True)
    followed: list[Pong] = []

    @dp.events.register(Ping)
    async def cancels_itself(event: Ping) -> Pong:
        cancel_own_task()
        await asyncio.sleep(0)
        return Pong(event.n)  # never reached

    @dp.events.register(Ping)
    async def other(event: Ping) -> None:
        pass

    dp.events.bind(Pong, followed.append)
    dp.start()
    with pytest.raises(asyncio.CancelledError):
        await dp.publish(Ping(1))
    assert followed == []


async def test_a_catch_all_event_handler_does_not_make_a_class_or_none_a_message() -> None:
    from pybus import InvalidMessage

    seen: list[object] = []
    dp = Dispatcher()
    dp.events.bind(object, seen.append)
    dp.start()
    for given in (Ping, None):
        with pytest.raises(InvalidMessage):
            await dp.publish(given)
        with pytest.raises(InvalidMessage):
            await dp.events.send(given)
    await dp.publish(Ping(1))
    assert seen == [Ping(1)]
    await dp.stop()


@pytest.mark.parametrize("timeout", ["1", -1, 0, True])
async def test_a_bad_call_timeout_is_refused_clearly(timeout: object) -> None:
    from pybus import ImproperlyConfigured

    dp = Dispatcher()
    dp.commands.bind(Ping, lambda cmd: None)
    dp.events.bind(Pong, lambda event: None)
    dp.start()
    with pytest.raises(ImproperlyConfigured, match=r"dp.execute\(\.\.\., timeout=.*\): timeout is None"):
        await dp.execute(Ping(1), timeout=timeout)  # type: ignore[call-overload]
    with pytest.raises(ImproperlyConfigured, match=r"dp.publish\(\.\.\., timeout="):
        await dp.publish(Pong(1), timeout=timeout)  # type: ignore[arg-type]
