"""Injection: a Singleton engine, a Factory session per handling, a transaction
that commits or rolls back with the handler, and an override for a test.

Run: `uv run python examples/injection.py`
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from pybus import Command, Dispatcher, Factory, Query, Singleton


class Engine:
    """Stands in for a database engine: made once, disposed at stop."""

    def __init__(self) -> None:
        self.rows: dict[int, str] = {}


class Session:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.pending: dict[int, str] = {}

    def commit(self) -> None:
        self.engine.rows.update(self.pending)


@dataclass(frozen=True)
class CreateUser(Command[int]):
    name: str


@dataclass(frozen=True)
class GetUser(Query[str]):
    user_id: int


# --8<-- [start:providers]
async def make_engine() -> AsyncIterator[Engine]:
    print("[engine]  connected")
    yield Engine()
    print("[engine]  disposed")  # at dp.stop(), last created first


def open_session(engine: Engine) -> Iterator[Session]:
    session = Session(engine)
    try:
        yield session  # the handler runs here; its exception is raised at the yield
    except Exception as exc:
        print(f"[session] rolled back: {exc}")
        raise
    else:
        session.commit()
        print(f"[session] committed {session.pending}")


engine = Singleton(make_engine)  # once per dispatcher, made on first use
session = Factory(open_session, engine=engine)  # once per handling, torn down after it


def build() -> Dispatcher:
    dp = Dispatcher()

    @dp.commands.register(CreateUser, session=session)
    async def create_user(cmd: CreateUser, session: Session) -> int:
        if not cmd.name:
            raise ValueError("a user needs a name")
        user_id = len(session.engine.rows) + 1
        session.pending[user_id] = cmd.name
        return user_id

    @dp.queries.register(GetUser, engine=engine)
    async def get_user(query: GetUser, engine: Engine) -> str:
        return engine.rows[query.user_id]

    return dp


# --8<-- [end:providers]


async def main() -> None:
    dp = build()
    async with dp:
        user_id = await dp.execute(CreateUser("ada"))
        print(f"[result]  user {user_id} is {await dp.query(GetUser(user_id))!r}")
        try:
            await dp.execute(CreateUser(""))
        except ValueError:
            pass
        # --8<-- [start:override]
        fake = Engine()
        fake.rows[1] = "a fake ada"
        with dp.override(engine, fake):  # a value (or another provider)
            print(f"[override] {await dp.query(GetUser(1))!r}")
        print(f"[after]   {await dp.query(GetUser(1))!r}")  # the real Singleton again
        # --8<-- [end:override]


if __name__ == "__main__":
    asyncio.run(main())
