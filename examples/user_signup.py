"""Sign a user up: a command writes through a unit of work, three domains react.

Run: `uv run python -m examples.user_signup`

The CQRS "message bus" packages' classic example, on pybus: `CreateUser` inserts a
row inside `async with uow:` (SQLAlchemy over SQLite, through aiosqlite) and adds
`UserCreated`; once the unit has committed, the event is published to three
handlers that live in three domains (mail, statistics, audit). If the insert
fails (the username is taken), the unit rolls back and no domain hears of it.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Column, Integer, MetaData, String, Table, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from pybus import Command, Dispatcher, Event
from pybus.sqlalchemy import Outbox, SqlAlchemyUnitOfWork

metadata = MetaData()
users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("username", String(50), unique=True, nullable=False),
    Column("name", String(100)),
)
outbox = Outbox(metadata)  # its tables sit beside the application's (unused here: nothing is routed)


@dataclass(frozen=True)
class CreateUser(Command[int]):
    username: str
    name: str


@dataclass(frozen=True)
class UserCreated(Event, unique=True):
    user_id: int
    username: str


@dataclass
class App:
    dp: Dispatcher
    engine: AsyncEngine
    log: list[str]  # what the three domains did

    async def create_tables(self) -> None:
        async with self.engine.begin() as connection:
            await connection.run_sync(metadata.create_all)


def create_app(database: Path) -> App:
    engine = create_async_engine(f"sqlite+aiosqlite:///{database}")
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    dp = Dispatcher()
    log: list[str] = []

    # -- accounts: the command ------------------------------------------------------
    @dp.commands.register(CreateUser, uow=outbox.units(dp, sessions))
    async def create_user(cmd: CreateUser, uow: SqlAlchemyUnitOfWork) -> int:
        async with uow:
            inserted = users.insert().values(username=cmd.username, name=cmd.name).returning(users.c.id)
            user_id = int((await uow.session.execute(inserted)).scalar_one())
            uow.add_event(UserCreated(user_id, cmd.username))
        return user_id

    # -- mail: a welcome message --------------------------------------------------------
    @dp.events.register(UserCreated)
    async def send_welcome(event: UserCreated) -> None:
        log.append(f"mail: welcome, {event.username}")

    # -- statistics: count sign-ups ----------------------------------------------------------
    @dp.events.register(UserCreated)
    async def count_signup(event: UserCreated) -> None:
        async with sessions() as session:
            total = await session.scalar(select(func.count()).select_from(users))
        log.append(f"stats: {total} user(s)")

    # -- audit: keep a trace ------------------------------------------------------------
    @dp.events.register(UserCreated)
    async def audit(event: UserCreated) -> None:
        log.append(f"audit: user {event.user_id} created")

    return App(dp, engine, log)


async def main(database: Path) -> list[str]:
    app = create_app(database)
    await app.create_tables()
    try:
        async with app.dp as dp:
            await dp.execute(CreateUser("ada", "Ada Lovelace"))
            try:
                await dp.execute(CreateUser("ada", "Another Ada"))  # the username is taken
            except IntegrityError:
                app.log.append("accounts: 'ada' is taken; nothing was published")
    finally:
        await app.engine.dispose()
    return app.log


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        for line in asyncio.run(main(Path(folder) / "users.db")):
            print(line)
    sys.exit(0)
