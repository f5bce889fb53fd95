"""The plugin's default fixtures, with no override of the factory, and what installs them."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from pybus import Dispatcher
from pybus.pytest_plugin import _check_new, _factory_for, _started_in_the_tests_loop
from pybus.testing import TrackedSession


async def test_default_factory_gives_an_empty_started_dispatcher(
    pybus_dispatcher: Dispatcher, pybus_track: Callable[..., TrackedSession]
) -> None:
    assert pybus_dispatcher.started
    session = await pybus_track().publish("hello")
    assert session.no_handler.messages == ["hello"]


def test_the_testing_extra_brings_what_both_setups_of_the_docs_need() -> None:
    """docs/testing.md's projects, one with pytest-asyncio, one with anyio's plugin, each need
    only `pip install "pybus-cqrs[testing]"`."""
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    testing = project["project"]["optional-dependencies"]["testing"]
    names = {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0] for requirement in testing}
    assert names == {"pytest", "pytest-asyncio", "anyio"}
    assert "pytest-asyncio>=1.0" in testing  # the loop_scope options the fixtures use


def fake_request(
    fixturenames: list[str], marker: pytest.Mark | None = None, plugins: tuple[str, ...] = ("asyncio",)
) -> pytest.FixtureRequest:
    """What `_started_in_the_tests_loop` reads of a request: its fixtures, the test's asyncio
    marker, the plugins loaded and pytest-asyncio's default loop scope."""
    node = SimpleNamespace(nodeid="test_x.py::test_x", get_closest_marker=lambda name: marker)
    config = SimpleNamespace(
        pluginmanager=SimpleNamespace(has_plugin=lambda name: name in plugins),
        getini=lambda name: {"asyncio_default_test_loop_scope": "session"}.get(name, ""),
    )
    return cast(pytest.FixtureRequest, SimpleNamespace(fixturenames=fixturenames, node=node, config=config))


def test_the_dispatcher_starts_in_the_loop_of_the_runner_and_scope_that_run_the_test() -> None:
    assert _started_in_the_tests_loop(fake_request(["anyio_backend"])) == "_pybus_dispatcher_anyio"
    module = pytest.mark.asyncio(loop_scope="module").mark
    assert _started_in_the_tests_loop(fake_request([], module)) == "_pybus_dispatcher_module"
    # No loop scope on the marker: pytest-asyncio's asyncio_default_test_loop_scope.
    assert _started_in_the_tests_loop(fake_request([])) == "_pybus_dispatcher_session"
    with pytest.raises(pytest.UsageError) as info:
        _started_in_the_tests_loop(fake_request([], plugins=()))
    assert str(info.value) == (
        "test_x.py::test_x uses pybus_dispatcher, which needs an asyncio test runner: install "
        'pytest-asyncio (pip install "pybus-cqrs[testing]") or mark the test for anyio\'s plugin '
        "(@pytest.mark.anyio)"
    )


async def test_a_factory_must_return_a_new_dispatcher(request: pytest.FixtureRequest) -> None:
    with pytest.raises(pytest.UsageError, match=r"^pybus_dispatcher_factory returned a str, not a pybus"):
        _check_new(request, "dp")
    stopped = Dispatcher()
    await stopped.stop()
    with pytest.raises(pytest.UsageError) as info:
        _check_new(request, stopped)
    assert str(info.value).startswith(
        "pybus_dispatcher_factory returned a dispatcher that is stopped (a module-level `dp`?): each test "
        "needs a new one, as a stopped dispatcher cannot start again. Return a new Dispatcher from the "
        "factory each time it is called"
    )


def test_the_default_factory_builds_what_pybus_app_names(
    pytestconfig: pytest.Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _factory_for(pytestconfig) is Dispatcher  # this suite sets no pybus_app
    getini = pytestconfig.getini
    monkeypatch.setattr(
        pytestconfig,
        "getini",
        lambda name: "examples/orders.py:create_app" if name == "pybus_app" else getini(name),
    )
    from examples.orders import PlaceOrder

    assert PlaceOrder in _factory_for(pytestconfig)().commands.handlers  # a file path from the rootdir
