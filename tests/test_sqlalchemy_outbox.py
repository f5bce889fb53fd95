"""The SQLAlchemy unit of work, outbox and inbox, on SQLite and on PostgreSQL: outbox rows
written atomically with the handler's writes, the relay after a crash, two relays that
never send a row twice, order per key, cleanup, and the inbox skipping a redelivery."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, String, Table, func, select
from sqlalchemy.exc import IntegrityError

from pybus import Dispatcher, Event, HandlingContext, ImproperlyConfigured
from pybus.sqlalchemy import Outbox, SqlAlchemyUnitOfWork
from pybus.transport import Envelope, InMemoryBroker, InMemoryTransport
from tests.consuming import consuming, until
from tests.databases import Database, database


@dataclass(frozen=True)
class CreateUser:
    name: str
    fail: bool = False


@dataclass(frozen=True)
class UserCreated(Event):
    name: str


@dataclass(frozen=True)
class Audited(Event):
    name: str


class Recording(InMemoryTransport):
    """An in-memory transport that remembers every envelope sent, in order."""

    def __init__(self, broker: InMemoryBroker, *, group: str = "default", pause: float = 0) -> None:
        super().__init__(broker, group=group)
        self.sent: list[Envelope] = []
        self.pause = pause

    async def send(self, envelope: Envelope) -> str:
        if self.pause:
            await asyncio.sleep(self.pause)  # let another relay run meanwhile
        self.sent.append(envelope)
        return await super().send(envelope)


@pytest.fixture(params=["sqlite", "postgresql"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    async with database(request.param, tmp_path) as found:
        yield found


def shop(db: Database, broker: InMemoryBroker) -> tuple[Dispatcher, Outbox, Table, list[object]]:
    """A service whose command writes a user and emits a routed event and a local one."""
    users = Table("users", db.metadata, Column("id", Integer, primary_key=True), Column("name", String(50)))
    outbox = Outbox(db.metadata)
    dp = Dispatcher(transport=Recording(broker, group="shop"))
    dp.route(UserCreated)
    local: list[object] = []

    @dp.commands.register(CreateUser, uow=outbox.units(dp, db.sessions))
    async def create_user(cmd: CreateUser, uow: SqlAlchemyUnitOfWork) -> None:
        async with uow:
            await uow.session.execute(users.insert().values(name=cmd.name))
            uow.add_event(UserCreated(cmd.name))  # routed: an outbox row in this transaction
            uow.add_event(Audited(cmd.name))  # local: a follow-up once committed
            if cmd.fail:
                raise ValueError("failed after the writes")

    @dp.events.register(Audited)
    async def audit(event: Audited) -> None:
        local.append(event)

    return dp, outbox, users, local


async def count(db: Database, table: Table, *where: Any) -> int:
    async with db.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(table).where(*where)) or 0)


async def test_a_commit_writes_the_outbox_row_with_the_handlers_writes_and_the_relay_sends_it(
    db: Database,
) -> None:
    broker = InMemoryBroker()
    dp, outbox, users, local = shop(db, broker)
    await db.create_tables()
    relay = outbox.relay(dp, db.sessions, poll=0.01)
    async with dp:
        running = asyncio.create_task(relay.run())
        try:
            await dp.execute(CreateUser("ada"))
            await until(lambda: relay.sent == 1)
        finally:
            await relay.stop()
            await running
    assert await count(db, users) == 1
    assert local == [Audited("ada")]
    assert await count(db, outbox.table, outbox.table.c.sent_at.is_not(None)) == 1
    (envelope,) = dp.transport.sent  # type: ignore[union-attr]
    assert envelope.name.endswith("UserCreated")
    assert envelope.correlation_id != envelope.message_id  # caused by the command: a child of its handling


async def test_a_failure_after_the_writes_leaves_neither_the_writes_nor_the_outbox_row(db: Database) -> None:
    broker = InMemoryBroker()
    dp, outbox, users, local = shop(db, broker)
    await db.create_tables()
    async with dp:
        with pytest.raises(ValueError, match="failed after the writes"):
            await dp.execute(CreateUser("ada", fail=True))
    assert await count(db, users) == 0
    assert await count(db, outbox.table) == 0
    assert local == []


async def test_rows_left_by_a_crash_between_commit_and_send_are_sent_by_the_next_relay(db: Database) -> None:
    broker = InMemoryBroker()
    dp, outbox, _, _ = shop(db, broker)
    await db.create_tables()
    async with dp:  # no relay runs: the process "dies" after the commits
        for name in ("ada", "bob", "cy"):
            await dp.execute(CreateUser(name))
    assert await count(db, outbox.table, outbox.table.c.sent_at.is_(None)) == 3
    later, later_outbox, _, _ = shop(Database(db.name, db.engine, db.sessions, type(db.metadata)()), broker)
    relay = later_outbox.relay(later, db.sessions)
    async with later:
        assert await relay.send_pending() == 3
        assert await relay.send_pending() == 0
    sent = [envelope.body for envelope in later.transport.sent]  # type: ignore[union-attr]
    assert sent == [b'{"name":"ada"}', b'{"name":"bob"}', b'{"name":"cy"}']


async def test_cleanup_deletes_rows_sent_longer_ago_than_keep_sent(db: Database) -> None:
    broker = InMemoryBroker()
    dp, outbox, _, _ = shop(db, broker)
    await db.create_tables()
    relay = outbox.relay(dp, db.sessions, keep_sent=0)
    async with dp:
        await dp.execute(CreateUser("ada"))
        assert await relay.cleanup() == 0  # not sent yet: kept
        await relay.send_pending()
        await asyncio.sleep(0.01)
        assert await relay.cleanup() == 1
    assert await count(db, outbox.table) == 0


@dataclass(frozen=True)
class Ship:
    order: int
    step: int


@dataclass(frozen=True)
class Shipped(Event):
    order: int
    step: int


@pytest.fixture
async def postgres(tmp_path: Path) -> AsyncIterator[Database]:
    """PostgreSQL only: SQLite has no row locks, and runs one relay per database (docs/outbox.md)."""
    async with database("postgresql", tmp_path) as found:
        yield found


async def test_two_relays_never_send_a_row_twice_and_keep_the_order_of_each_key(postgres: Database) -> None:
    db = postgres
    broker = InMemoryBroker()
    outbox = Outbox(db.metadata)
    dp = Dispatcher(transport=Recording(broker, group="shop", pause=0.001))
    dp.route(Shipped)

    @dp.commands.register(Ship, uow=outbox.units(dp, db.sessions))
    async def ship(cmd: Ship, uow: SqlAlchemyUnitOfWork) -> None:
        async with uow:
            uow.send(Shipped(cmd.order, cmd.step), key=cmd.order)  # routed: ordered by order id

    await db.create_tables()
    async with dp:
        # Each order's steps one after the other: a batch holds several steps of one order,
        # and the next batch (the other relay's) the rest of them.
        for order in range(20):
            for step in range(5):
                await dp.execute(Ship(order, step))
        first, second = (outbox.relay(dp, db.sessions, batch=7) for _ in range(2))

        async def drain(relay: Any) -> None:
            while await relay.send_pending():
                pass

        await asyncio.gather(drain(first), drain(second))
        await drain(first)  # rows skipped while the other relay held their key's older row
    assert first.sent > 0
    assert second.sent > 0
    envelopes = dp.transport.sent  # type: ignore[union-attr]
    assert len(envelopes) == len({envelope.message_id for envelope in envelopes}) == 100
    steps: dict[int, list[int]] = {}
    for envelope in envelopes:
        body = envelope.body.decode()
        order, step = (int(part.split(":")[1]) for part in body.strip("{}").split(","))
        steps.setdefault(order, []).append(step)
    assert steps == {order: list(range(5)) for order in range(20)}


@dataclass(frozen=True)
class Open:
    pass


@dataclass(frozen=True)
class Charge(Event):
    n: int


async def test_an_idempotent_unit_skips_a_redelivered_message_and_acks_it(db: Database) -> None:
    broker = InMemoryBroker()
    shop_dp = Dispatcher(transport=InMemoryTransport(broker, group="shop"))
    shop_dp.route(Charge)
    charges = Table("charges", db.metadata, Column("n", Integer, primary_key=True))
    outbox = Outbox(db.metadata)
    worker = Dispatcher(transport=InMemoryTransport(broker, group="billing"), on_error=lambda e, m: None)
    worker.route(Charge)
    runs: list[tuple[int, int]] = []

    @worker.events.register(Charge, uow=outbox.units(worker, db.sessions, idempotent=True))
    async def bill(event: Charge, uow: SqlAlchemyUnitOfWork, context: HandlingContext) -> None:
        runs.append((event.n, context.delivery))
        async with uow:
            await uow.session.execute(charges.insert().values(n=event.n))
        if context.delivery == 1:
            raise ConnectionError("the ack was lost")  # committed, but the delivery fails

    await db.create_tables()
    async with shop_dp, consuming(worker) as consumer:
        await shop_dp.publish(Charge(1))
        await until(lambda: consumer.handled == 1)
    assert runs == [(1, 1)]  # delivery 2 found the inbox row: the handler did not run again
    assert consumer.failed == 1
    assert await count(db, charges) == 1
    assert await count(db, outbox.inbox) == 1


async def test_misuse_is_refused_with_the_fix(db: Database) -> None:
    with pytest.raises(ImproperlyConfigured, match=r"takes the application's sqlalchemy\.MetaData"):
        Outbox(object())  # type: ignore[arg-type]
    outbox = Outbox(db.metadata)
    dp = Dispatcher()
    with pytest.raises(ImproperlyConfigured, match="async_sessionmaker"):
        outbox.units(dp, object())  # type: ignore[arg-type]
    with pytest.raises(ImproperlyConfigured, match="it has none"):
        outbox.relay(dp, db.sessions)


async def test_serve_runs_the_relay_and_stops_it_before_the_transport_closes(db: Database) -> None:
    broker = InMemoryBroker()
    dp, outbox, _, _ = shop(db, broker)
    await db.create_tables()
    relay = outbox.relay(dp, db.sessions, poll=10)  # only the fast path can send in time
    dp.add_service(relay)
    with pytest.raises(ImproperlyConfigured, match="async def run"):
        dp.add_service(object())  # type: ignore[arg-type]
    serving = asyncio.create_task(dp.serve(stop_signals=()))
    await until(lambda: dp.started)
    await dp.execute(CreateUser("ada"))
    await until(lambda: relay.sent == 1)  # woken by the commit, not by the 10 s poll
    await dp.stop()
    await serving
    assert await count(db, outbox.table, outbox.table.c.sent_at.is_(None)) == 0


async def test_two_deliveries_racing_for_the_inbox_run_the_handler_once(db: Database) -> None:
    charges = Table("charges", db.metadata, Column("n", Integer, primary_key=True))
    outbox = Outbox(db.metadata)
    dp = Dispatcher(context=True)
    runs: list[int] = []
    inside = asyncio.Event()
    release = asyncio.Event()

    @dp.commands.register(Charge, uow=outbox.units(dp, db.sessions, idempotent=True))
    async def bill(cmd: Charge, uow: SqlAlchemyUnitOfWork) -> None:
        runs.append(cmd.n)
        async with uow:
            await uow.session.execute(charges.insert().values(n=cmd.n))
            inside.set()
            await release.wait()  # the first holds its transaction open while the second claims

    await db.create_tables()
    async with dp:
        # Two deliveries of one message (one id), as two consumers would run them.
        delivery = Envelope("command", "Charge", b"{}", message_id="m1", correlation_id="m1")
        engine = dp.commands.engine
        assert engine is not None
        first = asyncio.create_task(engine.deliver(Charge(1), delivery))
        await inside.wait()
        second = asyncio.create_task(engine.deliver(Charge(1), delivery))
        await asyncio.sleep(0.2)  # the second waits on the first's row lock (or the database lock)
        release.set()
        await asyncio.gather(first, second)
    assert runs == [1]
    assert await count(db, charges) == 1


async def test_a_send_that_fails_mid_batch_marks_what_was_sent_and_keeps_the_rest(db: Database) -> None:
    class Failing(Recording):
        async def send(self, envelope: Envelope) -> str:
            if len(self.sent) == 2:
                raise ConnectionError(f"the broker went away before {envelope.body.decode()}")
            return await super().send(envelope)

    broker = InMemoryBroker()
    dp, outbox, _, _ = shop(db, broker)
    dp.transport = Failing(broker, group="shop")
    await db.create_tables()
    relay = outbox.relay(dp, db.sessions)
    async with dp:
        for name in ("ada", "bob", "cy", "dee"):
            await dp.execute(CreateUser(name))
        with pytest.raises(ExceptionGroup, match="2 sends of the outbox relay failed") as raised:
            await relay.send_pending()
    # Each failed send is raised (rows without a key are sent at once: cy and dee both failed).
    assert sorted(str(error) for error in raised.value.exceptions) == [
        'the broker went away before {"name":"cy"}',
        'the broker went away before {"name":"dee"}',
    ]
    assert all(isinstance(error, ConnectionError) for error in raised.value.exceptions)
    assert relay.sent == 2
    assert await count(db, outbox.table, outbox.table.c.sent_at.is_(None)) == 2  # sent again later, once


async def test_a_key_whose_middle_row_another_relay_holds_waits_for_it(postgres: Database) -> None:
    db = postgres
    broker = InMemoryBroker()
    outbox = Outbox(db.metadata)
    dp = Dispatcher(transport=Recording(broker, group="shop"))
    dp.route(Shipped)

    @dp.commands.register(Ship, uow=outbox.units(dp, db.sessions))
    async def ship(cmd: Ship, uow: SqlAlchemyUnitOfWork) -> None:
        async with uow:
            uow.send(Shipped(cmd.order, cmd.step), key=cmd.order)

    await db.create_tables()
    table = outbox.table
    async with dp:
        for step in range(3):
            await dp.execute(Ship(7, step))
        relay = outbox.relay(dp, db.sessions)
        async with db.sessions() as other, other.begin():  # another relay holds the middle row
            middle = (
                await other.execute(select(table.c.id).order_by(table.c.id).offset(1).limit(1))
            ).scalar_one()
            await other.execute(select(table).where(table.c.id == middle).with_for_update())
            assert await relay.send_pending() == 1  # step 0; step 2 waits behind the held step 1
        assert await relay.send_pending() == 2
    steps = [envelope.body for envelope in dp.transport.sent]  # type: ignore[union-attr]
    assert steps == [b'{"order":7,"step":0}', b'{"order":7,"step":1}', b'{"order":7,"step":2}']


async def test_two_registrations_with_one_inbox_name_are_refused_not_skipped(db: Database) -> None:
    outbox = Outbox(db.metadata)
    dp = Dispatcher(context=True)

    def make(name: str) -> Any:
        async def handler(event: Charge, uow: SqlAlchemyUnitOfWork) -> None:
            async with uow:
                pass

        handler.__qualname__ = name
        return handler

    dp.events.bind(Charge, make("bill"), uow=outbox.units(dp, db.sessions, idempotent=True))
    dp.events.bind(Charge, make("bill"), uow=outbox.units(dp, db.sessions, idempotent=True))
    await db.create_tables()
    async with dp:
        with pytest.raises(ExceptionGroup) as raised:
            await dp.publish(Charge(1))
    (error,) = raised.value.exceptions
    assert isinstance(error, ImproperlyConfigured)
    assert "one would skip the other's messages" in str(error)


async def test_an_app_table_named_like_the_inbox_fails_as_itself(db: Database) -> None:
    outbox = Outbox(db.metadata, inbox_table="inbox")
    items = Table("inbox_items", db.metadata, Column("n", Integer, primary_key=True))
    dp = Dispatcher(context=True)

    @dp.commands.register(Charge, uow=outbox.units(dp, db.sessions, idempotent=True))
    async def bill(cmd: Charge, uow: SqlAlchemyUnitOfWork) -> None:
        async with uow:
            await uow.session.execute(items.insert().values(n=1))  # the second one fails

    await db.create_tables()
    async with dp:
        await dp.execute(Charge(1))
        with pytest.raises(IntegrityError):
            await dp.execute(Charge(2))  # another message: its own failure, not "already handled"


@pytest.mark.parametrize("idempotent", [False, True])
async def test_writes_through_a_unit_never_entered_are_raised_not_lost(
    db: Database, idempotent: bool
) -> None:
    outbox = Outbox(db.metadata)
    items = Table("items", db.metadata, Column("n", Integer, primary_key=True))
    dp = Dispatcher(context=True)
    units = outbox.units(dp, db.sessions, idempotent=idempotent)

    @dp.commands.register(Charge, uow=units)
    async def forgetful(cmd: Charge, uow: SqlAlchemyUnitOfWork) -> None:
        await uow.session.execute(items.insert().values(n=cmd.n))  # outside `async with uow:`

    @dp.commands.register(Open, uow=units)
    async def idle(cmd: Open, uow: SqlAlchemyUnitOfWork) -> None:
        pass  # nothing to write: the unit is not needed

    await db.create_tables()
    async with dp:
        with pytest.raises(ImproperlyConfigured, match="the unit was never entered"):
            await dp.execute(Charge(1))
        await dp.execute(Open())
    assert await count(db, items) == 0
    assert await count(db, outbox.inbox) == 0  # an idempotent one's pair too: a redelivery runs it


async def test_two_idempotent_units_in_one_handling_are_refused(db: Database) -> None:
    outbox = Outbox(db.metadata)
    dp = Dispatcher(context=True)
    units = outbox.units(dp, db.sessions, idempotent=True)

    @dp.commands.register(Charge, first=units, second=units)
    async def twice(cmd: Charge, first: SqlAlchemyUnitOfWork, second: SqlAlchemyUnitOfWork) -> None:
        raise AssertionError("not reached")

    await db.create_tables()
    async with dp, asyncio.timeout(10):
        with pytest.raises(ImproperlyConfigured, match="Two idempotent units of work in one handling"):
            await dp.execute(Charge(1))


async def test_an_ordering_key_too_long_for_the_outbox_is_refused_with_the_fix(db: Database) -> None:
    broker = InMemoryBroker()
    dp, outbox, _, _ = shop(db, broker)

    @dp.commands.register(Ship, uow=outbox.units(dp, db.sessions))
    async def ship(cmd: Ship, uow: SqlAlchemyUnitOfWork) -> None:
        async with uow:
            uow.send(UserCreated("x"), key="k" * 300)

    await db.create_tables()
    async with dp:
        with pytest.raises(ImproperlyConfigured, match="longer than 255 characters"):
            await dp.execute(Ship(1, 1))


@dataclass(frozen=True)
class Job(Event):
    n: int


async def test_rows_committed_during_the_drain_are_sent_before_the_transport_closes(db: Database) -> None:
    broker = InMemoryBroker()
    outbox = Outbox(db.metadata)
    worker = Dispatcher(transport=Recording(broker, group="billing"))
    worker.route(Job)
    worker.route(UserCreated)
    started = asyncio.Event()

    @worker.events.register(Job, uow=outbox.units(worker, db.sessions))
    async def job(event: Job, uow: SqlAlchemyUnitOfWork) -> None:
        started.set()
        await asyncio.sleep(0.2)  # still running when the stop comes
        async with uow:
            uow.add_event(UserCreated(f"job {event.n}"))  # an outbox row, committed in the drain

    await db.create_tables()
    relay = outbox.relay(worker, db.sessions, poll=10)
    worker.add_service(relay)
    sender = Dispatcher(transport=InMemoryTransport(broker, group="shop"))
    sender.route(Job)
    async with sender:
        serving = asyncio.create_task(worker.serve(stop_signals=(), wait=0.01))
        await sender.publish(Job(1))
        await started.wait()
        assert await worker.stop(5) == 0
        await serving
    assert relay.sent == 1
    assert await count(db, outbox.table, outbox.table.c.sent_at.is_(None)) == 0


async def test_a_service_that_does_not_end_is_cancelled_after_its_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    class Stuck:
        def __init__(self) -> None:
            self.cancelled = False

        async def run(self) -> None:
            try:
                await asyncio.Event().wait()  # a pass blocked on a lock, say
            except asyncio.CancelledError:
                self.cancelled = True
                raise

        async def stop(self) -> None:
            pass  # it cannot hear it

    # (`pybus.dispatcher` is the ready Dispatcher instance; the module is in sys.modules)
    monkeypatch.setattr(sys.modules["pybus.dispatcher"], "SERVICE_GRACE", 0.05)
    dp = Dispatcher()
    stuck = Stuck()
    dp.add_service(stuck)
    serving = asyncio.create_task(dp.serve(stop_signals=()))
    await until(lambda: dp.started)
    async with asyncio.timeout(5):
        await dp.stop()
        await serving
    assert stuck.cancelled


async def test_a_relay_pass_that_fails_goes_to_the_error_hook_and_the_next_pass_sends(db: Database) -> None:
    class Refusing(Recording):
        refuse = True

        async def send(self, envelope: Envelope) -> str:
            if Refusing.refuse:
                raise ConnectionError("the broker is away")
            return await super().send(envelope)

    heard: list[BaseException] = []

    async def on_error(error: BaseException, message: object) -> None:  # async: awaited too
        heard.append(error)
        Refusing.refuse = False  # the broker is back for the next pass

    broker = InMemoryBroker()
    dp, outbox, _, _ = shop(db, broker)
    dp.transport = Refusing(broker, group="shop")
    dp.on_error = on_error
    await db.create_tables()
    relay = outbox.relay(dp, db.sessions, poll=0.01)
    async with dp:
        await dp.execute(CreateUser("ada"))
        running = asyncio.create_task(relay.run())
        try:
            await until(lambda: relay.sent == 1)
        finally:
            await relay.stop()
            await running
    assert [str(error) for error in heard] == ["the broker is away"]
    assert relay.failed == 1


async def test_two_passes_of_one_relay_at_once_send_each_row_once(db: Database) -> None:
    # `run()` in a service and a `send_pending()` from a script or a test, say: on SQLite,
    # which has no row locks, the second pass would read the rows the first is sending.
    broker = InMemoryBroker()
    dp, outbox, _, _ = shop(db, broker)
    transport = Recording(broker, group="shop", pause=0.01)  # a pass is still sending when the other reads
    dp.transport = transport
    await db.create_tables()
    relay = outbox.relay(dp, db.sessions)
    async with dp:
        for name in ("ada", "bob", "cy"):
            await dp.execute(CreateUser(name))
        counts = await asyncio.gather(relay.send_pending(), relay.send_pending())
    assert sorted(counts) == [0, 3]
    assert relay.sent == 3
    sent = [envelope.body for envelope in transport.sent]
    assert sent == [b'{"name":"ada"}', b'{"name":"bob"}', b'{"name":"cy"}']


async def test_a_delivery_waiting_on_the_inbox_runs_the_handler_when_the_first_rolls_back(
    db: Database,
) -> None:
    charges = Table("charges", db.metadata, Column("n", Integer, primary_key=True))
    outbox = Outbox(db.metadata)
    dp = Dispatcher(context=True)
    runs: list[int] = []
    inside = asyncio.Event()
    release = asyncio.Event()

    @dp.commands.register(Charge, uow=outbox.units(dp, db.sessions, idempotent=True))
    async def bill(cmd: Charge, uow: SqlAlchemyUnitOfWork) -> None:
        runs.append(len(runs) + 1)
        async with uow:
            await uow.session.execute(charges.insert().values(n=cmd.n))
            if len(runs) == 1:
                inside.set()
                await release.wait()
                raise ConnectionError("the first delivery fails: its inbox row is rolled back")

    await db.create_tables()
    async with dp:
        delivery = Envelope("command", "Charge", b"{}", message_id="m1", correlation_id="m1")
        engine = dp.commands.engine
        assert engine is not None
        first = asyncio.create_task(engine.deliver(Charge(1), delivery))
        await inside.wait()
        second = asyncio.create_task(engine.deliver(Charge(1), delivery))
        await asyncio.sleep(0.2)  # the second waits on the first's row lock (or the database lock)
        release.set()
        with pytest.raises(ConnectionError, match="the first delivery fails"):
            await first
        await second  # not AlreadyHandled: the pair was never committed
    assert runs == [1, 2]
    assert await count(db, charges) == 1
    assert await count(db, outbox.inbox) == 1


async def test_stop_during_a_pass_ends_run_after_one_last_pass_that_sends_what_came_meanwhile(
    db: Database,
) -> None:
    class Gated(Recording):
        def __init__(self, broker: InMemoryBroker) -> None:
            super().__init__(broker, group="shop")
            self.sending = asyncio.Event()
            self.gate = asyncio.Event()

        async def send(self, envelope: Envelope) -> str:
            self.sending.set()
            await self.gate.wait()
            return await super().send(envelope)

    broker = InMemoryBroker()
    dp, outbox, _, _ = shop(db, broker)
    transport = Gated(broker)
    dp.transport = transport
    await db.create_tables()
    relay = outbox.relay(dp, db.sessions, poll=10)  # only the wake-ups and the last pass send
    async with dp:
        await dp.execute(CreateUser("ada"))
        running = asyncio.create_task(relay.run())
        await transport.sending.wait()  # the first pass is sending ada
        await relay.stop()
        await relay.stop()  # twice: the same
        await dp.execute(CreateUser("bob"))  # committed during the pass: for the last one
        transport.gate.set()
        await running
        assert await relay.send_pending() == 0
    assert [envelope.body for envelope in transport.sent] == [b'{"name":"ada"}', b'{"name":"bob"}']
    assert relay.sent == 2
    assert relay.failed == 0
    assert await count(db, outbox.table, outbox.table.c.sent_at.is_(None)) == 0


async def test_the_relays_settings_are_checked_when_it_is_made(db: Database) -> None:
    broker = InMemoryBroker()
    dp, outbox, _, _ = shop(db, broker)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"batch": 0}, r"batch must be a whole number >= 1, not 0"),
        ({"poll": 0}, r"relay\(poll=0\): a number of seconds > 0$"),
        ({"poll": True}, r"relay\(poll=True\): a number of seconds > 0$"),
        ({"cleanup_every": -1}, r"relay\(cleanup_every=-1\): a number of seconds > 0$"),
        ({"keep_sent": -1}, r"relay\(keep_sent=-1\): a number of seconds > 0 \(or 0\)"),
        ({"keep_sent": False}, r"relay\(keep_sent=False\): a number of seconds > 0 \(or 0\)"),
        ({"keep_sent": float("nan")}, r"relay\(keep_sent=nan\): a number of seconds > 0 \(or 0\)"),
    ]
    for given, refused in cases:
        with pytest.raises(ImproperlyConfigured, match=refused):
            outbox.relay(dp, db.sessions, **given)


async def test_a_keep_sent_longer_than_the_calendar_keeps_every_sent_row(db: Database) -> None:
    broker = InMemoryBroker()
    dp, outbox, _, _ = shop(db, broker)
    await db.create_tables()
    forever = outbox.relay(dp, db.sessions, keep_sent=float("inf"))
    ages = outbox.relay(dp, db.sessions, keep_sent=1e12)  # beyond the year 1
    async with dp:
        await dp.execute(CreateUser("ada"))
        await forever.send_pending()
        assert await forever.cleanup() == 0  # no cutoff before the first day of the calendar
        assert await ages.cleanup() == 0
    assert await count(db, outbox.table) == 1


async def test_the_same_handler_in_two_dispatchers_shares_its_inbox_like_two_processes(db: Database) -> None:
    # One Outbox on the application's metadata, and a factory that makes a dispatcher (as
    # examples/outbox_worker.py's create_worker): two of them in one process are two
    # workers of one handler, as two processes would be, not two registrations at odds.
    charges = Table("charges", db.metadata, Column("n", Integer))
    outbox = Outbox(db.metadata)
    runs: list[str] = []

    def create_worker(label: str) -> Dispatcher:
        dp = Dispatcher(context=True)

        @dp.commands.register(Charge, uow=outbox.units(dp, db.sessions, idempotent=True))
        async def bill(cmd: Charge, uow: SqlAlchemyUnitOfWork) -> None:
            runs.append(label)
            async with uow:
                await uow.session.execute(charges.insert().values(n=cmd.n))

        return dp

    await db.create_tables()
    delivery = Envelope("command", "Charge", b"{}", message_id="m1", correlation_id="m1")
    for label in ("first", "second"):
        async with create_worker(label) as dp:
            engine = dp.commands.engine
            assert engine is not None
            await engine.deliver(Charge(1), delivery)  # the second finds the first's inbox row
            await engine.deliver(Charge(2), Envelope("command", "Charge", b"{}", label, label))
    assert runs == ["first", "first", "second"]
    assert await count(db, charges) == 3


async def test_an_outbox_does_not_keep_its_relays_nor_their_dispatchers_alive(db: Database) -> None:
    # A module-level Outbox outlives the dispatchers and relays a factory makes (per test, say).
    import gc
    import weakref

    outbox = Outbox(db.metadata)
    await db.create_tables()
    broker = InMemoryBroker()
    dp = Dispatcher(transport=InMemoryTransport(broker, group="shop"))
    relay = outbox.relay(dp, db.sessions)
    async with dp:
        await relay.send_pending()
    gone_relay, gone_dp = weakref.ref(relay), weakref.ref(dp)
    del relay, dp
    gc.collect()
    assert gone_relay() is None
    assert gone_dp() is None
    outbox.wake()  # no relay left to wake: nothing happens
