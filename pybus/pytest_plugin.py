"""pytest fixtures for applications built on pybus (registered as the `pybus` pytest11 plugin).

- `pybus_dispatcher_factory`: returns a callable that builds a fresh, unstarted
  Dispatcher. The default builds an empty one; override it in your conftest.py
  to build your application's dispatcher (a new one per test: a stopped
  dispatcher cannot be started again).
- `pybus_dispatcher`: a started dispatcher for the test, stopped (drained) after it.
- `pybus_track`: `track` bound to that dispatcher:
  `async with pybus_track() as session: ...`.

The async fixture needs an asyncio test runner: pytest-asyncio (used when
installed) or anyio's plugin.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar, cast

import pytest

from pybus.dispatcher import Dispatcher
from pybus.testing import TrackedSession, track

F = TypeVar("F", bound=Callable[..., Any])

_fixture: Any
try:
    from pytest_asyncio import fixture as _fixture
except ImportError:  # pragma: no cover - anyio's plugin runs plain async fixtures
    _fixture = pytest.fixture


def async_fixture(func: F) -> F:
    """pytest-asyncio's fixture decorator when installed, pytest's otherwise."""
    return cast(F, _fixture(func))


@pytest.fixture
def pybus_dispatcher_factory() -> Callable[[], Dispatcher]:
    """Builds the dispatcher each test gets; override to build your application's."""
    return Dispatcher


@async_fixture
async def pybus_dispatcher(pybus_dispatcher_factory: Callable[[], Dispatcher]) -> AsyncIterator[Dispatcher]:
    """A started dispatcher, drained and stopped after the test."""
    async with pybus_dispatcher_factory() as dp:
        yield dp


@pytest.fixture
def pybus_track(pybus_dispatcher: Dispatcher) -> Callable[..., TrackedSession]:
    """`track` for the test's dispatcher: `pybus_track(timeout=5.0, allow_errors=False)`."""
    bound: Callable[..., TrackedSession] = functools.partial(track, pybus_dispatcher)
    return bound
