"""pytest fixtures for applications built on pybus (registered as the `pybus` pytest11 plugin).

- `pybus_dispatcher_factory`: returns a callable that builds a fresh, unstarted
  Dispatcher. The default builds an empty one; override it in your conftest.py
  to build your application's dispatcher (a new one per test: a stopped
  dispatcher cannot be started again).
- `pybus_dispatcher`: a started dispatcher for the test, stopped (drained) after it.
- `pybus_track`: `track` bound to that dispatcher:
  `async with pybus_track() as session: ...`.

The async fixture needs an asyncio test runner: pytest-asyncio (strict or auto
mode; `pip install "pybus-cqrs[testing]"` brings it) or anyio's plugin (asyncio
backend). The ini option `pybus_app = "shop.app:create_dispatcher"` makes the
fixtures build the application's dispatcher.
"""

from __future__ import annotations

import functools
import importlib
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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "pybus_app",
        "module:function that builds the application's Dispatcher for the pybus fixtures "
        "(a new one per test), e.g. shop.app:create_dispatcher",
        default="",
    )


@pytest.fixture
def pybus_dispatcher_factory(pytestconfig: pytest.Config) -> Callable[[], Dispatcher]:
    """Builds the dispatcher each test gets: the `pybus_app` ini option's function, else an
    empty Dispatcher; override this fixture to build it another way."""
    path = str(pytestconfig.getini("pybus_app") or "")
    if not path:
        return Dispatcher
    return _app_factory(path)


def _app_factory(path: str) -> Callable[[], Dispatcher]:
    from pybus.cli import UsageError, load_dispatcher

    module, sep, attribute = path.partition(":")
    if not sep or not attribute:
        raise pytest.UsageError(
            f"pybus_app = {path!r}: write module:function, naming a function that builds the Dispatcher"
        )
    try:
        target = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise pytest.UsageError(f"pybus_app = {path!r}: {type(exc).__name__}: {exc}") from exc
    if isinstance(target, Dispatcher) or not callable(target):
        raise pytest.UsageError(
            f"pybus_app = {path!r} names {type(target).__name__}, not a function: each test needs a "
            "new Dispatcher (a stopped one cannot start again), so name the function that builds it"
        )

    def build() -> Dispatcher:
        try:
            return load_dispatcher(path)
        except UsageError as exc:
            raise pytest.UsageError(f"pybus_app = {path!r}: {exc}") from exc

    return build


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
