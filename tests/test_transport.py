"""Routing to a transport and consuming from it, with the in-memory transport."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import signal
import subprocess
import sys
import types
from dataclasses import dataclass
from typing import Any

import msgspec
import pydantic
import pytest

from pybus import (
    Command,
    DecodeError,
    Dispatcher,
    DispatcherClosed,
    DispatcherFrozen,
    Event,
    ImproperlyConfigured,
)
from pybus.codec import JsonCodec, default_name
from pybus.consumer import Consumer, current_envelope
from pybus.transport import Envelope, InMemoryBroker, InMemoryTransport, Transport
from tests.cancelling import cancel_own_task
from tests.consuming import consuming, until


@dataclass(frozen=True)
class OrderPaid(Event):
    order_id: int
    amount: float


@dataclass(frozen=True)
class ShipOrder(Command[None]):
    order_id: int


@dataclass(frozen=True)
class OrderShipped(Event):
    order_id: int


class Boom(Exception):
    pass


def producer(broker: InMemoryBroker) -> Dispatcher:
    dp = Dispatcher(transport=InMemoryTransport(broker))
    dp.route(OrderPaid)
    dp.route(ShipOrder, kind="command")
    dp.route(OrderShipped)
    return dp


def service(broker: InMemoryBroker, group: str, seen: list[object]) -> Dispatcher:
    """A consuming service: its own group, a handler for OrderPaid."""
    dp = Dispatcher(transport=InMemoryTransport(broker, group=group))
    dp.route(OrderPaid)
    dp.route(ShipOrder, kind="command")
    dp.route(OrderShipped)
    dp.events.bind(OrderPaid, seen.append)
    return dp


async def test_a_routed_event_goes_to_the_transport_and_every_service_gets_it() -> None:
    broker = InMemoryBroker()
    local: list[object] = []
    shop = producer(broker)
    shop.events.bind(OrderPaid, local.append)  # routed: not handled in the producer
    billing_seen: list[object] = []
    mailing_seen: list[object] = []
    async with (
        shop,
        consuming(service(broker, "billing", billing_seen)),
        consuming(service(broker, "mailing", mailing_seen)),
    ):
        await shop.publish(OrderPaid(1, 9.5))
        await until(lambda: len(billing_seen) == 1 and len(mailing_seen) == 1)
    assert local == []
    assert billing_seen == mailing_seen == [OrderPaid(1, 9.5)]


async def test_within_a_service_each_message_is_handled_once() -> None:
    broker = InMemoryBroker()
    seen: list[object] = []
    shop = producer(broker)
    async with shop, consuming(service(broker, "billing", seen)), consuming(service(broker, "billing", seen)):
        for n in range(50):
            await shop.events.send(OrderPaid(n, 1.0))
        billing = broker.group("billing", default_name(OrderPaid))
        await until(lambda: billing.position == 50 and not billing.pending)  # all read, all acked
    assert sorted(e.order_id for e in seen) == list(range(50))  # type: ignore[attr-defined]


async def test_execute_stays_in_process_and_send_goes_out() -> None:
    broker = InMemoryBroker()
    shipped: list[int] = []
    dp = producer(broker)
    dp.commands.bind(ShipOrder, lambda cmd: shipped.append(cmd.order_id))
    async with dp:
        await dp.execute(ShipOrder(1))
        await dp.commands.send(ShipOrder(2))
        await dp.send(ShipOrder(3))
        with pytest.raises(
            ImproperlyConfigured, match=r"routed to the transport, which send_nowait cannot wait"
        ):
            dp.commands.send_nowait(ShipOrder(4))
    assert shipped == [1]
    assert [e.name for e in broker.streams[default_name(ShipOrder)]] == [default_name(ShipOrder)] * 2


async def test_follow_ups_are_written_before_the_ack_with_the_causal_ids() -> None:
    broker = InMemoryBroker()
    shop = producer(broker)
    warehouse = Dispatcher(transport=InMemoryTransport(broker, group="warehouse"))
    warehouse.route(ShipOrder, kind="command")
    warehouse.route(OrderShipped)

    @warehouse.commands.register(ShipOrder)
    async def ship(cmd: ShipOrder) -> OrderShipped:
        return OrderShipped(cmd.order_id)  # routed: written to the transport

    async with shop, consuming(warehouse) as consumer:
        await shop.commands.send(ShipOrder(7))
        await until(lambda: consumer.handled == 1)
    (command,) = broker.streams[default_name(ShipOrder)]
    (event,) = broker.streams[default_name(OrderShipped)]
    assert msgspec.json.decode(event.body) == {"order_id": 7}
    assert command.causation_id is None
    assert command.correlation_id == command.message_id
    assert event.correlation_id == command.correlation_id
    assert event.causation_id == command.message_id
    assert broker.groups[("warehouse", default_name(ShipOrder))].pending == {}  # acked


async def test_a_consumer_reports_each_failing_event_handler_once_per_delivery() -> None:
    broker = InMemoryBroker()
    errors: list[tuple[BaseException, object]] = []
    worker = Dispatcher(
        transport=InMemoryTransport(broker, group="billing"), on_error=lambda e, m: errors.append((e, m))
    )
    worker.route(OrderPaid)

    @worker.events.register(OrderPaid)
    async def bill(event: OrderPaid) -> None:
        raise Boom("bill failed")

    @worker.events.register(OrderPaid)
    async def mail(event: OrderPaid) -> None:
        raise Boom("mail failed")

    async with producer(broker) as shop:
        await shop.publish(OrderPaid(1, 1.0))
    async with consuming(worker, max_deliveries=2) as consumer:
        await until(lambda: consumer.dead_lettered == 1)
    assert consumer.failed == 2  # deliveries, not handlers
    assert [(str(error), message) for error, message in errors] == [
        ("bill failed", OrderPaid(1, 1.0)),
        ("mail failed", OrderPaid(1, 1.0)),
        ("bill failed", OrderPaid(1, 1.0)),
        ("mail failed", OrderPaid(1, 1.0)),
    ]
    for (error, _), delivery in zip(errors, [1, 1, 2, 2], strict=True):
        assert error.__notes__[-1].startswith(f"delivery {delivery} of {default_name(OrderPaid)}")


async def test_a_failing_message_comes_back_then_is_dead_lettered() -> None:
    broker = InMemoryBroker()
    attempts: dict[int, int] = {}
    errors: list[BaseException] = []
    shop = producer(broker)
    worker = Dispatcher(
        transport=InMemoryTransport(broker, group="billing"), on_error=lambda e, m: errors.append(e)
    )
    worker.route(OrderPaid)

    @worker.events.register(OrderPaid)
    async def bill(event: OrderPaid) -> None:
        attempts[event.order_id] = attempts.get(event.order_id, 0) + 1
        if event.order_id == 0 or (event.order_id == 1 and attempts[1] == 1):
            raise Boom(f"order {event.order_id}")

    async with shop, consuming(worker, max_deliveries=3) as consumer:
        for n in range(5):
            await shop.publish(OrderPaid(n, 1.0))
        await until(lambda: consumer.handled == 4 and consumer.dead_lettered == 1)
    assert attempts == {0: 3, 1: 2, 2: 1, 3: 1, 4: 1}
    (dead,) = broker.dead_letters
    assert dead.envelope.attempt == 3
    assert dead.reason.startswith("failed 3 times; last error: HandlerFailures: ")
    assert "Boom: order 0" in dead.reason
    assert "Traceback" in dead.reason
    assert len(errors) == 4  # three deliveries of order 0, one of order 1


async def test_an_undecodable_message_is_dead_lettered_and_does_not_block() -> None:
    broker = InMemoryBroker()
    seen: list[object] = []
    transport = InMemoryTransport(broker)
    name = default_name(OrderPaid)
    await transport.send(Envelope("event", name, b'{"order_id": "not a number"}', "bad", "bad"))
    await transport.send(Envelope("event", name, b'{"order_id": 2, "amount": 1.5}', "good", "good"))
    worker = service(broker, "billing", seen)
    async with consuming(worker) as consumer:
        await until(lambda: len(seen) == 1 and consumer.dead_lettered == 1)
    assert seen == [OrderPaid(2, 1.5)]
    (dead,) = broker.dead_letters
    assert dead.envelope.message_id == "bad"
    assert dead.reason.startswith(f"Cannot decode a message named {name!r}: ValidationError: Expected `int`")


class SlowDeadLetters(InMemoryTransport):
    """Holds each dead-letter write until `written` is set, as a broker round trip would."""

    def __init__(self, broker: InMemoryBroker, *, group: str) -> None:
        super().__init__(broker, group=group)
        self.written = asyncio.Event()

    async def dead_letter(self, envelope: Envelope, reason: str) -> None:
        await self.written.wait()
        await super().dead_letter(envelope, reason)


async def test_a_dead_letter_is_counted_once_the_transport_has_written_it() -> None:
    broker = InMemoryBroker()
    transport = SlowDeadLetters(broker, group="billing")
    await transport.send(Envelope("event", default_name(OrderPaid), b"not json", "bad", "bad"))
    worker = Dispatcher(transport=transport, on_error=lambda e, m: None)
    worker.route(OrderPaid)
    worker.events.bind(OrderPaid, lambda event: None)
    async with consuming(worker) as consumer:
        await asyncio.sleep(0.05)  # the message was read and the write started
        assert (consumer.dead_lettered, broker.dead_letters) == (0, [])
        transport.written.set()
        await until(lambda: consumer.dead_lettered == 1)
        assert [dead.envelope.message_id for dead in broker.dead_letters] == ["bad"]


async def test_stopping_a_consumer_gives_unfinished_messages_back() -> None:
    broker = InMemoryBroker()
    release = asyncio.Event()
    done: list[int] = []
    slow = Dispatcher(transport=InMemoryTransport(broker, group="g"))
    slow.route(OrderPaid)

    @slow.events.register(OrderPaid)
    async def wait_forever(event: OrderPaid) -> None:
        await release.wait()

    fast = Dispatcher(transport=InMemoryTransport(broker, group="g"))
    fast.route(OrderPaid)
    fast.events.bind(OrderPaid, lambda event: done.append(event.order_id))
    shop = producer(broker)
    async with shop, slow:
        consumer = slow.consumer(wait=0.01)
        reading = asyncio.create_task(consumer.run())
        await shop.publish(OrderPaid(1, 1.0))
        await until(lambda: bool(broker.group("g", default_name(OrderPaid)).pending))
        assert await consumer.stop(drain_timeout=0.01) == 1
        await reading
    async with consuming(fast):
        await until(lambda: done == [1])


def test_routes_are_checked() -> None:
    without_transport = Dispatcher()
    without_transport.route(OrderPaid)
    with pytest.raises(ImproperlyConfigured, match=r"has no transport: pass Dispatcher\(transport=...\)"):
        without_transport.start()
    dp = Dispatcher(transport=InMemoryTransport())
    with pytest.raises(ImproperlyConfigured, match=r"a route is a message class or a string"):
        dp.route(OrderPaid(1, 1.0))
    dp.start()
    with pytest.raises(DispatcherFrozen, match=r"Cannot register a transport route for event OrderPaid"):
        dp.route(OrderPaid)
    with pytest.raises(ImproperlyConfigured, match=r"Nothing to consume"):
        dp.consumer()


async def test_sending_after_stop_is_refused() -> None:
    dp = producer(InMemoryBroker())
    async with dp:
        pass
    with pytest.raises(DispatcherClosed):
        await dp.commands.send(ShipOrder(1))


async def test_serve_consumes_until_a_signal() -> None:
    broker = InMemoryBroker()
    seen: list[object] = []
    worker = service(broker, "billing", seen)
    shop = producer(broker)

    async def publish_then_stop() -> None:
        async with shop:
            await shop.publish(OrderPaid(5, 1.0))
        await until(lambda: len(seen) == 1)
        signal.raise_signal(signal.SIGTERM)

    task = asyncio.create_task(publish_then_stop())
    assert await asyncio.wait_for(worker.serve(drain_timeout=1), 5) == 0
    await task
    assert seen == [OrderPaid(5, 1.0)]


# -- codec ---------------------------------------------------------------------------------


class PaidModel(pydantic.BaseModel):
    order_id: int


class PaidStruct(msgspec.Struct):
    order_id: int


def test_codec_round_trips_dataclasses_pydantic_msgspec_and_strings() -> None:
    codec = JsonCodec({OrderPaid: "orders.paid", PaidModel: "m", PaidStruct: "s", "ping": "ping"})
    for message in (OrderPaid(1, 2.5), PaidModel(order_id=3), PaidStruct(order_id=4), "ping"):
        name = codec.name_of(message)
        assert codec.decode(name, codec.encode(message)) == message
    assert codec.name_of(OrderPaid(1, 1.0)) == "orders.paid"
    assert default_name(OrderPaid) == f"{__name__}.OrderPaid"


SCRIPT = """
import asyncio
from dataclasses import dataclass

from pybus import Dispatcher
from pybus.transport import InMemoryTransport


@dataclass
class Tick:
    n: int


dp = Dispatcher(transport=InMemoryTransport())
try:
    dp.route(Tick)
except Exception as exc:
    print(type(exc).__name__, exc)
else:
    print("routed as", dp.routes[Tick])
"""


def test_a_class_of_a_script_run_directly_needs_a_route_name(tmp_path: Any) -> None:
    """`python ticks.py` defines `__main__.Tick`, a name no worker importing ticks sees."""
    (tmp_path / "ticks.py").write_text(SCRIPT)

    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True
        )
        return done.stdout.strip()

    refused = run("ticks.py")
    assert refused.startswith("ImproperlyConfigured Cannot route Tick under a default name")
    assert 'Pass one: dp.route(Tick, name="tick")' in refused
    # Run as a module, the script's import name is known: the worker's name.
    assert run("-m", "ticks") == "routed as ticks.Tick"


def test_a_named_route_of_a_main_module_class_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    tick = type("Tick", (), {"__module__": "__main__"})
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    dp = Dispatcher(transport=InMemoryTransport())
    with pytest.raises(ImproperlyConfigured, match=r"defined in a script run directly"):
        dp.route(tick)
    dp.route(tick, name="ticks.tick")
    assert dp.routes[tick] == "ticks.tick"


def test_codec_errors_say_what_to_do() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"both routed as 'same'; give one of them another name"):
        JsonCodec({OrderPaid: "same", OrderShipped: "same"})
    codec = JsonCodec({OrderPaid: "paid"})
    with pytest.raises(DecodeError, match=r"no route of this process has that name"):
        codec.decode("unknown", b"{}")

    @dataclass
    class Weird:
        handle: object

    with pytest.raises(ImproperlyConfigured, match=r"Cannot encode Weird for a transport"):
        JsonCodec({Weird: "weird"}).encode(Weird(object()))


async def test_the_base_transport_is_an_async_context_manager_with_abstract_methods() -> None:
    async with Transport() as transport:
        envelope = Envelope("event", "n", b"", "i", "i")
        for call in (
            transport.send(envelope),
            transport.receive(["n"], max_count=1, wait=0),
            transport.ack(envelope),
            transport.retry(envelope, Boom()),
            transport.dead_letter(envelope, "why"),
        ):
            with pytest.raises(NotImplementedError):
                await call


async def test_a_broker_error_while_reading_is_reported_and_reading_goes_on() -> None:
    class Flaky(InMemoryTransport):
        failures = 1

        async def receive(self, names: list[str], *, max_count: int, wait: float) -> list[Envelope]:  # type: ignore[override]
            if self.failures:
                self.failures -= 1
                raise ConnectionError("broker away")
            return await super().receive(names, max_count=max_count, wait=wait)

    broker = InMemoryBroker()
    errors: list[BaseException] = []
    seen: list[object] = []
    worker = Dispatcher(
        transport=Flaky(broker, group="g"), on_error=lambda error, message: errors.append(error)
    )
    worker.route(OrderPaid)
    worker.events.bind(OrderPaid, seen.append)
    async with producer(broker) as shop, consuming(worker) as consumer:
        consumer.pause_after_error = 0.01
        await shop.publish(OrderPaid(1, 1.0))
        await until(lambda: seen == [OrderPaid(1, 1.0)])
    assert [str(e) for e in errors] == ["broker away"]


async def test_a_consumer_with_nothing_to_read_waits_for_stop() -> None:
    class Counting(InMemoryTransport):
        reads = 0

        async def receive(self, names: list[str], *, max_count: int, wait: float) -> list[Envelope]:  # type: ignore[override]
            self.reads += 1
            return await super().receive(names, max_count=max_count, wait=wait)

    transport = Counting()
    dp = Dispatcher(transport=transport)
    dp.route(OrderPaid)  # routed, but no handler here
    async with consuming(dp) as consumer:
        assert consumer.names == []
        await asyncio.sleep(0.05)
    assert transport.reads == 0  # it never asked the broker for nothing


class Holding(InMemoryTransport):
    """Counts what the consumer holds (received, not yet acked or given back) and
    notes when each read starts."""

    def __init__(self, broker: InMemoryBroker, group: str) -> None:
        super().__init__(broker, group=group)
        self.held = 0
        self.most_held = 0
        self.log: list[str] = []

    async def receive(self, names: list[str], *, max_count: int, wait: float) -> list[Envelope]:  # type: ignore[override]
        self.log.append(f"read {max_count}")
        taken = await super().receive(names, max_count=max_count, wait=wait)
        self.held += len(taken)
        self.most_held = max(self.most_held, self.held)
        return taken

    async def ack(self, envelope: Envelope) -> None:
        self.held -= 1
        await super().ack(envelope)

    async def retry(self, envelope: Envelope, error: BaseException) -> None:
        self.held -= 1
        await super().retry(envelope, error)


class SlowGiveBack(InMemoryTransport):
    """Each give-back waits for the broker (`gate`); a stop comes as the first read
    returns. Counts the give-backs under way at once."""

    consumer: Consumer | None = None

    def __init__(self, broker: InMemoryBroker, group: str) -> None:
        super().__init__(broker, group=group)
        self.gate = asyncio.Event()
        self.under_way = 0
        self.most_at_once = 0

    async def receive(self, names: list[str], *, max_count: int, wait: float) -> list[Envelope]:  # type: ignore[override]
        taken = await super().receive(names, max_count=max_count, wait=wait)
        if taken and self.consumer is not None:
            # What consumer.stop() does before its first await, landing between the read's
            # reply and the reader waking for it.
            asyncio.get_running_loop().call_soon(self.consumer.begin_stop, None)
        return taken

    async def release(self, envelope: Envelope) -> None:
        self.under_way += 1
        self.most_at_once = max(self.most_at_once, self.under_way)
        if self.under_way == 10:
            self.gate.set()  # the broker answers once all ten are asked for
        await self.gate.wait()
        self.under_way -= 1
        await super().release(envelope)


async def test_a_batch_read_as_the_stop_came_is_given_back_at_once_not_one_by_one() -> None:
    broker = InMemoryBroker()
    async with producer(broker) as shop:
        for n in range(10):
            await shop.publish(OrderPaid(n, 1.0))
    transport = SlowGiveBack(broker, group="billing")
    worker = Dispatcher(transport=transport)
    worker.route(OrderPaid)
    worker.events.bind(OrderPaid, print)
    async with worker:
        consumer = transport.consumer = worker.consumer(concurrency=10, prefetch=10)
        # One by one, the first give-back would wait for the gate for ever.
        await asyncio.wait_for(consumer.run(), 5)
    assert transport.most_at_once == 10  # all asked for together
    assert consumer.released == 10
    assert consumer.handled == 0


async def test_the_next_read_is_sent_while_a_batch_is_handled_and_never_beyond_what_it_may_hold() -> None:
    broker = InMemoryBroker()
    transport = Holding(broker, "g")
    worker = Dispatcher(transport=transport)
    worker.route(OrderPaid)

    @worker.events.register(OrderPaid)
    async def slow(event: OrderPaid) -> None:
        transport.log.append(f"handle {event.order_id}")
        await asyncio.sleep(0.01)
        transport.log.append(f"done {event.order_id}")

    async with producer(broker) as shop:
        for n in range(20):
            await shop.publish(OrderPaid(n, 1.0))
    async with consuming(worker, concurrency=4, prefetch=2) as consumer:
        await until(lambda: consumer.handled == 20)
    # The second read goes out before the first batch is handled.
    assert transport.log[:4] == ["read 2", "read 2", "handle 0", "handle 1"]
    assert transport.most_held == 6  # 4 in flight, 2 read ahead


class ReadAheadScene:
    """60 messages; a consumer reading 20 at a time with room for 40 is stopped while
    it starts its first batch, after its read ahead took the next 20: what started is
    handled, the other 40 - started are given back (or, if the transport refuses,
    reported and left pending)."""

    def __init__(self, transport_cls: type[InMemoryTransport] = InMemoryTransport) -> None:
        self.broker = InMemoryBroker()
        self.transport_cls = transport_cls
        self.handled: list[int] = []
        self.attempts: dict[int, int] = {}
        self.errors: list[tuple[BaseException, object]] = []
        self.gate = asyncio.Event()
        self.stopping: list[asyncio.Task[int]] = []
        self.consumer: Consumer | None = None
        self.given_back = -1

    def worker(self, transport: InMemoryTransport) -> Dispatcher:
        dp = Dispatcher(
            transport=transport, on_error=lambda error, message: self.errors.append((error, message))
        )
        dp.route(OrderPaid)

        @dp.events.register(OrderPaid)
        async def handle(event: OrderPaid) -> None:
            if event.order_id == 0 and not self.stopping and self.consumer is not None:
                # A signal arrives while the first batch is being started (from outside the
                # handling: a task it started would be inside it, and refused, see test_lifecycle).
                stop = self.consumer.stop(drain_timeout=5)
                self.stopping.append(asyncio.create_task(stop, context=contextvars.Context()))
            await self.gate.wait()
            self.handled.append(event.order_id)
            envelope = current_envelope.get()
            assert envelope is not None
            self.attempts[event.order_id] = envelope.attempt

        return dp

    async def run(self) -> None:
        async with producer(self.broker) as shop:
            for n in range(60):
                await shop.publish(OrderPaid(n, 1.0))
        first = self.worker(self.transport_cls(self.broker, group="g"))
        async with first:
            self.consumer = first.consumer(concurrency=40, prefetch=20, wait=0.01)
            reading = asyncio.create_task(self.consumer.run())
            await until(lambda: bool(self.stopping))
            self.gate.set()
            self.given_back = await self.stopping[0]
            await reading
        assert 0 in self.handled  # started before the stop, so finished in the drain
        assert set(self.handled) <= set(range(20))  # the read ahead's 20 never started

    @property
    def group(self) -> Any:
        return self.broker.group("g", default_name(OrderPaid))

    def not_started(self) -> list[int]:
        """Entry numbers (1-based) of the 40 taken that did not start."""
        return [n + 1 for n in range(40) if n not in self.handled]


async def test_stopping_gives_back_what_a_read_ahead_took() -> None:
    scene = ReadAheadScene()
    await scene.run()
    assert scene.given_back == 40 - len(scene.handled)
    assert scene.group.pending == {}
    assert sorted(number for number, _ in scene.group.again) == scene.not_started()  # given back
    first_run = list(scene.handled)
    async with consuming(scene.worker(InMemoryTransport(scene.broker, group="g"))):
        await until(lambda: len(scene.handled) == 60)
    assert sorted(scene.handled) == list(range(60))  # none lost, none twice
    assert {scene.attempts[n] for n in range(60) if n not in first_run} == {1}  # not failed deliveries
    assert scene.errors == []


async def test_a_read_ahead_that_cannot_be_given_back_goes_to_the_error_hook() -> None:
    class Refusing(InMemoryTransport):
        async def release(self, envelope: Envelope) -> None:
            raise ConnectionError("broker away")

    scene = ReadAheadScene(Refusing)
    await scene.run()  # the consumer still stops cleanly
    assert scene.consumer is not None
    assert scene.consumer.released == 0
    # Not handled, and refused back: counted as such, and still pending in the broker.
    assert scene.given_back == scene.consumer.unreleased == 40 - len(scene.handled)
    reported = [(str(error), message) for error, message in scene.errors]
    stream = scene.broker.streams[default_name(OrderPaid)]
    expected = [stream[number - 1] for number in scene.not_started()]
    assert [text for text, _ in reported] == ["broker away"] * len(expected)
    assert sorted(getattr(message, "message_id", "") for _, message in reported) == sorted(
        envelope.message_id for envelope in expected
    )
    assert sorted(scene.group.pending) == scene.not_started()  # still pending in the broker: not lost


def test_consumer_sizes_are_checked() -> None:
    dp = Dispatcher(transport=InMemoryTransport())
    dp.route(OrderPaid)
    dp.events.bind(OrderPaid, print)
    dp.start()
    with pytest.raises(ImproperlyConfigured, match=r"^concurrency must be a whole number >= 1, not 0$"):
        dp.consumer(concurrency=0)
    with pytest.raises(ImproperlyConfigured, match=r"^prefetch must be a whole number >= 1, not 0$"):
        dp.consumer(prefetch=0)
    consumer = dp.consumer()
    defaults = (consumer.concurrency, consumer.prefetch, consumer.max_deliveries, consumer.wait)
    assert defaults == (4, 100, 5, 1.0)
    assert dp.consumer(concurrency=2, prefetch=300).prefetch == 300  # read ahead may exceed concurrency


async def test_serve_with_refused_consumer_sizes_stops_and_installs_no_signal_handler() -> None:
    worker = service(InMemoryBroker(), "billing", [])
    loop = asyncio.get_running_loop()
    with pytest.raises(ImproperlyConfigured, match=r"^prefetch must be a whole number >= 1, not 0"):
        await worker.serve(concurrency=2, prefetch=0)
    assert not loop.remove_signal_handler(signal.SIGTERM)  # none was left installed
    with pytest.raises(DispatcherClosed):
        await worker.publish(OrderPaid(1, 1.0))  # and the dispatcher was stopped


# -- under faults --------------------------------------------------------------------------


class Unwritable(InMemoryTransport):
    async def send(self, envelope: Envelope) -> str:
        from pybus import TransportError

        raise TransportError(f"Could not write {envelope.name}: broker away")


async def test_publishing_a_routed_event_that_cannot_be_written_raises_transport_error() -> None:
    from pybus import TransportError

    dp = Dispatcher(transport=Unwritable())
    dp.route(OrderPaid)
    async with dp:
        with pytest.raises(TransportError, match="broker away"):
            await dp.publish(OrderPaid(1, 2.0))
        with pytest.raises(TransportError, match="broker away"):
            await dp.send(OrderPaid(1, 2.0))


async def test_a_routed_follow_up_that_cannot_be_written_fails_the_handling() -> None:
    from pybus import TransportError

    dp = Dispatcher(transport=Unwritable())
    dp.route(OrderShipped)

    @dp.commands.register(ShipOrder)
    async def ship(cmd: ShipOrder) -> OrderShipped:
        return OrderShipped(cmd.order_id)

    async with dp:
        with pytest.raises(ExceptionGroup) as info:
            await dp.execute(ShipOrder(1))
    assert isinstance(info.value.exceptions[0], TransportError)


async def test_routed_follow_ups_written_while_the_consumer_drains_reach_the_transport() -> None:
    """stop() lets handlings in flight finish, and what they write goes out before the
    transport is closed."""
    broker = InMemoryBroker()
    release = asyncio.Event()
    async with producer(broker) as shop:
        await shop.send(ShipOrder(7))
    worker = Dispatcher(transport=InMemoryTransport(broker, group="warehouse"))
    worker.route(ShipOrder)
    worker.route(OrderShipped)

    @worker.commands.register(ShipOrder)
    async def ship(cmd: ShipOrder) -> OrderShipped:
        await release.wait()
        return OrderShipped(cmd.order_id)  # a routed follow-up, written during the drain

    worker.start()
    consumer = worker.consumer(wait=0.01)
    reading = asyncio.create_task(consumer.run())
    await until(lambda: bool(broker.group("warehouse", default_name(ShipOrder)).pending))
    stopping = asyncio.create_task(worker.stop(timeout=5))
    await asyncio.sleep(0.01)
    release.set()
    assert await stopping == 0
    await reading
    assert consumer.handled == 1
    assert [envelope.name for envelope in broker.streams[default_name(OrderShipped)]] == [
        default_name(OrderShipped)
    ]
    assert broker.group("warehouse", default_name(ShipOrder)).pending == {}  # acked


async def test_a_routed_command_class_travels_as_a_command_without_kind() -> None:
    """A producer with no handler for ShipOrder (a Command) routes it as a command; the
    consumer, which registers it as a command, handles it (before, it was written as an
    event and failed every delivery with HandlerNotFound)."""
    broker = InMemoryBroker()
    shipped: list[int] = []
    shop = Dispatcher(transport=InMemoryTransport(broker))
    shop.route(ShipOrder)
    async with shop:
        await shop.send(ShipOrder(3))
    warehouse = Dispatcher(transport=InMemoryTransport(broker, group="warehouse"))
    warehouse.route(ShipOrder)
    warehouse.commands.bind(ShipOrder, lambda cmd: shipped.append(cmd.order_id))
    async with consuming(warehouse) as consumer:
        await until(lambda: shipped == [3])
    assert consumer.failed == 0


async def test_an_envelope_handed_back_twice_or_after_its_ack_comes_back_once_at_most() -> None:
    broker = InMemoryBroker()
    transport = InMemoryTransport(broker)
    for n in range(3):
        await transport.send(Envelope("event", "n", str(n).encode(), f"id{n}", f"id{n}"))
    acked, retried, released = await transport.receive(["n"], max_count=3, wait=0)
    await transport.ack(acked)
    await transport.retry(acked, Boom())  # acked: nothing to hand out
    await transport.release(acked)
    await transport.retry(retried, Boom())
    await transport.retry(retried, Boom())  # the same delivery, twice: one more delivery
    await transport.release(released)
    await transport.release(released)
    again = await transport.receive(["n"], max_count=10, wait=0)
    assert sorted((envelope.message_id, envelope.attempt) for envelope in again) == [("id1", 2), ("id2", 1)]
    assert await transport.receive(["n"], max_count=10, wait=0) == []


class SuspendingTransport(InMemoryTransport):
    """Its outcomes suspend, as a broker's round trips do."""

    async def ack(self, envelope: Envelope) -> None:
        await asyncio.sleep(0)
        await super().ack(envelope)

    async def retry(self, envelope: Envelope, error: BaseException) -> None:
        await asyncio.sleep(0)
        await super().retry(envelope, error)


@pytest.mark.parametrize("then", ["return", "raise"])
async def test_a_handler_that_cancels_its_own_task_never_interrupts_the_ack_or_retry(then: str) -> None:
    """Asked for and not awaited, the cancellation must not land in the consumer's round
    trip to the broker: the outcome is recorded, and the lane goes on with the next message."""
    broker = InMemoryBroker()
    errors: list[BaseException] = []
    handled: list[tuple[int, int]] = []
    worker = Dispatcher(transport=SuspendingTransport(broker), on_error=lambda e, m: errors.append(e))
    worker.route(OrderPaid)

    @worker.events.register(OrderPaid)
    async def bill(event: OrderPaid) -> None:
        envelope = current_envelope.get()
        assert envelope is not None
        handled.append((event.order_id, envelope.attempt))
        if event.order_id == 0 and envelope.attempt == 1:
            cancel_own_task()  # and never awaits it
            if then == "raise":
                raise Boom("after asking for its own cancellation")  # retried once

    shop = producer(broker)
    async with shop, consuming(worker, concurrency=1) as consumer:
        await shop.publish(OrderPaid(0, 1.0))
        await shop.publish(OrderPaid(1, 1.0))
        await until(lambda: consumer.handled == 2)
    group = broker.group("default", default_name(OrderPaid))
    assert group.pending == {}  # every outcome recorded: none left waiting for it
    if then == "return":
        assert handled == [(0, 1), (1, 1)]
        assert (consumer.failed, errors) == (0, [])
    else:
        assert sorted(handled) == [(0, 1), (0, 2), (1, 1)]
        assert consumer.failed == 1
        [error] = errors  # the handler's own exception
        assert isinstance(error, Boom)


async def test_a_consumer_cancelled_and_then_every_task_cancelled_still_gives_back() -> None:
    """Cancelling run() starts its ending in a task; a shutdown handler that then cancels
    every task reaches that task before its first step: what the consumer held must
    still be given back, not left pending for ever."""
    broker = InMemoryBroker()
    started = asyncio.Event()
    worker = Dispatcher(transport=InMemoryTransport(broker))
    worker.route(OrderPaid)

    @worker.events.register(OrderPaid)
    async def hangs(event: OrderPaid) -> None:
        started.set()
        await asyncio.get_running_loop().create_future()

    async with producer(broker) as shop:
        await shop.publish(OrderPaid(0, 1.0))
    worker.start()
    consumer = worker.consumer(wait=0.01)
    reading = asyncio.create_task(consumer.run())
    await started.wait()
    reading.cancel()
    ending = None
    while ending is None:  # one turn of the loop at a time, until run() created its ending task
        await asyncio.sleep(0)
        ending = next((task for task in asyncio.all_tasks() if task.get_name() == "pybus-consumer-end"), None)
    coroutine = ending.get_coro()
    assert inspect.iscoroutine(coroutine)
    assert inspect.getcoroutinestate(coroutine) == inspect.CORO_CREATED  # not begun
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in others:
        task.cancel()
    async with asyncio.timeout(5):
        await asyncio.wait(others)
    assert (consumer.released, consumer.unreleased) == (1, 0)
    group = broker.group("default", default_name(OrderPaid))
    assert group.pending == {}
    assert list(group.again) == [(1, 0)]  # given back, not counted as an attempt
    await worker.stop()
