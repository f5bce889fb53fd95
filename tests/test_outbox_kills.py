"""A fault test with real processes for the outbox and the inbox (examples/outbox_worker.py).

The test process places 10,000 orders, 20 at a time: each `PlaceOrder(n)` inserts the
order `n` and, in the same transaction, the outbox row of `OrderPlaced(n)`. It runs no
relay of its own: one relay process (`python -m examples.outbox_worker relay`) is the
only sender, so every event goes through the process that gets killed (an in-process
relay, woken by each commit, would take nearly every row at once and leave the relay
process nothing to die with). One `pybus worker` process turns each event into a
shipment through an idempotent unit of work (its inbox row in the shipment's
transaction). Meanwhile two killer tasks SIGKILL the relay and the worker at random
moments (several times each) and restart them: the worker under its name or a new one,
so that its entries come back either as its own pending entries or by a claim after
`claim_idle` (1 s). At the end the last relay and worker drain and stop on SIGTERM.

Then each order and each shipment exists exactly once (`shipments.n` has no unique
constraint: a second effect would be a second row, counted here), no outbox row is
unsent, the inbox holds one row per event, nothing is pending or dead-lettered. So that
it cannot pass vacuously, the test asserts that at least one relay was killed between
sending rows and marking them (entries it added to the stream whose outbox row is still
unsent right after the kill: they are sent again, duplicates the consumer must absorb)
and that at least one worker was killed at work holding entries it had not acked
(delivered again after the restart); it kills once more, up to EXTRA_KILLS times, until
that happened. Most kills come a random moment after the process was seen at work, the
others at any moment after its start.

Autovacuum is off on the test server, so the outbox table's statistics never learn of
the backlog: the relay's query must stay fast without them (an earlier one was quadratic
in the backlog then, and this test fell behind for good).

The moments come from a seeded RNG; the seed is printed and named in every failure, and
PYBUS_KILL_SEED=<seed> replays a run's choices (the timing of the processes varies).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from sqlalchemy import func, select, text

from examples import outbox_worker as app
from tests.databases import POSTGRES_URL, Database, database

ORDERS = 10_000
CONCURRENCY = 20  # commands in flight in the test process
KILLS = 5  # of each process
EXTRA_KILLS = 15  # at most, while no kill of that process hit work in flight
ANY_MOMENT = 0.25  # the share of kills at any moment (else a little after the process was seen busy)
WORKER_CONCURRENCY = 8
STREAM = f"pybus:{app.ROUTE}"
GROUP = "shipping"
ROOT = Path(__file__).resolve().parent.parent
PYBUS = Path(sys.executable).with_name("pybus")


@dataclass
class Fleet:
    """The relay and worker processes; every start writes its own log files in `logs`."""

    logs: Path
    env: dict[str, str]
    relay: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    worker_name: str = ""
    starts: int = 0
    outputs: list[Path] = field(default_factory=list)

    def _start(self, label: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        self.starts += 1
        out = self.logs / f"{self.starts:02d}-{label}.out"
        err = self.logs / f"{self.starts:02d}-{label}.err"
        self.outputs.append(out)
        with out.open("wb") as stdout, err.open("wb") as stderr:
            return subprocess.Popen(command, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)

    def start_relay(self) -> None:
        self.relay = self._start("relay", [sys.executable, "-m", "examples.outbox_worker", "relay"], self.env)

    def start_worker(self, name: str) -> None:
        self.worker_name = name
        command = [
            str(PYBUS), "worker", "examples.outbox_worker:create_worker",
            "--concurrency", str(WORKER_CONCURRENCY), "--drain-timeout", "5",
        ]  # fmt: skip
        self.worker = self._start(f"worker-{name}", command, {**self.env, "PYBUS_CONSUMER": name})

    def running(self) -> dict[str, subprocess.Popen[bytes]]:
        both = {"relay": self.relay, "worker": self.worker}
        return {label: process for label, process in both.items() if process is not None}

    def inbox_skips(self) -> int:
        """Deliveries the workers' inbox skipped (printed by examples/outbox_worker.py)."""
        return sum(
            line.startswith("inbox-skip ") for out in self.outputs for line in out.read_text().splitlines()
        )

    def errors(self) -> str:
        """The last lines of every process's stderr, for a failure message."""
        return "\n".join(
            f"--- {err.name}:\n" + "\n".join(err.read_text().splitlines()[-15:])
            for err in sorted(self.logs.glob("*.err"))
            if err.stat().st_size
        )


@dataclass
class Kill:
    target: str  # "relay" or "worker"
    at: float  # seconds since the start
    when: str  # "busy" (a little after it was seen at work), "at any moment", ...
    in_flight: int  # relay: rows it sent and had not marked; worker: entries held, not acked
    note: str = ""

    @property
    def hit_work_in_flight(self) -> bool:
        """A relay's count is exact (its own rows); a worker restarted under its name may hold
        its predecessor's entries: only one killed at work counts."""
        return self.in_flight > 0 and (self.target == "relay" or self.when == "busy")

    def __str__(self) -> str:
        what = "rows sent, not marked" if self.target == "relay" else "entries not acked"
        return f"{self.at:.1f}s {self.target} killed {self.when}: {self.in_flight} {what}{self.note}"


class Observer:
    """Reads the database and Redis from the test process (the processes' shared state)."""

    def __init__(self, db: Database, client: Any) -> None:
        self.db = db
        self.client = client
        self.streamed: set[str] = set()  # message ids of the entries in the stream
        self.entries = 0
        self._after = "-"
        self.state = ""  # what drained() saw last

    async def scalar(self, query: Any) -> int:
        async with self.db.sessions() as session:
            return int(await session.scalar(query) or 0)

    async def unsent(self) -> set[str]:
        table = app.outbox.table
        async with self.db.sessions() as session:
            found = await session.scalars(select(table.c.message_id).where(table.c.sent_at.is_(None)))
            return set(found)

    async def read_stream(self) -> set[str]:
        """Read the entries added since the last call; return their message ids."""
        added: set[str] = set()
        while True:
            batch = await self.client.xrange(STREAM, min=self._after, max="+", count=5_000)
            if not batch:
                self.streamed |= added
                return added
            for _, fields in batch:
                added.add(fields[b"i"].decode())
                self.entries += 1
            self._after = "(" + batch[-1][0].decode()

    async def stream_length(self) -> int:
        return int(await self.client.xlen(STREAM))

    async def shipped(self) -> int:
        return await self.scalar(select(func.count()).select_from(app.shipments))

    async def pending_of(self, consumer: str) -> int:
        try:
            consumers = await self.client.xinfo_consumers(STREAM, GROUP)
        except aioredis.ResponseError as exc:  # no stream or group yet: the worker never read
            if "no such key" in str(exc).lower() or "NOGROUP" in str(exc):
                return 0
            raise
        return sum(int(entry["pending"]) for entry in consumers if entry["name"].decode() == consumer)

    async def pending(self) -> int:
        try:
            return int((await self.client.xpending(STREAM, GROUP))["pending"])
        except aioredis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                return 0
            raise

    async def drained(self) -> bool:
        shipped = await self.shipped()
        unsent = await self.scalar(
            select(func.count()).select_from(app.outbox.table).where(app.outbox.table.c.sent_at.is_(None))
        )
        pending = await self.pending()
        self.state = f"{shipped} shipment(s), {unsent} unsent outbox row(s), {pending} entry(ies) pending"
        return shipped >= ORDERS and unsent == 0 and pending == 0


async def stop_process(process: subprocess.Popen[bytes], how: signal.Signals) -> int:
    if process.poll() is None:
        process.send_signal(how)
    return await asyncio.to_thread(process.wait, 30)


async def moment(rng: random.Random, progress: Callable[[], Awaitable[int]], *, busy: bool = False) -> str:
    """Wait for a random moment to kill a process: mostly a little after it was seen at work
    (`progress()` grew), sometimes (unless `busy`) at any moment after its start (starting up
    included)."""
    if not busy and rng.random() < ANY_MOMENT:
        await asyncio.sleep(rng.uniform(0.1, 2.0))
        return "at any moment"
    before = await progress()
    # The kills that must hit work in flight (`busy`) wait for it as long as it takes a
    # loaded machine to restart a process; the others give up after 5 s.
    patience = 60 if busy else 5
    deadline = time.monotonic() + patience
    # The kills that must hit work in flight look every millisecond and strike as soon as
    # it shows: a relay's window between its send and its mark is a few milliseconds.
    pause = 0.001 if busy else 0.02
    while await progress() == before:
        if time.monotonic() > deadline:
            return f"not seen at work for {patience} s"
        await asyncio.sleep(pause)
    if not busy:
        await asyncio.sleep(rng.uniform(0, 0.3))
    return "busy"


def kills_of(history: list[Kill], target: str) -> list[Kill]:
    return [kill for kill in history if kill.target == target]


def more_kills(history: list[Kill], target: str) -> bool:
    """KILLS kills of `target`, and up to EXTRA_KILLS more (at work) until one hit work in flight."""
    kills = kills_of(history, target)
    hit = any(kill.hit_work_in_flight for kill in kills)
    return len(kills) < KILLS or (not hit and len(kills) < KILLS + EXTRA_KILLS)


async def kill_relays(
    fleet: Fleet, observer: Observer, rng: random.Random, history: list[Kill], started: float
) -> None:
    while more_kills(history, "relay"):
        when = await moment(rng, observer.stream_length, busy=len(kills_of(history, "relay")) >= KILLS)
        assert fleet.relay is not None
        assert fleet.relay.poll() is None, f"the relay died on its own\n{fleet.errors()}"
        await stop_process(fleet.relay, signal.SIGKILL)
        # Rows this relay sent (the entries added since the last relay died) whose outbox row
        # is still unsent: it had not committed their marks, and its transaction died with it.
        # They will be sent again.
        in_flight = len(await observer.read_stream() & await observer.unsent())
        history.append(Kill("relay", time.monotonic() - started, when, in_flight))
        fleet.start_relay()


async def kill_workers(
    fleet: Fleet, observer: Observer, rng: random.Random, history: list[Kill], started: float
) -> None:
    names = iter(f"w{n}" for n in range(1, KILLS + EXTRA_KILLS + 1))
    while more_kills(history, "worker"):
        when = await moment(rng, observer.shipped, busy=len(kills_of(history, "worker")) >= KILLS)
        assert fleet.worker is not None
        assert fleet.worker.poll() is None, f"the worker died on its own\n{fleet.errors()}"
        await stop_process(fleet.worker, signal.SIGKILL)
        name = fleet.worker_name
        held = await observer.pending_of(name)  # delivered to the dead worker, not acked
        if rng.random() < 0.5:
            name = next(names)  # a new consumer: the dead one's entries wait for claim_idle
        history.append(Kill("worker", time.monotonic() - started, when, held, f"; restarted as {name}"))
        fleet.start_worker(name)


async def wait_until(
    condition: Callable[[], Awaitable[bool]], timeout: float, what: Callable[[], str]
) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what()}")
        await asyncio.sleep(0.1)


async def test_a_relay_and_a_worker_killed_at_random_moments_leave_every_effect_exactly_once(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = int(os.environ.get("PYBUS_KILL_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    print(f"PYBUS_KILL_SEED={seed}")
    async with database("postgresql", tmp_path) as db:
        async with db.engine.begin() as connection:
            schema = str(await connection.scalar(text("SELECT current_schema()")))
            await connection.run_sync(app.metadata.create_all)
        settings = {
            "DATABASE_URL": POSTGRES_URL,
            "DATABASE_SCHEMA": schema,
            "REDIS_URL": redis_url,
            "PYBUS_CLAIM_IDLE": "1",
            "PYBUS_CLAIM_INTERVAL": "0.25",
            "RELAY_POLL": "0.05",
        }
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        logs = tmp_path / "logs"
        logs.mkdir()
        # Processes restarted again and again start faster from cached bytecode.
        fleet = Fleet(logs, {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"})
        client: Any = aioredis.Redis.from_url(redis_url)
        engine, sessions = app.connect(pool_size=CONCURRENCY)
        observer = Observer(db, client)
        history: list[Kill] = []
        started = time.monotonic()
        fleet.start_relay()
        fleet.start_worker("w0")
        background: list[asyncio.Task[None]] = []
        try:
            producer = app.create_producer(sessions)
            async with producer:
                background += [
                    asyncio.create_task(kill(fleet, observer, random.Random(rng.random()), history, started))
                    for kill in (kill_relays, kill_workers)
                ]
                numbers = iter(range(ORDERS))

                async def place_orders() -> None:
                    for n in numbers:
                        await producer.execute(app.PlaceOrder(n))

                await asyncio.gather(*(place_orders() for _ in range(CONCURRENCY)))
                placed = time.monotonic() - started
                await asyncio.gather(*background[1:])  # the killers' last restarts
            about = f"seed {seed}; kills: {[str(kill) for kill in history]}"
            await wait_until(
                observer.drained,
                60,
                lambda: f"the last relay and worker to drain: {observer.state} ({about})",
            )
            drained = time.monotonic() - started
            # Stopped cleanly: SIGTERM, the relay ends its pass, the worker drains and acks.
            for label, process in fleet.running().items():
                code = await stop_process(process, signal.SIGTERM)
                assert code == 0, f"the last {label} exited with {code} ({about})\n{fleet.errors()}"
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            for process in fleet.running().values():
                await stop_process(process, signal.SIGKILL)
            await engine.dispose()
        try:
            await observer.read_stream()
            dead_letters = int(await client.xlen("pybus:dead"))
            pending = await observer.pending()
        finally:
            await client.aclose()

        async with db.sessions() as session:
            placed_orders = list(await session.scalars(select(app.orders.c.n).order_by(app.orders.c.n)))
            counts = select(app.shipments.c.n, func.count()).group_by(app.shipments.c.n)
            shipped = {int(n): int(count) for n, count in (await session.execute(counts)).all()}
        unsent = len(await observer.unsent())
        inbox = await observer.scalar(select(func.count()).select_from(app.outbox.inbox))
        took = time.monotonic() - started

    relay_kills, worker_kills = kills_of(history, "relay"), kills_of(history, "worker")
    resent = observer.entries - ORDERS  # copies in the stream besides each event's first
    summary = (
        f"seed {seed}: {len(relay_kills)} relay kills, {len(worker_kills)} worker kills; "
        f"{resent} copies of events sent again after relay kills (each absorbed by the consumer: "
        f"the transport's dedupe drops a copy of an acked message, the inbox the others), "
        f"{fleet.inbox_skips()} deliveries skipped by the inbox; orders placed in {placed:.1f} s, "
        f"drained at {drained:.1f} s, {took:.1f} s in all\n" + "\n".join(f"  {kill}" for kill in history)
    )
    print(summary)
    assert placed_orders == list(range(ORDERS)), summary  # each order once
    duplicated = {n: count for n, count in shipped.items() if count != 1}
    assert not duplicated, f"shipments that took effect more than once: {duplicated}\n{summary}"
    assert sorted(shipped) == list(range(ORDERS)), f"{ORDERS - len(shipped)} order(s) not shipped\n{summary}"
    assert unsent == 0, summary
    assert inbox == ORDERS, summary
    assert len(observer.streamed) == ORDERS, summary  # one message id per event, whatever the copies
    assert dead_letters == 0, f"{dead_letters} dead letter(s)\n{summary}"
    assert pending == 0, summary
    # Not vacuous: some kills hit work in flight, in both processes.
    assert len(relay_kills) >= KILLS, summary
    assert len(worker_kills) >= KILLS, summary
    assert any(kill.hit_work_in_flight for kill in relay_kills), (
        f"no relay died between send and mark\n{summary}"
    )
    assert resent > 0, summary
    assert any(kill.hit_work_in_flight for kill in worker_kills), (
        f"no worker died at work holding entries\n{summary}"
    )
