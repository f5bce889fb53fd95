"""A FastAPI service that writes orders through a unit of work and ships them in a worker.

Run (Redis on localhost, SQLite in a file by default):

    REDIS_URL=redis://localhost:6379/0 uv run uvicorn examples.fastapi_outbox:app
    REDIS_URL=redis://localhost:6379/0 uv run pybus worker examples.fastapi_outbox:create_worker

- POST /orders {"item"}  -> 201 {"id"}: the order row and the outbox row of its
  `OrderPlaced` event are committed in one transaction; the service's relay
  sends the event to Redis right after the commit.
- GET /orders/{id}       -> the order, and whether the worker shipped it.

The worker consumes `OrderPlaced` and records the shipment through an idempotent
unit of work: a redelivered event (a worker killed after its commit, before its
ack) is acknowledged without shipping twice. `DATABASE_URL` (default: a SQLite
file in the temporary directory) and `REDIS_URL` configure both processes.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import Column, Integer, MetaData, String, Table, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from pybus import Command, Dispatcher, Event
from pybus.redis_streams import RedisTransport
from pybus.sqlalchemy import Outbox, SqlAlchemyUnitOfWork

metadata = MetaData()
orders = Table("orders", metadata, Column("id", Integer, primary_key=True), Column("item", String(100)))
shipments = Table("shipments", metadata, Column("order_id", Integer, primary_key=True))
outbox = Outbox(metadata)


@dataclass(frozen=True)
class PlaceOrder(Command[int]):
    item: str


@dataclass(frozen=True)
class OrderPlaced(Event):
    order_id: int
    item: str


def database() -> tuple[AsyncEngine, async_sessionmaker[AsyncSession]]:
    default = f"sqlite+aiosqlite:///{Path(tempfile.gettempdir()) / 'pybus-fastapi-outbox.db'}"
    url = os.environ.get("DATABASE_URL", default)
    # SQLite: both processes write the file; wait for its lock rather than failing at once.
    engine = create_async_engine(url, connect_args={"timeout": 15} if url.startswith("sqlite") else {})
    return engine, async_sessionmaker(engine, expire_on_commit=False)


def transport(group: str) -> RedisTransport:
    return RedisTransport(os.environ.get("REDIS_URL", "redis://localhost:6379/0"), group=group)


# -- the service: FastAPI, the command, the outbox relay ------------------------------------

engine, sessions = database()
service = Dispatcher(transport=transport("shop"))
service.route(OrderPlaced)
relay = outbox.relay(service, sessions, poll=0.5)


@service.commands.register(PlaceOrder, uow=outbox.units(service, sessions))
async def place_order(cmd: PlaceOrder, uow: SqlAlchemyUnitOfWork) -> int:
    async with uow:
        inserted = await uow.session.execute(orders.insert().values(item=cmd.item).returning(orders.c.id))
        order_id = int(inserted.scalar_one())
        uow.add_event(OrderPlaced(order_id, cmd.item))  # routed: an outbox row, same transaction
    return order_id


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    async with service:
        relaying = asyncio.create_task(relay.run())
        try:
            yield
        finally:
            await relay.stop()
            await relaying
    await engine.dispose()


app = FastAPI(title="orders", lifespan=lifespan)


class NewOrder(BaseModel):
    item: str


@app.post("/orders", status_code=201)
async def create(body: NewOrder) -> dict[str, int]:
    return {"id": await service.execute(PlaceOrder(body.item))}


@app.get("/orders/{order_id}")
async def read(order_id: int) -> dict[str, object]:
    async with sessions() as session:
        item = await session.scalar(select(orders.c.item).where(orders.c.id == order_id))
        shipped = await session.scalar(select(shipments.c.order_id).where(shipments.c.order_id == order_id))
    if item is None:
        raise HTTPException(404, f"no order {order_id}")
    return {"id": order_id, "item": item, "shipped": shipped is not None}


# -- the worker: `pybus worker examples.fastapi_outbox:create_worker` ------------------------


def create_worker() -> Dispatcher:
    _, worker_sessions = database()
    worker = Dispatcher(transport=transport("shipping"))
    worker.route(OrderPlaced)

    @worker.events.register(OrderPlaced, uow=outbox.units(worker, worker_sessions, idempotent=True))
    async def ship(event: OrderPlaced, uow: SqlAlchemyUnitOfWork) -> None:
        async with uow:
            await uow.session.execute(shipments.insert().values(order_id=event.order_id))

    return worker
