"""Orders through the transactional outbox to a worker, as three kinds of processes.

- **The shop** (`create_producer()`, in your process): `PlaceOrder(n)` inserts the
  order `n` and adds `OrderPlaced(n)`, which is routed: its outbox row is committed
  in the order's transaction. The shop runs no relay of its own.
- **The relay** (`python -m examples.outbox_worker relay`): sends the committed
  outbox rows to Redis until SIGTERM or SIGINT (it prints what it sent).
- **The worker** (`pybus worker examples.outbox_worker:create_worker`): consumes
  `OrderPlaced` and inserts the shipment `n` through an idempotent unit of work,
  whose inbox row is committed with the shipment. A delivery the inbox skips (the
  message was handled and committed, and delivered again) is printed on stdout as
  `inbox-skip n=... message_id=... delivery=...`.

`shipments.n` deliberately has no unique constraint: a second effect of one event
would be a second row, which a test counts and names, instead of an integrity error
that would make the handling fail, be retried and end as a dead letter with one row
in the table (the constraint would then be what kept the effect single, not the
inbox). `orders.n` is the primary key: the shop places each order once.

Configuration, for every process (the tables are created by whoever sets up the
database: `metadata.create_all`):

| variable | default | what it is |
| --- | --- | --- |
| `DATABASE_URL` | `postgresql+asyncpg://root@127.0.0.1:5432/test` | the database |
| `DATABASE_SCHEMA` | (the server's search_path) | put first in `search_path` on every connection |
| `REDIS_URL` | `redis://localhost:6379/0` | the broker |
| `PYBUS_CONSUMER` | host-pid | the worker's consumer name in its group |
| `PYBUS_CLAIM_IDLE` | 1 | seconds a silent consumer keeps its entries before the worker claims them |
| `PYBUS_CLAIM_INTERVAL` | 0.25 | how often the worker looks for such entries |
| `RELAY_POLL` | 0.05 | seconds between the relay's passes when there is nothing to send |
| `RELAY_BATCH` | 100 | rows per relay pass (one transaction) |

Needs pybus-cqrs[redis,sqlalchemy] and asyncpg; see tests/test_outbox_kills.py, which kills
the relay and the worker at random moments while 10,000 orders go through.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from pybus import CallNext, Command, Dispatcher, Event, HandlingContext
from pybus.redis_streams import RedisTransport
from pybus.sqlalchemy import Outbox, SqlAlchemyUnitOfWork

metadata = MetaData()
orders = Table("orders", metadata, Column("n", Integer, primary_key=True, autoincrement=False))
shipments = Table(
    "shipments",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("n", Integer, nullable=False, index=True),  # not unique: see the module's docstring
    Column("message_id", String(64), nullable=False),
)
outbox = Outbox(metadata)


@dataclass(frozen=True)
class PlaceOrder(Command[None]):
    n: int


@dataclass(frozen=True)
class OrderPlaced(Event):
    n: int


#: The name the event travels under, the same in every process: without it, the relay
#: run as `python -m` would know the class as `__main__.OrderPlaced`.
ROUTE = "examples.outbox.order_placed"


def connect(pool_size: int = 5) -> tuple[AsyncEngine, async_sessionmaker[AsyncSession]]:
    """An engine on `DATABASE_URL`, with `DATABASE_SCHEMA` first in the search_path."""
    url = os.environ.get("DATABASE_URL", "postgresql+asyncpg://root@127.0.0.1:5432/test")
    schema = os.environ.get("DATABASE_SCHEMA")
    connect_args: dict[str, Any] = {"server_settings": {"search_path": schema}} if schema else {}
    engine = create_async_engine(url, connect_args=connect_args, pool_size=pool_size)
    return engine, async_sessionmaker(engine, expire_on_commit=False)


def redis_url() -> str:
    return os.environ.get("REDIS_URL", "redis://localhost:6379/0")


# -- the shop: the command, its unit of work and its outbox row --------------------------


def create_producer(sessions: async_sessionmaker[AsyncSession] | None = None) -> Dispatcher:
    """The shop's dispatcher: `PlaceOrder(n)` writes the order and, through the outbox, its
    `OrderPlaced(n)`. Its transport is only what a relay sends through."""
    if sessions is None:
        _, sessions = connect()
    dp = Dispatcher(transport=RedisTransport(redis_url(), group="shop"))
    dp.route(OrderPlaced, name=ROUTE)

    @dp.commands.register(PlaceOrder, uow=outbox.units(dp, sessions))
    async def place_order(cmd: PlaceOrder, uow: SqlAlchemyUnitOfWork) -> None:
        async with uow:
            await uow.session.execute(orders.insert().values(n=cmd.n))
            uow.add_event(OrderPlaced(cmd.n))  # routed: an outbox row in this transaction

    return dp


# -- the relay process: `python -m examples.outbox_worker relay` -----------------------------


async def run_relay() -> None:
    """Send the outbox's rows until SIGTERM or SIGINT, then print how many were sent."""
    engine, sessions = connect()
    dp = create_producer(sessions)
    relay = outbox.relay(
        dp,
        sessions,
        batch=int(os.environ.get("RELAY_BATCH", "100")),
        poll=float(os.environ.get("RELAY_POLL", "0.05")),
    )
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        async with dp:
            relaying = asyncio.create_task(relay.run(), name="relay")
            waiting = asyncio.create_task(stopping.wait(), name="signal")
            await asyncio.wait([relaying, waiting], return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            await relay.stop()
            await relaying
    finally:
        await engine.dispose()
    print(f"relay: sent {relay.sent} row(s); {relay.failed} pass(es) failed", flush=True)


# -- the worker: `pybus worker examples.outbox_worker:create_worker` -------------------------

#: Set by the middleware for each handling; the handler marks that it ran.
_ran: ContextVar[list[bool] | None] = ContextVar("outbox_worker_ran", default=None)


async def report_inbox_skips(message: Any, call_next: CallNext) -> Any:
    """Print each delivery that succeeded without the handler running: the inbox held it."""
    ran: list[bool] = []
    token = _ran.set(ran)
    try:
        result = await call_next(message)
    finally:
        _ran.reset(token)
    if not ran and isinstance(message, OrderPlaced):
        context = call_next.context
        print(
            f"inbox-skip n={message.n} message_id={context.message_id} delivery={context.delivery}",
            flush=True,
        )
    return result


def create_worker() -> Dispatcher:
    """The shipping service: one shipment row per `OrderPlaced`, through the inbox."""
    _, sessions = connect()
    transport = RedisTransport(
        redis_url(),
        group="shipping",
        consumer=os.environ.get("PYBUS_CONSUMER"),
        claim_idle=float(os.environ.get("PYBUS_CLAIM_IDLE", "1")),
        claim_interval=float(os.environ.get("PYBUS_CLAIM_INTERVAL", "0.25")),
    )
    dp = Dispatcher(transport=transport)
    dp.route(OrderPlaced, name=ROUTE)
    dp.add_middleware(report_inbox_skips)

    @dp.events.register(OrderPlaced, uow=outbox.units(dp, sessions, idempotent=True))
    async def ship(event: OrderPlaced, uow: SqlAlchemyUnitOfWork, context: HandlingContext) -> None:
        ran = _ran.get()
        if ran is not None:
            ran.append(True)
        async with uow:
            await uow.session.execute(shipments.insert().values(n=event.n, message_id=context.message_id))

    return dp


if __name__ == "__main__":
    if sys.argv[1:] != ["relay"]:
        sys.exit("usage: python -m examples.outbox_worker relay")
    asyncio.run(run_relay())
