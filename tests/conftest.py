"""Suite-wide guards: no asyncio task may be destroyed while pending."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator

import pytest

# Registered by entry point for users; loaded here so that coverage sees its import
# (pyproject's addopts block the entry point: `-p no:pybus`).
pytest_plugins = ["pybus.pytest_plugin"]


class _AsyncioErrors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


_asyncio_errors = _AsyncioErrors()


def pytest_sessionstart(session: pytest.Session) -> None:
    logging.getLogger("asyncio").addHandler(_asyncio_errors)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    gc.collect()
    logging.getLogger("asyncio").removeHandler(_asyncio_errors)
    if _asyncio_errors.messages:
        print("\nasyncio reported errors during the run (e.g. 'Task was destroyed but it is pending'):")
        for message in _asyncio_errors.messages:
            print("  " + message.splitlines()[0])
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A fresh redis-server for one test (see tests/redis_server.py)."""
    from tests.redis_server import redis_server

    with redis_server() as (url, _):
        yield url
