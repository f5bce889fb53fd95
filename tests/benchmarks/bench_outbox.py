"""The SQLAlchemy unit of work and transactional outbox on PostgreSQL, next to what they replace.

Run: `uv run python tests/benchmarks/bench_outbox.py` (`--quick` for a short run). It
starts its own redis-server (persistence off) and works in a fresh schema of the
PostgreSQL server at 127.0.0.1:5432 (`PYBUS_POSTGRES_URL`, as the tests), dropped at
the end. Autovacuum is off for the schema's tables, so their statistics change only
when the script analyzes them: they are first gathered with unsent rows in the
outbox; part 3 checks a relay pass with statistics gathered while all were sent.

1. Commands per second, with and without the outbox. `--concurrency` tasks (16) call
   `dp.execute(AddItem(n))` until `--commands` (5,000) are done, over one asyncpg pool
   of `concurrency + 4` connections. The handler inserts one row through
   `outbox.units(dp, sessions)` and adds one event:
   - local: the event is not routed; a trivial handler runs as its follow-up;
   - local + a hand-written outbox row: the same, and the handler INSERTs an outbox
     row itself (one statement, the columns pybus writes): the raw counterpart;
   - outbox: the event is routed (`dp.route`, a RedisTransport), so the unit's commit
     writes its outbox row in the same transaction; no relay runs;
   - outbox + relay: the same with `relay.run()` (batch 100) running in the same
     process, woken by each commit, sending through Redis. The clock stops at the
     last command; the rows the relay had sent by then, and how long it took to
     send the rest, are printed;
   Before each measure the tables are truncated and PostgreSQL checkpoints. The cases
   alternate in each round; each figure is its best round. Client CPU is the
   process's CPU time over the measure, per command.

2. Relay throughput, next to a raw loop. The outbox is filled with `--rows` (20,000)
   committed rows (through the unit of work: commands adding 500 routed events each),
   vacuumed and analyzed, then drained to Redis by one of:
   - pybus: `relay.send_pending()` passes until one returns 0 (`outbox.relay(dp,
     sessions, batch=B)`, the dispatcher's RedisTransport);
   - raw, one XADD at a time: SQLAlchemy core and redis-py; per batch, in one
     transaction: the relay's own SELECT (unsent rows, oldest first, `LIMIT B FOR
     UPDATE SKIP LOCKED`; the rows have no ordering key, so the relay's second query,
     for the keys another relay holds, is not made on either side), one awaited
     `XADD` per row (the fields the transport writes, `i`, `h`, `b`, to the same
     stream), `UPDATE ... SET sent_at = ... WHERE id IN (...)`, commit;
   - raw, one pipeline per batch: the same, with the batch's XADDs in one redis-py
     pipeline (one round trip);
   The outbox is refilled and Redis emptied before each drain; each figure is its
   best round.

3. Where the relay's time goes: one relay drain (batch 100) with the time spent
   awaiting `transport.send` added up; the raw loop sending nothing (the database's
   share). Then one relay pass over a burst of unsent rows when the statistics were
   gathered while every row was sent (what autovacuum records while a relay keeps
   up), before and after an ANALYZE (this relay's engine keeps no prepared
   statements, so each pass is planned with the statistics of the moment): before
   474d18f, the relay's SELECT (an anti-join for the order per key) took time in the
   square of the unsent rows there.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis
from sqlalchemy import (
    BigInteger,
    Column,
    MetaData,
    Select,
    String,
    Table,
    func,
    insert,
    select,
    text,
)
from sqlalchemy import update as sql_update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from pybus import Dispatcher, Event
from pybus.redis_streams import RedisTransport
from pybus.sqlalchemy import Outbox, Relay, SqlAlchemyUnitOfWork
from pybus.transport import Envelope
from tests.databases import POSTGRES_URL, postgres_reachable
from tests.redis_server import redis_server

FILL_PER_COMMAND = 500
PREFIX = "pybus:"
STREAM = PREFIX + "bench.item_added"


@dataclass(frozen=True)
class AddItem:
    n: int


@dataclass(frozen=True)
class Fill:
    count: int


@dataclass(frozen=True)
class ItemAdded(Event):
    n: int


metadata = MetaData()
items = Table(
    "items",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("name", String(50), nullable=False),
)
outbox = Outbox(metadata)


class TimedTransport(RedisTransport):
    """A RedisTransport that adds up the time its callers spend awaiting `send` (part 3 only)."""

    waiting = 0.0
    sends = 0

    async def send(self, envelope: Envelope) -> str:
        start = time.perf_counter()
        try:
            return await super().send(envelope)
        finally:
            self.waiting += time.perf_counter() - start
            self.sends += 1


def local_dispatcher(sessions: async_sessionmaker[AsyncSession], *, by_hand: bool = False) -> Dispatcher:
    """The command's event is local: a follow-up handled here once the unit has committed.
    `by_hand`: the handler also writes an outbox row itself, as code without pybus would."""
    dp = Dispatcher()

    @dp.commands.register(AddItem, uow=outbox.units(dp, sessions))
    async def add_item(cmd: AddItem, uow: SqlAlchemyUnitOfWork) -> None:
        async with uow:
            await uow.session.execute(items.insert().values(name=f"item {cmd.n}"))
            if by_hand:
                await uow.session.execute(insert(outbox.table), hand_written_row(cmd.n))
            uow.add_event(ItemAdded(cmd.n))

    @dp.events.register(ItemAdded)
    async def on_added(event: ItemAdded) -> None:
        return None

    return dp


def hand_written_row(n: int) -> dict[str, Any]:
    message_id = uuid.uuid4().hex
    return {
        "message_id": message_id,
        "correlation_id": message_id,
        "causation_id": None,
        "kind": "event",
        "name": "bench.item_added",
        "body": msgspec.json.encode({"n": n}),
        "headers": "{}",
        "ordering_key": None,
        "created_at": dt.datetime.now(dt.UTC),
    }


def routed_dispatcher(sessions: async_sessionmaker[AsyncSession], transport: RedisTransport) -> Dispatcher:
    """The command's event is routed: an outbox row in the command's transaction."""
    dp = Dispatcher(transport=transport)
    dp.route(ItemAdded, name="bench.item_added")
    units = outbox.units(dp, sessions)

    @dp.commands.register(AddItem, uow=units)
    async def add_item(cmd: AddItem, uow: SqlAlchemyUnitOfWork) -> None:
        async with uow:
            await uow.session.execute(items.insert().values(name=f"item {cmd.n}"))
            uow.add_event(ItemAdded(cmd.n))

    @dp.commands.register(Fill, uow=units)
    async def fill(cmd: Fill, uow: SqlAlchemyUnitOfWork) -> None:
        async with uow:
            for n in range(cmd.count):
                uow.add_event(ItemAdded(n))

    return dp


# -- the database ---------------------------------------------------------------------------


async def maintenance(engine: AsyncEngine, *statements: str) -> None:
    """Run statements outside a transaction (TRUNCATE, VACUUM, ANALYZE, CHECKPOINT)."""
    async with engine.connect() as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        for statement in statements:
            await autocommit.execute(text(statement))


async def reset(engine: AsyncEngine) -> None:
    """Empty tables (their statistics stay), and a checkpoint: each measure starts alike."""
    await maintenance(engine, f"TRUNCATE {items.name}, {outbox.table.name} RESTART IDENTITY", "CHECKPOINT")


async def unsent(engine: AsyncEngine) -> int:
    table = outbox.table
    async with engine.connect() as connection:
        query = select(func.count()).select_from(table).where(table.c.sent_at.is_(None))
        return int((await connection.execute(query)).scalar_one())


# -- 1. commands per second -------------------------------------------------------------------


@dataclass
class Measure:
    seconds: float
    cpu: float  # the process's CPU seconds over the measure
    relay_sent: int = 0  # rows the relay sent before the last command returned
    relay_after: float = 0.0  # seconds it took to send the rest


async def run_commands(dp: Dispatcher, commands: int, concurrency: int) -> Measure:
    """`concurrency` tasks execute `commands` AddItem commands in all."""
    counter = iter(range(commands))

    async def worker() -> None:
        for n in counter:
            await dp.execute(AddItem(n))

    cpu = time.process_time()
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Measure(time.perf_counter() - start, time.process_time() - cpu)


async def commands_with_relay(relay: Relay, commands: int, concurrency: int) -> Measure:
    running = asyncio.create_task(relay.run())
    try:
        measure = await run_commands(relay.dp, commands, concurrency)
        measure.relay_sent = relay.sent
        start = time.perf_counter()
        while relay.sent < commands:  # noqa: ASYNC110 - the relay's counter
            await asyncio.sleep(0.001)
        measure.relay_after = time.perf_counter() - start
    finally:
        await relay.stop()
        await running
        if relay in outbox._relays:
            outbox._relays.remove(relay)
    return measure


# -- 2. relay throughput ----------------------------------------------------------------------


def pending_query(batch: int) -> Select[Any]:
    """The relay's SELECT, written out: the oldest unsent rows that no other relay holds.
    (The relay then asks for the oldest unsent row of the ordering keys the batch has;
    the rows of this benchmark have no key, so neither side does.)"""
    table = outbox.table
    return (
        select(table)
        .where(table.c.sent_at.is_(None))
        .order_by(table.c.id)
        .limit(batch)
        .with_for_update(skip_locked=True, of=table)
    )


_header = msgspec.json.Encoder()


def entry_fields(row: Any) -> dict[str, str | bytes]:
    """The fields the Redis transport writes for a row (`i`, `h` as a JSON array, `b`)."""
    header: list[object] = [row.kind, row.name, row.message_id, row.correlation_id, row.causation_id]
    headers = json.loads(row.headers or "{}")
    if headers:
        header.append(headers)
    return {"i": row.message_id, "h": _header.encode(header), "b": bytes(row.body)}


Sender = Callable[[list[Any]], Awaitable[None]]
Passes = list[tuple[float, int]]  # (seconds, rows) per pass


async def raw_drain(engine: AsyncEngine, batch: int, send: Sender) -> Passes:
    """Drain the outbox with SQLAlchemy core: per batch, select, `send(rows)`, mark, commit."""
    table = outbox.table
    query = pending_query(batch)
    passes: Passes = []
    while True:
        start = time.perf_counter()
        async with engine.begin() as connection:
            rows = (await connection.execute(query)).all()
            if rows:
                await send(rows)
                marked = sql_update(table).where(table.c.id.in_([row.id for row in rows]))
                await connection.execute(marked.values(sent_at=dt.datetime.now(dt.UTC)))
        passes.append((time.perf_counter() - start, len(rows)))
        if not rows:
            return passes


def xadd_one_by_one(client: Any) -> Sender:
    async def send(rows: list[Any]) -> None:
        for row in rows:
            await client.xadd(PREFIX + row.name, entry_fields(row))

    return send


def xadd_pipelined(client: Any) -> Sender:
    async def send(rows: list[Any]) -> None:
        async with client.pipeline(transaction=False) as pipe:
            for row in rows:
                pipe.xadd(PREFIX + row.name, entry_fields(row))
            await pipe.execute()

    return send


async def send_nothing(rows: list[Any]) -> None:
    return None


async def relay_drain(relay: Relay) -> Passes:
    passes: Passes = []
    while True:
        start = time.perf_counter()
        sent = await relay.send_pending()
        passes.append((time.perf_counter() - start, sent))
        if not sent:
            return passes


def seconds_of(passes: Passes) -> float:
    return sum(seconds for seconds, _ in passes)


@dataclass
class Bench:
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    redis: Any
    dp: Dispatcher

    async def fill(self, rows: int, *, analyze: bool = True) -> None:
        """An outbox of `rows` committed unsent rows; vacuumed and analyzed unless told."""
        await reset(self.engine)
        await self.redis.flushdb()
        for start in range(0, rows, FILL_PER_COMMAND):
            await self.dp.execute(Fill(min(FILL_PER_COMMAND, rows - start)))
        if analyze:
            await maintenance(self.engine, f"VACUUM ANALYZE {outbox.table.name}", "CHECKPOINT")

    async def check_drained(self, rows: int) -> None:
        left = await unsent(self.engine)
        written = await self.redis.xlen(STREAM)
        if left or written != rows:
            raise RuntimeError(f"drain incomplete: {left} rows unsent, {written} of {rows} in the stream")


# -- the run ------------------------------------------------------------------------------------


async def main(commands: int, concurrency: int, rows: int, rounds: int, bursts: list[int]) -> None:
    if not postgres_reachable():
        raise SystemExit("no PostgreSQL server on 127.0.0.1:5432 (see tests/databases.py)")
    schema = f"pybus_bench_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(POSTGRES_URL)
    async with admin.begin() as connection:
        await connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = create_async_engine(
        POSTGRES_URL,
        pool_size=concurrency + 4,
        max_overflow=0,
        connect_args={"server_settings": {"search_path": schema}},
    )
    # Part 3's relay plans its SELECT at each execution, with the statistics of the moment
    # (no prepared statement kept, whose plan a connection may have made earlier).
    planning = create_async_engine(
        POSTGRES_URL,
        pool_size=2,
        connect_args={"server_settings": {"search_path": schema}, "prepared_statement_cache_size": 0},
    )
    try:
        async with engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
        await maintenance(
            engine, *(f"ALTER TABLE {table} SET (autovacuum_enabled = off)" for table in metadata.tables)
        )
        with redis_server() as (url, _):
            await run(url, engine, planning, commands, concurrency, rows, rounds, bursts)
    finally:
        await planning.dispose()
        await engine.dispose()
        async with admin.begin() as connection:
            await connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


async def run(
    url: str,
    engine: AsyncEngine,
    planning: AsyncEngine,
    commands: int,
    c: int,
    rows: int,
    rounds: int,
    bursts: list[int],
) -> None:
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    local = local_dispatcher(sessions)
    by_hand = local_dispatcher(sessions, by_hand=True)
    routed = routed_dispatcher(sessions, RedisTransport(url, group="bench"))
    timed = TimedTransport(url, group="bench")
    timed_routed = routed_dispatcher(sessions, timed)  # part 3 only
    client: Any = aioredis.Redis.from_url(url)
    bench = Bench(engine, sessions, client, routed)
    async with local, by_hand, routed, timed_routed:
        # Statistics gathered with unsent rows in the outbox: the relay's SELECT plans well.
        await bench.fill(1_000)
        await part_1(
            engine, sessions, {"local": local, "by hand": by_hand, "outbox": routed}, commands, c, rounds
        )
        await part_2(bench, rows, rounds)
        await part_3(bench, timed_routed, timed, rows, bursts, planning)
    await client.aclose()


async def part_1(
    engine: AsyncEngine,
    sessions: async_sessionmaker[AsyncSession],
    dps: dict[str, Dispatcher],
    commands: int,
    c: int,
    rounds: int,
) -> None:
    cases = {
        "local": "local follow-up event (no outbox)",
        "by hand": "local event + outbox row INSERTed by hand",
        "outbox": "pybus outbox: routed event, no relay",
        "outbox + relay": "pybus outbox: routed event, relay running",
    }
    relays: dict[str, Callable[[], Relay]] = {
        "outbox + relay": lambda: outbox.relay(dps["outbox"], sessions),
    }
    await reset(engine)
    for dp in dps.values():  # warm up: connections, prepared statements
        await run_commands(dp, min(commands, 500), c)
    best: dict[str, Measure] = {}
    relayed: dict[str, list[Measure]] = {case: [] for case in relays}
    for _ in range(rounds):
        for case in cases:
            await reset(engine)
            if case in relays:
                measure = await commands_with_relay(relays[case](), commands, c)
                relayed[case].append(measure)
            else:
                measure = await run_commands(dps[case], commands, c)
            if case not in best or measure.seconds < best[case].seconds:
                best[case] = measure
    print(
        f"1. {commands:,} commands (insert a row, add an event) by {c} concurrent tasks, "
        f"pool of {c + 4}, best of {rounds} rounds"
    )
    print(f"{'case':<43} {'commands/s':>10} {'ms/command':>10} {'CPU us/cmd':>10} {'vs local':>8}")
    for case, label in cases.items():
        measure = best[case]
        rate = commands / measure.seconds
        latency = measure.seconds / commands * c * 1000
        cpu = measure.cpu / commands * 1e6
        ratio = best["local"].seconds / measure.seconds
        print(f"{label:<43} {rate:>10,.0f} {latency:>10.2f} {cpu:>10.0f} {ratio:>7.2f}x")
    for case in ("by hand", "outbox", "outbox + relay"):
        cost = 1 - best["local"].seconds / best[case].seconds
        print(f"  {cases[case]:<43} {cost:>6.1%} fewer commands/s than local (outbox target: at most 25%)")
    for case, measures in relayed.items():
        sent = ", ".join(f"{measure.relay_sent:,}" for measure in measures)
        after = ", ".join(f"{measure.relay_after * 1000:,.0f}" for measure in measures)
        print(
            f"  {cases[case]}: rows sent by the last command, per round: {sent} of {commands:,}; "
            f"the rest sent in {after} ms"
        )


async def part_2(bench: Bench, rows: int, rounds: int) -> None:
    engine, sessions, client, dp = bench.engine, bench.sessions, bench.redis, bench.dp
    sides: dict[str, Callable[[int], Awaitable[Passes]]] = {
        "pybus relay.send_pending()": lambda batch: relay_drain(outbox.relay(dp, sessions, batch=batch)),
        "raw: XADD one by one": lambda batch: raw_drain(engine, batch, xadd_one_by_one(client)),
        "raw: one XADD pipeline per batch": lambda batch: raw_drain(engine, batch, xadd_pipelined(client)),
    }
    batches = (100, 500)
    best: dict[tuple[str, int], float] = {}
    for _ in range(rounds):
        for batch in batches:
            for side, drain in sides.items():
                await bench.fill(rows)
                seconds = seconds_of(await drain(batch))
                await bench.check_drained(rows)
                best[side, batch] = min(best.get((side, batch), float("inf")), seconds)
    print()
    print(f"2. draining {rows:,} committed outbox rows to Redis, best of {rounds} rounds")
    print(f"{'batch':>5}  {'side':<34} {'rows/s':>9} {'relay / side':>12}")
    for batch in batches:
        relay_seconds = best["pybus relay.send_pending()", batch]
        for side in sides:
            seconds = best[side, batch]
            print(f"{batch:>5}  {side:<34} {rows / seconds:>9,.0f} {seconds / relay_seconds:>11.2f}x")
    print("  target: the relay at least 0.70x of the raw loop")


async def part_3(
    bench: Bench,
    timed_dp: Dispatcher,
    timed: TimedTransport,
    rows: int,
    bursts: list[int],
    planning: AsyncEngine,
) -> None:
    engine, sessions = bench.engine, bench.sessions
    batch = 100
    print()
    print(f"3. where the relay's time goes (one drain each of {rows:,} rows, batch {batch})")
    await bench.fill(rows)
    passes = await relay_drain(outbox.relay(timed_dp, sessions, batch=batch))
    await bench.check_drained(rows)
    total = seconds_of(passes)
    # The relay sends the rows of a pass concurrently (those of one key in order), so the
    # time its sends spend awaiting is summed over sends that overlap: compare it to the
    # drain's time to see how much overlapping there is, not to split the drain.
    print(
        f"  relay: {total:.2f} s, {rows / total:,.0f} rows/s; {timed.sends:,} sends awaited "
        f"{timed.waiting:.2f} s in all, overlapping ({timed.waiting / timed.sends * 1e6:.0f} us each, "
        f"{timed.waiting / total:.1f} sends in flight on average)"
    )
    await bench.fill(rows)
    seconds = seconds_of(await raw_drain(engine, batch, send_nothing))
    print(
        f"  the raw loop sending nothing (the database's share): {seconds:.2f} s, "
        f"{rows / seconds:,.0f} rows/s"
    )
    relay = outbox.relay(bench.dp, async_sessionmaker(planning, expire_on_commit=False), batch=batch)
    for burst in bursts:
        # The relay has kept up: every row is sent (and kept, as for keep_sent), and the
        # statistics are gathered then. Then a burst of unsent rows comes.
        await bench.fill(burst, analyze=False)
        await relay_drain(relay)
        await maintenance(engine, f"ANALYZE {outbox.table.name}")
        for first in range(0, burst, FILL_PER_COMMAND):
            await bench.dp.execute(Fill(min(FILL_PER_COMMAND, burst - first)))
        clock = time.perf_counter()
        await relay.send_pending()
        stale = time.perf_counter() - clock
        await maintenance(engine, f"ANALYZE {outbox.table.name}")
        clock = time.perf_counter()
        await relay.send_pending()
        fresh = time.perf_counter() - clock
        print(
            f"  one relay pass, {burst:,} rows unsent, statistics from when all were sent: "
            f"{stale * 1000:6,.0f} ms; after ANALYZE: {fresh * 1000:4.0f} ms"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=5_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1,000 commands, 5,000 rows, 2 rounds")
    options = parser.parse_args()
    bursts = [1_000, 2_000, 4_000]
    if options.quick:
        options.commands, options.rows, options.rounds, bursts = 1_000, 5_000, 2, [1_000, 2_000]
    asyncio.run(main(options.commands, options.concurrency, options.rows, options.rounds, bursts))
