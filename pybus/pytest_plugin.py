"""pytest fixtures for applications built on pybus (registered as the `pybus` pytest11 plugin).

- `pybus_dispatcher_factory`: returns a callable that builds a fresh, unstarted
  Dispatcher. The default builds what the `pybus_app` ini option names, else an
  empty one; override it in your conftest.py to build it another way (a new one
  per test: a stopped dispatcher cannot be started again).
- `pybus_dispatcher`: a started dispatcher for the test, drained and stopped after it,
  both in the event loop the test runs in.
- `pybus_track`: `track` bound to that dispatcher:
  `async with pybus_track() as session: ...`.

The dispatcher needs an asyncio test runner: pytest-asyncio (strict or auto mode,
any loop scope) or anyio's plugin (asyncio backend); `pip install "pybus-cqrs[testing]"`
brings both. The ini option `pybus_app = "shop.app:create_dispatcher"` (or a file
path, `shop/app.py:create_dispatcher`, relative to pytest's rootdir) names the
function that builds the application's dispatcher.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Literal

import pytest

from pybus.apps import App, UsageError, build_dispatcher, builders_in, find_app
from pybus.dispatcher import Dispatcher
from pybus.lifecycle import State
from pybus.testing import TrackedSession, track

# pytest-asyncio's loop scopes: the dispatcher starts and stops in the test's own loop.
LoopScope = Literal["function", "class", "module", "package", "session"]
LOOP_SCOPES: tuple[LoopScope, ...] = ("function", "class", "module", "package", "session")

# The dispatchers handed to tests so far: a factory that returns one of them again is refused.
_handed_out = pytest.StashKey["weakref.WeakSet[Dispatcher]"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "pybus_app",
        "module:function (or path/to/module.py:function, relative to the rootdir) that builds the "
        "application's Dispatcher for the pybus fixtures, a new one per test, e.g. "
        "shop.app:create_dispatcher",
        default="",
    )


@pytest.fixture
def pybus_dispatcher_factory(pytestconfig: pytest.Config) -> Callable[[], Dispatcher]:
    """Builds the dispatcher each test gets: the `pybus_app` ini option's function, else an
    empty Dispatcher; override this fixture to build it another way."""
    return _factory_for(pytestconfig)


def _factory_for(config: pytest.Config) -> Callable[[], Dispatcher]:
    path = str(config.getini("pybus_app") or "")
    if not path:
        return Dispatcher
    return _app_factory(path, str(config.rootpath))


def _app_factory(path: str, rootdir: str | None = None) -> Callable[[], Dispatcher]:
    """The function `pybus_app = path` names, checked; calling it builds a dispatcher."""
    try:
        app = find_app(path, rootdir)
    except UsageError as exc:
        raise pytest.UsageError(f"pybus_app = {path!r}: {exc}") from exc
    if isinstance(app.target, Dispatcher):
        raise pytest.UsageError(_made_at_import(path, app))

    def build() -> Dispatcher:
        try:
            return build_dispatcher(path, app.target)
        except UsageError as exc:
            raise pytest.UsageError(f"pybus_app = {path!r}: {exc}") from exc

    return build


def _made_at_import(path: str, app: App) -> str:
    """Why `pybus_app` may not name a dispatcher, and the change that makes it name a function."""
    builders = builders_in(app.module)
    if builders:
        fix = f'name that function instead: pybus_app = "{app.module}:{builders[0]}"'
    else:
        fix = (
            f"in {app.module}, move the registrations into a function that builds it, "
            f"`def create_dispatcher() -> Dispatcher: {app.attribute} = Dispatcher(); ...; return "
            f"{app.attribute}`, keep `{app.attribute} = create_dispatcher()` there for the application, "
            f'and set pybus_app = "{app.module}:create_dispatcher"'
        )
    return (
        f"pybus_app = {path!r} names a Dispatcher made when {app.module} is imported, one for the "
        "whole run, but each test needs a new one (a stopped dispatcher cannot start again, and its "
        f"workers stay in the event loop of the test that first used them): {fix} (docs/testing.md, "
        "'The pytest plugin', shows both)"
    )


@pytest.fixture
def pybus_dispatcher(request: pytest.FixtureRequest) -> Dispatcher:
    """A started dispatcher from `pybus_dispatcher_factory`, drained and stopped after the
    test, both in the event loop the test runs in (pytest-asyncio: the test's loop scope;
    anyio: its runner)."""
    dispatcher: Dispatcher = request.getfixturevalue(_started_in_the_tests_loop(request))
    return dispatcher


def _started_in_the_tests_loop(request: pytest.FixtureRequest) -> str:
    """The name of the fixture that starts and stops the dispatcher in the test's loop."""
    if "anyio_backend" in request.fixturenames:
        return "_pybus_dispatcher_anyio"
    if not request.config.pluginmanager.has_plugin("asyncio"):
        raise pytest.UsageError(
            f"{request.node.nodeid} uses pybus_dispatcher, which needs an asyncio test runner: install "
            'pytest-asyncio (pip install "pybus-cqrs[testing]") or mark the test for anyio\'s plugin '
            "(@pytest.mark.anyio)"
        )
    marker = request.node.get_closest_marker("asyncio")
    scope = marker and (marker.kwargs.get("loop_scope") or marker.kwargs.get("scope"))
    if not scope:
        try:
            scope = request.config.getini("asyncio_default_test_loop_scope") or "function"
        except ValueError:  # pragma: no cover - a pytest-asyncio without the option
            scope = "function"
    return f"_pybus_dispatcher_{scope}"


def _check_new(request: pytest.FixtureRequest, dispatcher: object) -> None:
    """Refuse what the factory built when it is no new dispatcher (one that an earlier test had,
    or one stopped already)."""
    if not isinstance(dispatcher, Dispatcher):
        raise pytest.UsageError(
            f"pybus_dispatcher_factory returned a {type(dispatcher).__name__}, not a pybus Dispatcher"
        )
    handed_out = request.config.stash.setdefault(_handed_out, weakref.WeakSet())
    if dispatcher in handed_out or dispatcher.state in (State.STOPPING, State.STOPPED):
        raise pytest.UsageError(
            "pybus_dispatcher_factory returned a dispatcher that "
            + ("an earlier test had" if dispatcher in handed_out else "is stopped")
            + " (a module-level `dp`?): each test needs a new one, as a stopped dispatcher cannot start "
            "again. Return a new Dispatcher from the factory each time it is called: move the "
            "registrations into a function that builds it, `def create_dispatcher() -> Dispatcher`, "
            "and return `create_dispatcher` (see docs/testing.md, 'The pytest plugin')"
        )
    handed_out.add(dispatcher)


def _starting() -> Callable[..., AsyncIterator[Dispatcher]]:
    """A new fixture function (pytest-asyncio marks the function object with its loop scope)."""

    async def started(
        request: pytest.FixtureRequest, pybus_dispatcher_factory: Callable[[], Dispatcher]
    ) -> AsyncIterator[Dispatcher]:
        dispatcher = pybus_dispatcher_factory()
        _check_new(request, dispatcher)
        async with dispatcher:
            yield dispatcher

    return started


# One fixture per runner and loop scope, each starting and stopping the dispatcher in that loop;
# `pybus_dispatcher` takes the one of the test's loop.
_pybus_dispatcher_anyio = pytest.fixture(_starting(), name="_pybus_dispatcher_anyio")
try:
    from pytest_asyncio import fixture as _asyncio_fixture
except ImportError:  # pragma: no cover - anyio's plugin alone
    pass
else:
    for _scope in LOOP_SCOPES:
        globals()[f"_pybus_dispatcher_{_scope}"] = _asyncio_fixture(
            _starting(), name=f"_pybus_dispatcher_{_scope}", loop_scope=_scope
        )


@pytest.fixture
def pybus_track(pybus_dispatcher: Dispatcher) -> Callable[..., TrackedSession]:
    """`track` for the test's dispatcher: `pybus_track(timeout=5.0, allow_errors=False)`."""
    bound: Callable[..., TrackedSession] = functools.partial(track, pybus_dispatcher)
    return bound
