"""The pytest plugin's fixtures under pytest-asyncio (strict and auto modes, with the tests in
function, module and session event loops) and under anyio's plugin (asyncio backend, alone and
beside pytest-asyncio), each in a pytest run of its own, with the `pybus_app` ini option building
the application's dispatcher. Every run turns warnings into errors."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

APP = """
import asyncio
from dataclasses import dataclass
from pybus import Dispatcher

remembered = []

@dataclass(frozen=True)
class Greet:
    name: str

@dataclass(frozen=True)
class Remember:
    name: str

def create_dispatcher() -> Dispatcher:
    dp = Dispatcher()

    @dp.commands.register(Greet)
    async def greet(cmd: Greet) -> str:
        await dp.commands.send(Remember(cmd.name))  # background work: binds the workers' loop
        return f"hello {cmd.name}"

    @dp.commands.register(Remember)
    async def remember(cmd: Remember) -> None:
        for _ in range(3):  # still in flight when the test returns: the teardown drains it
            await asyncio.sleep(0)
        remembered.append(cmd.name)

    return dp

ready = create_dispatcher()  # a dispatcher made at import: refused as pybus_app
"""

TESTS = """
import asyncio
import pytest
from pybus.lifecycle import State
from shop import Greet, Remember, remembered

HEADER
loops = []
dispatchers = []

MARK
async def test_the_apps_dispatcher_is_started(pybus_dispatcher):
    loops.append(asyncio.get_running_loop())
    dispatchers.append(pybus_dispatcher)
    assert pybus_dispatcher.started
    assert await pybus_dispatcher.execute(Greet("ada")) == "hello ada"

MARK
async def test_each_test_gets_a_new_one(pybus_dispatcher, pybus_track):
    loops.append(asyncio.get_running_loop())
    # The first test's dispatcher was drained and stopped after it.
    assert dispatchers[0].state is State.STOPPED and remembered == ["ada"]
    assert pybus_dispatcher is not dispatchers[0]
    session = await pybus_track().execute(Greet("bob"))
    assert session.result == "hello bob"
    assert session.handled.of_type(Remember) == [Remember("bob")]
    assert (loops[0] is loops[1]) is SAME_LOOP
"""


@dataclass(frozen=True)
class Mode:
    ini: str = ""  # lines of pytest.ini
    mark: str = ""  # above each test
    header: str = ""  # at the top of the test module
    plugins: tuple[str, ...] = ("-p", "no:anyio")
    same_loop: bool = False  # both tests run in one event loop


ASYNCIO = "asyncio_default_fixture_loop_scope = function\n"
ANYIO_BACKEND = "@pytest.fixture(scope='module')\ndef anyio_backend():\n    return 'asyncio'\n"
MODES = {
    "pytest-asyncio strict": Mode(ASYNCIO + "asyncio_mode = strict", "@pytest.mark.asyncio"),
    "pytest-asyncio auto": Mode(ASYNCIO + "asyncio_mode = auto"),
    "pytest-asyncio strict, session loop": Mode(
        ASYNCIO + "asyncio_mode = strict\nasyncio_default_test_loop_scope = session",
        "@pytest.mark.asyncio",
        same_loop=True,
    ),
    "pytest-asyncio auto, session loop": Mode(
        ASYNCIO + "asyncio_mode = auto\nasyncio_default_test_loop_scope = session", same_loop=True
    ),
    "pytest-asyncio strict, module loop": Mode(
        ASYNCIO + "asyncio_mode = strict", '@pytest.mark.asyncio(loop_scope="module")', same_loop=True
    ),
    "pytest-asyncio auto, module loop": Mode(
        ASYNCIO + "asyncio_mode = auto",
        header='pytestmark = pytest.mark.asyncio(loop_scope="module")',
        same_loop=True,
    ),
    "anyio": Mode(
        mark="@pytest.mark.anyio",
        header="@pytest.fixture\ndef anyio_backend():\n    return 'asyncio'\n",
        plugins=("-p", "no:asyncio"),
    ),
    # anyio's runner lives as long as an async fixture that uses it: one of the module keeps one
    # loop for the module's tests.
    "anyio, module loop": Mode(
        mark="@pytest.mark.anyio",
        header=ANYIO_BACKEND + "@pytest.fixture(scope='module')\nasync def held():\n    yield\n",
        plugins=("-p", "no:asyncio"),
        same_loop=True,
    ),
    # What `pybus-cqrs[testing]` installs: anyio's plugin runs the test, pytest-asyncio (strict) is loaded.
    "anyio beside pytest-asyncio strict": Mode(
        ASYNCIO + "asyncio_mode = strict",
        "@pytest.mark.anyio",
        header="@pytest.fixture\ndef anyio_backend():\n    return 'asyncio'\n",
        plugins=(),
    ),
}


def write(tmp_path: Path, mode: str, app: str = "shop:create_dispatcher", tests: str = TESTS) -> None:
    """The application, its tests and pytest.ini for `mode`, in `tmp_path`."""
    chosen = MODES[mode]
    (tmp_path / "shop.py").write_text(APP)
    tests = tests.replace("HEADER", chosen.header).replace("MARK", chosen.mark)
    tests = tests.replace("SAME_LOOP", str(chosen.same_loop))
    if "held" in chosen.header:
        tests = re.sub(r"(async def test_\w+\()", r"\1held, ", tests)
    (tmp_path / "test_shop.py").write_text(tests)
    (tmp_path / "pytest.ini").write_text(f"[pytest]\npybus_app = {app}\n{chosen.ini}\n")


def pytest_in(folder: Path, mode: str) -> subprocess.CompletedProcess[str]:
    """`pytest` run in `folder`, with warnings as errors."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-W", "error", "-p", "no:cacheprovider", "-p", "no:randomly",
         *MODES[mode].plugins],
        cwd=folder, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def run(
    tmp_path: Path, mode: str, app: str = "shop:create_dispatcher", tests: str = TESTS
) -> subprocess.CompletedProcess[str]:
    write(tmp_path, mode, app, tests)
    return pytest_in(tmp_path, mode)


@pytest.mark.parametrize("mode", list(MODES))
def test_the_fixtures_work_under_each_runner_and_loop_scope(tmp_path: Path, mode: str) -> None:
    result = run(tmp_path, mode)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout, result.stdout
    assert "warning" not in (result.stdout + result.stderr).lower(), result.stdout + result.stderr


def test_a_module_level_dispatcher_is_refused_with_the_fix(tmp_path: Path) -> None:
    result = run(tmp_path, "pytest-asyncio auto", app="shop:ready")
    assert result.returncode != 0
    output = " ".join((result.stdout + result.stderr).split())
    assert (
        "pybus_app = 'shop:ready' names a Dispatcher made when shop is imported, one for the whole run, "
        "but each test needs a new one (a stopped dispatcher cannot start again, and its workers stay "
        "in the event loop of the test that first used them): name that function instead: "
        'pybus_app = "shop:create_dispatcher"'
    ) in output


def test_a_file_path_names_the_module_from_the_rootdir(tmp_path: Path) -> None:
    write(tmp_path, "pytest-asyncio auto", app="shop.py:create_dispatcher")
    with (tmp_path / "pytest.ini").open("a") as ini:
        ini.write("pythonpath = .\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "test_shop.py").rename(tmp_path / "tests" / "test_shop.py")
    result = pytest_in(tmp_path / "tests", "pytest-asyncio auto")  # the rootdir is the ini's folder
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_a_factory_returning_the_same_dispatcher_is_refused_with_the_fix(tmp_path: Path) -> None:
    conftest = (
        "import pytest\nfrom shop import ready\n\n"
        "@pytest.fixture\ndef pybus_dispatcher_factory():\n    return lambda: ready\n"
    )
    (tmp_path / "conftest.py").write_text(conftest)
    result = run(tmp_path, "pytest-asyncio auto", app="")
    assert "1 passed, 1 error" in result.stdout, result.stdout
    output = " ".join((result.stdout + result.stderr).split())
    assert (
        "pybus_dispatcher_factory returned a dispatcher that an earlier test had (a module-level `dp`?): "
        "each test needs a new one, as a stopped dispatcher cannot start again."
    ) in output


def test_without_an_asyncio_runner_the_fixture_says_what_to_install(tmp_path: Path) -> None:
    result = run(tmp_path, "anyio", tests="def test_sync(pybus_dispatcher):\n    pass\n")
    assert result.returncode != 0
    assert "uses pybus_dispatcher, which needs an asyncio test runner: install pytest-asyncio" in " ".join(
        result.stdout.split()
    )


def test_pybus_app_errors_name_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pybus.pytest_plugin import _app_factory

    with pytest.raises(
        pytest.UsageError, match=re.escape("'examples.outbox_worker' holds no Dispatcher but 2")
    ):
        _app_factory("examples.outbox_worker")
    assert _app_factory("examples.orders")() is not None  # its one factory, create_app
    with pytest.raises(pytest.UsageError, match=re.escape("Cannot import 'examples.nowhere'")):
        _app_factory("examples.nowhere:create_app")
    with pytest.raises(pytest.UsageError, match=re.escape("'examples.orders' has no attribute 'nothing'")):
        _app_factory("examples.orders:nothing")
    with pytest.raises(
        pytest.UsageError,
        match=re.escape("'/elsewhere/app.py' is a file path that is not a module below /here"),
    ):
        _app_factory("/elsewhere/app.py:create_app", "/here")
    with pytest.raises(pytest.UsageError, match=r"names a Dispatcher made when examples.fastapi_app is"):
        _app_factory("examples.fastapi_app:dispatcher")
    build = _app_factory("examples.orders:create_app")
    assert build() is not build()  # a new dispatcher each time
    build = _app_factory("examples/orders.py:create_app")
    assert build() is not build()

    (tmp_path / "plain_app.py").write_text("from pybus import Dispatcher\ndp = Dispatcher()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(pytest.UsageError) as info:
        _app_factory("plain_app:dp")
    assert str(info.value).endswith(
        "in plain_app, move the registrations into a function that builds it, `def create_dispatcher() "
        "-> Dispatcher: dp = Dispatcher(); ...; return dp`, keep `dp = create_dispatcher()` there for "
        'the application, and set pybus_app = "plain_app:create_dispatcher" (docs/testing.md, \'The '
        "pytest plugin', shows both)"
    )


def test_pybus_app_whose_function_fails_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pybus.pytest_plugin import _app_factory

    (tmp_path / "broken_app.py").write_text("def create():\n    raise RuntimeError('no config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    build = _app_factory("broken_app:create")
    with pytest.raises(pytest.UsageError, match="RuntimeError: no config"):
        build()


def test_a_refused_dispatcher_names_the_function_of_its_module_that_builds_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pybus.pytest_plugin import _app_factory

    (tmp_path / "built_app.py").write_text(
        "from __future__ import annotations\n"
        "import pybus\n"
        "def configured(settings: dict) -> pybus.Dispatcher:\n"  # needs an argument: not suggested
        "    return pybus.Dispatcher()\n"
        "async def later() -> pybus.Dispatcher:\n"  # async: not suggested
        "    return pybus.Dispatcher()\n"
        "def build() -> pybus.Dispatcher:\n"
        "    return pybus.Dispatcher()\n"
        "dp = build()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(pytest.UsageError) as info:
        _app_factory("built_app:dp")
    assert 'name that function instead: pybus_app = "built_app:build"' in str(info.value)
