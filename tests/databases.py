"""Databases for the SQLAlchemy tests: SQLite (a file per test, through aiosqlite) and
PostgreSQL (a schema per test on the server at 127.0.0.1:5432, through asyncpg).

Outside CI, PostgreSQL tests are skipped with the reason when no server answers; in
CI (`CI` set), `.ci/run` makes sure one does, and the tests fail without it.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import MetaData, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

POSTGRES_URL = os.environ.get("PYBUS_POSTGRES_URL", "postgresql+asyncpg://root@127.0.0.1:5432/test")


def postgres_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


def require_postgres() -> None:
    if postgres_reachable():
        return
    if os.environ.get("CI"):
        pytest.fail("PostgreSQL is required in CI: nothing answers on 127.0.0.1:5432")
    pytest.skip("no PostgreSQL server on 127.0.0.1:5432 (CI requires one; .ci/run starts it)")


@dataclass
class Database:
    """One test's database: an engine, its sessions, and the metadata to create tables on."""

    name: str
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    metadata: MetaData

    async def create_tables(self) -> None:
        async with self.engine.begin() as connection:
            await connection.run_sync(self.metadata.create_all)


@asynccontextmanager
async def database(kind: str, tmp_path: Path) -> AsyncIterator[Database]:
    """A fresh database of `kind` ("sqlite" or "postgresql"), dropped at the end."""
    if kind == "sqlite":
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'test.db'}")
        try:
            yield Database(kind, engine, async_sessionmaker(engine, expire_on_commit=False), MetaData())
        finally:
            await engine.dispose()
        return
    require_postgres()
    schema = f"pybus_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(POSTGRES_URL)
    async with admin.begin() as connection:
        await connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = create_async_engine(POSTGRES_URL, connect_args={"server_settings": {"search_path": schema}})
    try:
        yield Database(kind, engine, async_sessionmaker(engine, expire_on_commit=False), MetaData())
    finally:
        await engine.dispose()
        async with admin.begin() as connection:
            await connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()
