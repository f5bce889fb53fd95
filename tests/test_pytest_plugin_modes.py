"""The pytest plugin's fixtures under pytest-asyncio (strict and auto modes) and under anyio's
plugin (asyncio backend), each in a pytest run of its own, with the `pybus_app` ini option
building the application's dispatcher."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

APP = """
from dataclasses import dataclass
from pybus import Dispatcher

@dataclass(frozen=True)
class Greet:
    name: str

def create_dispatcher() -> Dispatcher:
    dp = Dispatcher()

    @dp.commands.register(Greet)
    async def greet(cmd: Greet) -> str:
        return f"hello {cmd.name}"

    return dp

ready = create_dispatcher()  # a dispatcher, not a function: refused as pybus_app
"""

TESTS = """
import pytest
from shop import Greet

MARK

async def test_the_apps_dispatcher_is_started(pybus_dispatcher):
    assert pybus_dispatcher.started
    assert await pybus_dispatcher.execute(Greet("ada")) == "hello ada"

MARK

async def test_each_test_gets_a_new_one(pybus_dispatcher, pybus_track):
    session = await pybus_track().execute(Greet("bob"))
    assert session.result == "hello bob"
"""

MODES = {
    "pytest-asyncio strict": ("asyncio_mode = strict", "@pytest.mark.asyncio", ["-p", "no:anyio"]),
    "pytest-asyncio auto": ("asyncio_mode = auto", "", ["-p", "no:anyio"]),
    "anyio": ("", "@pytest.mark.anyio", ["-p", "no:asyncio"]),
}


def run(tmp_path: Path, mode: str, app: str = "shop:create_dispatcher") -> subprocess.CompletedProcess[str]:
    ini, mark, plugins = MODES[mode]
    (tmp_path / "shop.py").write_text(APP)
    tests = TESTS.replace("MARK", mark)
    if mode == "anyio":
        tests += "\n@pytest.fixture\ndef anyio_backend():\n    return 'asyncio'\n"
    (tmp_path / "test_shop.py").write_text(tests)
    (tmp_path / "pytest.ini").write_text(f"[pytest]\npybus_app = {app}\n{ini}\n")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *plugins],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("mode", list(MODES))
def test_the_fixtures_work_under_each_runner(tmp_path: Path, mode: str) -> None:
    result = run(tmp_path, mode)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_pybus_app_must_name_a_function(tmp_path: Path) -> None:
    result = run(tmp_path, "pytest-asyncio auto", app="shop:ready")
    assert result.returncode != 0
    assert (
        "names Dispatcher, not a function: each test needs a new Dispatcher" in result.stdout + result.stderr
    )


def test_pybus_app_errors_name_the_fix() -> None:
    from pybus.pytest_plugin import _app_factory

    with pytest.raises(pytest.UsageError, match="write module:function"):
        _app_factory("examples.orders")
    with pytest.raises(pytest.UsageError, match="ModuleNotFoundError"):
        _app_factory("examples.nowhere:create_app")
    with pytest.raises(pytest.UsageError, match="AttributeError"):
        _app_factory("examples.orders:nothing")
    with pytest.raises(pytest.UsageError, match="names Dispatcher, not a function"):
        _app_factory("examples.fastapi_app:dispatcher")
    build = _app_factory("examples.orders:create_app")
    assert build() is not build()  # a new dispatcher each time


def test_pybus_app_whose_function_fails_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pybus.pytest_plugin import _app_factory

    (tmp_path / "broken_app.py").write_text("def create():\n    raise RuntimeError('no config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    build = _app_factory("broken_app:create")
    with pytest.raises(pytest.UsageError, match="RuntimeError: no config"):
        build()
