"""The `pybus` command line, run as a user runs it, against examples/orders.py."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec
import pydantic
import pytest

import pybus as pybus_package
from pybus import Dispatcher, Event, Singleton
from pybus.cli import (
    UsageError,
    _LogFormatter,
    build_message,
    find_message,
    format_routes,
    load_app,
    load_dispatcher,
    main,
    to_json,
)
from pybus.routes import message_flow, routes

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).with_name("pybus")
APP = "examples.orders:create_app"


def pybus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_routes_table() -> None:
    result = pybus("routes", APP)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "KIND",
        "KEY",
        "HANDLER",
        "LOCATION",
        "INJECTED",
        "TIMEOUT",
        "RETRY",
        "MIDDLEWARE",
        "EMITS",
        "TRANSPORT",
    ]
    starts = [lines[0].index(name) for name in lines[0].split()]
    rows = [
        [line[start:end].strip() for start, end in zip(starts, [*starts[1:], None], strict=True)]
        for line in lines[1:]
    ]
    assert [(row[0], row[1], row[2]) for row in rows] == [
        ("command", "PlaceOrder", "examples.orders.place_order"),
        ("command", "ReserveStock", "examples.orders.reserve_stock"),
        ("query", "CountOrders", "examples.orders.count_orders"),
        ("event", "OrderPlaced", "examples.orders.reserve_later"),
        ("event", "StockReserved", "examples.orders.confirm"),
    ]
    assert rows[0][3].startswith("examples/orders.py:")
    assert rows[4][4] == "mailer=<Mailer>"
    assert rows[1][5] == "2 s"
    assert [row[6] for row in rows] == ["-", "attempts=3,delay=0.05,multiplier=2,max_delay=30", "-", "-", "-"]
    assert [row[7] for row in rows] == ["LoggingMiddleware"] * 2 + ["-"] * 3
    assert len(lines) == 6  # no "?" legend: every row's output is known


def test_routes_json() -> None:
    result = pybus("routes", APP, "--json")
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert [(r["kind"], r["key"], r["emits"]) for r in found] == [
        ("command", "PlaceOrder", ["OrderPlaced"]),
        ("command", "ReserveStock", ["StockReserved"]),
        ("query", "CountOrders", []),
        ("event", "OrderPlaced", ["ReserveStock"]),
        ("event", "StockReserved", []),
    ]
    assert all(r["output_known"] for r in found)
    assert [r["retry"] for r in found] == [
        None, "Retry(attempts=3, delay=0.05, multiplier=2, max_delay=30)", None, None, None,
    ]  # fmt: skip
    assert found[0]["location"].endswith("examples/orders.py:60")


def test_mermaid_graph_edges_match_the_app() -> None:
    result = pybus("graph", APP, "--format", "mermaid")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("flowchart LR\n")
    labels = dict(re.findall(r'^\s+(\w+)[\[(]"([^"]+)"[\])]', text, flags=re.MULTILINE))
    edges = {(labels[a], labels[b]) for a, b in re.findall(r"^\s+(\w+) --> (\w+)$", text, flags=re.MULTILINE)}
    assert edges == {
        ("command PlaceOrder", "place_order"),
        ("place_order", "event OrderPlaced"),
        ("event OrderPlaced", "reserve_later"),
        ("reserve_later", "command ReserveStock"),
        ("command ReserveStock", "reserve_stock"),
        ("reserve_stock", "event StockReserved"),
        ("event StockReserved", "confirm"),
        ("query CountOrders", "count_orders"),
    }


def test_dot_graph() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pybus", "graph", APP, "--format", "dot"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("digraph pybus {")
    assert '[shape=box, label="command PlaceOrder"];' in result.stdout


def test_exec_a_command_and_a_query() -> None:
    placed = pybus("exec", APP, "PlaceOrder", '{"customer": "ada", "sku": "book-1"}')
    assert placed.returncode == 0, placed.stderr
    assert json.loads(placed.stdout) == {"order_id": 1, "sku": "book-1"}
    counted = pybus("exec", APP, "examples.orders.CountOrders", '{"customer": "ada"}')
    assert counted.returncode == 0, counted.stderr
    assert json.loads(counted.stdout) == 0  # a new process: no orders yet


@pytest.mark.parametrize(
    ("args", "code", "error"),
    [
        (
            ("routes", "examples.outbox_worker"),
            2,
            "'examples.outbox_worker' holds no Dispatcher but 2 functions that return one (create_producer, "
            "create_worker); name one, as in examples.outbox_worker:create_producer",
        ),
        (("routes", "examples.nowhere:app"), 2, "Cannot import 'examples.nowhere'"),
        (("routes", "examples.orders:nothing"), 2, "'examples.orders' has no attribute 'nothing'"),
        (
            ("routes", "examples.orders:Mailer"),
            2,
            "examples.orders:Mailer is a Mailer, not a pybus Dispatcher",
        ),
        (("exec", APP, "Refund", "{}"), 2, "No message named 'Refund' is registered; known: CountOrders,"),
        (("exec", APP, "PlaceOrder", "{customer"), 2, "The arguments for PlaceOrder are not valid JSON"),
        (
            ("exec", APP, "PlaceOrder", '{"who": 1}'),
            2,
            "The arguments do not fit PlaceOrder:\n  who: unknown",
        ),
        (("exec", APP, "PlaceOrder", "[1]"), 2, "The arguments of PlaceOrder must be a JSON object"),
        (
            ("exec", APP, "PlaceOrder", '{"customer": "ada", "sku": ""}'),
            1,
            "pybus: command PlaceOrder failed: ValueError: an order needs a sku",
        ),
    ],
)
def test_error_exits(args: tuple[str, ...], code: int, error: str) -> None:
    result = pybus(*args)
    assert result.returncode == code
    assert error in result.stderr
    assert result.stdout == ""


# -- in-process: the pieces behind the commands ----------------------------------------


@dataclass(frozen=True)
class Shipped(Event):
    order_id: int


@dataclass(frozen=True)
class Lost(Event):
    order_id: int


class PydanticOrder(pydantic.BaseModel):
    order_id: int


class MsgspecOrder(msgspec.Struct):
    order_id: int


def flow_app() -> Dispatcher:
    dp = Dispatcher()

    async def ship(cmd: PydanticOrder) -> Shipped | Lost | None:
        return Shipped(cmd.order_id)

    async def later(cmd: MsgspecOrder, repo: dict[str, int]) -> Literal["audit"]:
        return "audit"

    async def untyped(event):  # type: ignore[no-untyped-def]
        return None

    class Collecting:
        def dump_events(self) -> list[object]:
            return []

        async def handle(self, event: Shipped) -> list[int]:
            return [1]

    dp.commands.bind(PydanticOrder, ship, timeout=3)
    dp.commands.bind(MsgspecOrder, later, repo=Singleton(dict))
    dp.events.bind(Shipped, untyped)
    dp.events.bind(Shipped, Collecting)
    dp.events.bind("audit", lambda: None)
    return dp


def test_flow_marks_unhandled_events_and_unknown_output() -> None:
    flow = message_flow(flow_app())
    text = flow.to_mermaid()
    assert '["event Lost (no handler)"]:::unhandled' in text
    assert '("untyped (output unknown)"):::unknown' in text
    assert '("Collecting (output unknown)"):::unknown' in text
    assert "[\"event 'audit'\"]" in text
    dot = flow.to_dot()
    assert "style=dashed" in dot
    assert "fillcolor=lightyellow" in dot


def test_routes_describe_providers_timeouts_and_emits() -> None:
    found = {route.key: route for route in routes(flow_app())}
    assert found["PydanticOrder"].timeout == 3.0
    assert found["PydanticOrder"].emits == ["Shipped", "Lost"]
    assert found["MsgspecOrder"].injected == {"repo": "Singleton(dict)"}
    assert found["MsgspecOrder"].emits == ["'audit'"]


def test_build_message_from_pydantic_msgspec_dataclass_and_strings() -> None:
    assert build_message(PydanticOrder, {"order_id": "7"}) == PydanticOrder(order_id=7)
    assert build_message(MsgspecOrder, {"order_id": 7}) == MsgspecOrder(order_id=7)
    assert build_message(Shipped, {"order_id": 7}) == Shipped(7)
    assert build_message("audit", None) == "audit"
    with pytest.raises(UsageError, match=r"'audit' is a string message: it takes no arguments"):
        build_message("audit", {"x": 1})
    with pytest.raises(
        UsageError, match=r"The arguments do not fit MsgspecOrder:\n  order_id: Expected `int`"
    ):
        build_message(MsgspecOrder, {"order_id": "x"})


def test_to_json_handles_models_and_falls_back_to_repr() -> None:
    assert json.loads(to_json(PydanticOrder(order_id=1))) == {"order_id": 1}
    assert json.loads(to_json(MsgspecOrder(order_id=2))) == {"order_id": 2}
    assert json.loads(to_json({"ids": (1, 2)})) == {"ids": [1, 2]}
    assert json.loads(to_json(object)) == "<class 'object'>"


def test_find_message_by_every_name_and_refuses_ambiguity() -> None:
    dp = flow_app()
    assert find_message(dp, "Shipped") == ("event", Shipped)
    assert find_message(dp, f"{__name__}.PydanticOrder") == ("command", PydanticOrder)
    assert find_message(dp, "audit") == ("event", "audit")

    class Shipped2(Event):  # another class called Shipped
        pass

    Shipped2.__name__ = "Shipped"
    dp2 = Dispatcher()
    dp2.events.bind(Shipped, lambda e: None)
    dp2.events.bind(Shipped2, lambda e: None)
    with pytest.raises(UsageError, match=r"'Shipped' names several messages"):
        find_message(dp2, "Shipped")


def test_main_in_process(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["exec", APP, "CountOrders", '{"customer": "x"}']) == 0
    assert capsys.readouterr().out.strip() == "0"
    assert main(["routes", APP, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["key"] == "PlaceOrder"
    assert main(["graph", APP]) == 0
    assert capsys.readouterr().out.startswith("flowchart LR")
    assert main(["exec", APP, "PlaceOrder", '{"customer": "a", "sku": ""}']) == 1
    assert "an order needs a sku" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["routes", "nope"])
    assert info.value.code == 2
    assert load_dispatcher("tests.test_cli:flow_app").started is False


def test_return_annotations_are_read_as_the_runtime_publishes_them() -> None:
    from typing import Any

    from pybus.routes import _flatten

    assert _flatten(Shipped | None) == ([Shipped], True)
    assert _flatten(list[Shipped]) == ([list], True)  # a list is published as one message
    assert _flatten(Any) == ([], False)
    assert _flatten(Literal["audit", 3]) == (["audit"], True)

    def local_return() -> NotDefinedAnywhere:  # type: ignore[name-defined]  # noqa: F821
        raise AssertionError

    dp = Dispatcher()
    dp.events.bind(Shipped, local_return)
    (route,) = routes(dp)
    assert not route.output_known
    table = format_routes([route]).splitlines()
    assert table[1].split()[-2:] == ["?", "-"]  # the row says it ...
    assert table[-1].startswith("?: output not fully known")  # ... and the legend explains it


def test_a_return_annotation_is_read_when_a_parameters_annotation_does_not_resolve() -> None:
    def ship(
        event: Shipped,
        mailer: NotDefinedAnywhere = None,  # type: ignore[name-defined]  # noqa: F821
    ) -> Lost:
        raise AssertionError

    dp = Dispatcher()
    dp.events.bind(Shipped, ship)
    (route,) = routes(dp)
    assert (route.emits, route.output_known) == (["Lost"], True)


def test_emits_must_name_message_types() -> None:
    from pybus import HandlerSignatureError

    with pytest.raises(HandlerSignatureError, match=r"emits= lists message classes or strings, not 42"):
        Dispatcher().events.bind(Shipped, lambda e: None, emits=[42])


def test_load_dispatcher_errors_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(ROOT)])
    with pytest.raises(UsageError, match=r"Cannot import 'examples.nowhere'"):
        load_dispatcher("examples.nowhere:app")
    with pytest.raises(UsageError, match=r"has no attribute 'nothing'"):
        load_dispatcher("examples.orders:nothing")
    with pytest.raises(UsageError, match=r"is a Mailer, not a pybus Dispatcher"):
        load_dispatcher("examples.orders:Mailer")


def test_routes_text_in_process(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["routes", APP]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[:2] == ["command", "PlaceOrder"]
    assert " examples/orders.py:" in out


def test_the_cli_guide_shows_the_current_graph() -> None:
    from examples.orders import create_app

    guide = (ROOT / "docs" / "cli.md").read_text()
    assert f"```mermaid\n{message_flow(create_app()).to_mermaid()}\n```" in guide


def test_routes_show_transport_routes_also_without_a_local_handler() -> None:
    from pybus.transport import InMemoryTransport

    dp = Dispatcher(transport=InMemoryTransport())
    dp.events.bind(Shipped, lambda event: None)
    dp.route(Shipped, name="orders.shipped")
    dp.route(Lost)
    found = {route.key: route for route in routes(dp)}
    assert found["Shipped"].transport == "orders.shipped"
    assert found["Lost"].handler == "-"
    assert found["Lost"].transport == f"{__name__}.Lost"
    assert dict(dp.routes) == {Shipped: "orders.shipped", Lost: f"{__name__}.Lost"}


def test_worker_sizes_that_cannot_work_are_a_command_line_error() -> None:
    result = pybus("worker", "examples.redis_worker:create_worker", "--concurrency", "2", "--prefetch", "0")
    assert result.returncode == 2
    assert result.stderr == "pybus: error: --prefetch must be a whole number >= 1, not 0\n"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def broken(:\n", "{failed}brokenapp.py:1: SyntaxError: "),
        ("import nowhere_to_be_found\n", "{failed}it imports 'nowhere_to_be_found', which is not installed "
         "(at brokenapp.py:1); install it, or check the import"),
        ("x = 1\nraise RuntimeError('no config')\n", "{failed}RuntimeError: no config (at brokenapp.py:2)"),
    ],
    ids=["syntax-error", "missing-dependency", "raises"],
)  # fmt: skip
@pytest.mark.parametrize("command", ["worker", "routes", "dlq"])
def test_an_app_module_that_fails_to_import_is_one_clear_line(
    tmp_path: Path, source: str, expected: str, command: str
) -> None:
    (tmp_path / "brokenapp.py").write_text(source)
    args = [str(SCRIPT), command, "brokenapp:dp", *(["list"] if command == "dlq" else [])]
    result = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # no traceback
    assert lines[0].startswith("pybus: error: " + expected.format(failed="Importing 'brokenapp' failed: "))


def test_a_dispatcher_factory_that_raises_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "factoryapp.py").write_text("def create():\n    raise KeyError('REDIS_URL')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UsageError) as info:
        load_dispatcher("factoryapp:create")
    assert str(info.value) == (
        "Calling factoryapp:create to build the dispatcher failed: KeyError: 'REDIS_URL' (at factoryapp.py:2)"
    )


def test_worker_takes_max_deliveries_and_wait() -> None:
    result = pybus("worker", "examples.redis_worker:create_worker", "--max-deliveries", "0")
    assert result.returncode == 2
    assert result.stderr == "pybus: error: --max-deliveries must be a whole number >= 1, not 0\n"
    result = pybus("worker", "examples.redis_worker:create_worker", "--wait", "0")
    assert result.returncode == 2
    assert result.stderr == "pybus: error: --wait must be a number of seconds > 0, not 0\n"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import os\nurl = os.environ['PYBUS_NOT_SET_ANYWHERE']\n",
         "KeyError: 'PYBUS_NOT_SET_ANYWHERE' (at brokenapp.py:2)"),
        ("import sys\nsys.exit('configure me first')\n",
         "it called sys.exit('configure me first') (at brokenapp.py:2)"),
        ("raise ValueError('line one\\nline two')\n", "ValueError: line one line two (at brokenapp.py:1)"),
    ],
    ids=["frozen-stdlib-frame", "sys-exit", "multi-line-message"],
)  # fmt: skip
def test_import_failures_name_the_applications_own_line_on_one_line(
    tmp_path: Path, source: str, expected: str
) -> None:
    (tmp_path / "brokenapp.py").write_text(source)
    result = subprocess.run(
        [str(SCRIPT), "routes", "brokenapp:dp"], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr == f"pybus: error: Importing 'brokenapp' failed: {expected}\n"


def test_version() -> None:
    result = pybus("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"pybus {pybus_package.__version__}")


def test_a_file_path_and_a_module_with_one_dispatcher_need_no_attribute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "shop"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "bus.py").write_text("from pybus import Dispatcher\n\nbus = Dispatcher()\n")
    (package / "two.py").write_text("from pybus import Dispatcher\n\na = Dispatcher()\nb = Dispatcher()\n")
    (package / "none.py").write_text("VALUE = 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    found = load_dispatcher("shop/bus.py")
    assert found is load_dispatcher("shop.bus:bus") is load_dispatcher("shop.bus")
    with pytest.raises(UsageError, match=r"holds 2 Dispatchers \(a, b\); name one, as in shop.two:a"):
        load_dispatcher("shop/two.py")
    with pytest.raises(UsageError, match=r"'shop\.none' holds no Dispatcher"):
        load_dispatcher("shop.none")
    with pytest.raises(UsageError, match="is not below this folder"):
        load_dispatcher(str(ROOT / "examples" / "orders.py"))


def test_worker_prints_its_start_line_and_takes_a_log_level(redis_url: str) -> None:
    env = {**os.environ, "REDIS_URL": redis_url, "PYBUS_CONSUMER": "w1"}
    worker = subprocess.Popen(
        [str(SCRIPT), "worker", "examples.redis_worker:create_worker", "--log-level", "debug"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert worker.stderr is not None
        line = worker.stderr.readline()
        rest = worker.stderr.readline()  # the first record, once serving (the event loop's DEBUG line)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=30)
    assert line.startswith(
        f"pybus {pybus_package.__version__} worker: examples.redis_worker:create_worker on "
    )
    assert "RedisTransport, routes " in line
    assert "concurrency 4, prefetch 100, max deliveries 5" in line
    assert " DEBUG " in rest  # the level given reached the root logger


# -- finding the app: factories, aliases, file paths (issue #16's review) -----------------


def write_module(folder: Path, name: str, source: str) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty project folder, the working directory and first on sys.path; modules written
    there are forgotten afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def test_the_issues_own_file_path_example_finds_its_factory() -> None:
    given = pybus("routes", "examples/orders.py")
    assert (given.returncode, given.stderr) == (0, "")
    assert given.stdout == pybus("routes", APP).stdout
    quickstart = pybus("routes", "examples/quickstart.py")  # build() -> Dispatcher
    assert (quickstart.returncode, quickstart.stderr) == (0, "")
    assert "examples.quickstart.get_user_name" in quickstart.stdout


def test_load_app_names_the_factory_it_found() -> None:
    # orders.py also has build(mailer) -> Dispatcher, which the command line cannot call.
    name, dp = load_app("examples/orders.py")
    assert name == APP
    assert isinstance(dp, Dispatcher)


def test_a_factory_is_found_by_its_annotation_even_when_the_others_do_not_resolve(project: Path) -> None:
    write_module(project, "lazyapp.py", """\
        from __future__ import annotations

        from typing import TYPE_CHECKING

        import pybus

        if TYPE_CHECKING:
            from shop.settings import Settings  # only for type checkers: does not resolve


        def make(settings: Settings | None = None) -> pybus.Dispatcher:
            return pybus.Dispatcher()


        def helper() -> int:
            return 1
        """)  # fmt: skip
    assert load_app("lazyapp") [0] == "lazyapp:make"  # fmt: skip


def test_a_factory_returning_a_subclass_is_found_when_a_parameters_annotation_does_not_resolve(
    project: Path,
) -> None:
    write_module(project, "subbus.py", """\
        from __future__ import annotations

        from typing import TYPE_CHECKING

        import pybus

        if TYPE_CHECKING:
            from shop.settings import Settings  # only for type checkers: does not resolve


        class ShopBus(pybus.Dispatcher):
            pass


        def make(settings: Settings | None = None) -> ShopBus:
            return ShopBus()
        """)  # fmt: skip
    name, dp = load_app("subbus")
    assert (name, type(dp).__name__) == ("subbus:make", "ShopBus")


@pytest.mark.parametrize(
    ("source", "error"),
    [
        (
            "from pybus import Dispatcher\n\ndef create_app() -> Dispatcher: ...\n"
            "def create_worker() -> Dispatcher: ...\n",
            "'m' holds no Dispatcher but 2 functions that return one (create_app, create_worker); "
            "name one, as in m:create_app",
        ),
        (
            "from pybus import Dispatcher\n\ndef build(mailer: object) -> Dispatcher: ...\n",
            "'m' holds no Dispatcher; build(mailer) returns one, but pybus calls a factory without "
            "arguments: add a function that takes none and builds it, and name it, as in "
            "m:create_app",
        ),
        (
            "from pybus import Dispatcher\n\ndef build(mailer: object) -> Dispatcher: ...\n"
            "def create():\n    return build(None)\n",
            "'m' holds no Dispatcher; build(mailer) returns one, but pybus calls a factory without "
            "arguments; if create builds it, name it, as in m:create",
        ),
        (
            "def create():\n    ...\ndef build(*parts):\n    ...\ndef make_app() -> int: ...\n",
            "'m' holds no Dispatcher, nor a function annotated to return one (-> Dispatcher); if one of "
            "create, build builds it, name it, as in m:create",
        ),
        (
            "from pybus import Dispatcher\n\nasync def create_app() -> Dispatcher: ...\n",
            "'m' holds no Dispatcher, nor a function annotated to return one (-> Dispatcher); name the one "
            "to use (or a function that builds it) as m:attribute",
        ),
    ],
    ids=["two-factories", "factory-with-arguments", "unannotated-guess", "guesses", "async-factory"],
)
def test_a_module_without_a_dispatcher_is_refused_with_the_attribute_to_type(
    project: Path, source: str, error: str
) -> None:
    write_module(project, "m.py", source)
    with pytest.raises(UsageError) as info:
        load_dispatcher("m")
    assert str(info.value) == error


def test_a_dispatcher_made_at_import_wins_over_a_factory(project: Path) -> None:
    write_module(project, "both.py", """\
        from pybus import Dispatcher

        dp = Dispatcher()


        def create_app() -> Dispatcher:
            return Dispatcher()
        """)  # fmt: skip
    import both  # type: ignore[import-not-found]

    assert load_app("both") == ("both:dp", both.dp)


def test_one_dispatcher_under_two_names_is_one_dispatcher(project: Path) -> None:
    write_module(project, "two/alias.py", "from pybus import Dispatcher\ndp = Dispatcher()\nbus = dp\n")
    write_module(
        project, "two/three.py", "from pybus import Dispatcher\na = Dispatcher()\nc = b = Dispatcher()\n"
    )
    name, dp = load_app("two/alias.py")
    assert (name, dp) == ("two.alias:bus", sys.modules["two.alias"].dp)
    with pytest.raises(UsageError) as info:
        load_dispatcher("two/three.py")
    assert str(info.value) == "'two.three' holds 2 Dispatchers (a, b = c); name one, as in two.three:a"


def test_a_file_path_without_py_names_the_module_or_the_package(project: Path) -> None:
    write_module(project, "store/__init__.py", "from pybus import Dispatcher\nroot = Dispatcher()\n")
    write_module(project, "store/bus.py", "from pybus import Dispatcher\nbus = Dispatcher()\n")
    assert load_app("store/bus")[0] == "store.bus:bus"
    assert load_app("store/bus:bus")[0] == "store.bus:bus"
    assert load_app("store/")[0] == "store:root"
    with pytest.raises(UsageError) as info:
        load_dispatcher("store/nothere")
    assert str(info.value) == (
        f"'store/nothere' names no module: there is neither store/nothere.py nor a package "
        f"store/nothere/__init__.py in {project}; write the module's file (app/bus.py) or its name (app.bus)"
    )


def test_a_file_outside_the_folder_is_refused_with_where_to_run_from(project: Path) -> None:
    elsewhere = str(ROOT / "examples" / "orders.py")
    with pytest.raises(UsageError) as info:
        load_dispatcher(f"{elsewhere}:create_app")
    assert str(info.value) == (
        f"'{elsewhere}' is not below this folder ({project}); pybus imports the app as a "
        f"module, from the folder it runs in: run the command from {ROOT} and pass "
        f"examples.orders:create_app (or set PYTHONPATH={ROOT} and pass examples.orders:create_app)"
    )
    # Without a project file: the folder above the file's outermost package.
    write_module(project, "other/src/shop/__init__.py", "")
    write_module(project, "other/src/shop/bus.py", "")
    (project / "here").mkdir()
    os.chdir(project / "here")
    with pytest.raises(UsageError, match=rf"run the command from {project}/other/src and pass shop\.bus \("):
        load_dispatcher("../other/src/shop/bus.py")
    # A src layout below a project file: its src folder.
    (project / "other" / "pyproject.toml").write_text("")
    with pytest.raises(UsageError, match=rf"run the command from {project}/other/src and pass shop\.bus \("):
        load_dispatcher("../other/src/shop/bus.py")


def test_a_file_whose_path_is_no_module_name_is_refused_with_where_to_run_from(project: Path) -> None:
    write_module(project, "my-service/pyproject.toml", "")
    write_module(project, "my-service/bus.py", "")
    with pytest.raises(UsageError) as info:
        load_dispatcher("my-service/bus.py")
    assert str(info.value) == (
        f"'my-service/bus.py' cannot be imported from this folder ({project}): its path is not a module "
        f"name; pybus imports the app as a module, from the folder it runs in: run the command from "
        f"{project}/my-service and pass bus (or set PYTHONPATH={project}/my-service and pass bus)"
    )
    # The project's folder is above a folder whose name is no module name: the file's own folder.
    write_module(project, "other/pyproject.toml", "")
    write_module(project, "other/my-tools/bus.py", "")
    with pytest.raises(UsageError, match=rf"run the command from {project}/other/my-tools and pass bus \("):
        load_dispatcher("other/my-tools/bus.py")
    # A file whose own name is no module name: nowhere to import it from.
    write_module(project, "scripts/run-bus.py", "")
    with pytest.raises(UsageError) as info:
        load_dispatcher("scripts/run-bus.py:dp")
    assert str(info.value).endswith(
        "from the folder it runs in: run the command from your project's folder and pass the module's name, "
        "as in app.bus:dp"
    )


def test_which_routed_keys_a_worker_consumes_and_why_it_would_consume_none() -> None:
    from pybus.cli import _handled_here, _nothing_to_consume
    from pybus.transport import InMemoryTransport

    dp = Dispatcher(transport=InMemoryTransport())
    dp.events.bind(Event, lambda event: None)  # every event class, through its bases
    dp.route(Shipped)
    dp.route("audit")
    assert _handled_here(dp, Shipped)
    assert not _handled_here(dp, "audit")
    dp.events.bind("audit", lambda: None)
    assert _handled_here(dp, "audit")
    assert _nothing_to_consume("app:dp", Dispatcher(transport=InMemoryTransport())).startswith(
        "app:dp routes no messages, so a worker would read nothing: route each message"
    )
    unhandled = Dispatcher(transport=InMemoryTransport())
    unhandled.route(Shipped, name="orders.shipped")
    unhandled.route(Lost, name="orders.lost")
    assert _nothing_to_consume("app:dp", unhandled).startswith(
        "app:dp routes orders.lost, orders.shipped, but has no handler for any of them"
    )


# -- worker: what it refuses before it starts ---------------------------------------------


NO_ROUTES = """\
    from dataclasses import dataclass

    from pybus import Dispatcher, Event
    from pybus.transport import InMemoryTransport


    @dataclass
    class Shipped(Event):
        order_id: int


    def create() -> Dispatcher:
        return Dispatcher(transport=InMemoryTransport())


    def sender() -> Dispatcher:
        dp = Dispatcher(transport=InMemoryTransport())
        dp.route(Shipped, name="orders.shipped")
        return dp
    """


def test_a_worker_with_nothing_to_consume_is_refused(tmp_path: Path) -> None:
    write_module(tmp_path, "noroutes.py", NO_ROUTES)

    def worker(app: str) -> subprocess.CompletedProcess[str]:  # a worker that starts runs until killed
        return subprocess.run(
            [str(SCRIPT), "worker", app], capture_output=True, text=True, cwd=tmp_path, timeout=60
        )

    assert worker("noroutes:create").stderr == (
        "pybus: error: noroutes:create routes no messages, so a worker would read nothing: route each "
        "message the worker handles with dp.route(Key) (its handlers registered in this dispatcher as "
        "usual), or run a service beside it with dp.add_service(...); see the transports guide "
        "(docs/transports.md)\n"
    )
    refused = worker("noroutes:sender")
    assert refused.returncode == 2
    assert refused.stderr == (
        "pybus: error: noroutes:sender routes orders.shipped, but has no handler for any of them, so a "
        "worker would read nothing: register the handlers of the messages it should consume in this "
        "dispatcher (a process that only sends them needs no worker)\n"
    )


def test_a_worker_runs_a_service_without_routes_and_logs_without_a_doubled_prefix(tmp_path: Path) -> None:
    write_module(tmp_path, "relayapp.py", """\
        import asyncio
        import logging

        from pybus import Dispatcher
        from pybus.transport import InMemoryTransport


        class Relay:  # an outbox relay's shape: sends what others committed, consumes nothing
            def __init__(self) -> None:
                self.stopped = asyncio.Event()

            async def run(self) -> None:
                logging.getLogger("pybus").warning("pybus: the relay runs")
                logging.getLogger("shop.relay").warning("relay ready")
                await self.stopped.wait()

            async def stop(self) -> None:
                self.stopped.set()


        def create() -> Dispatcher:
            dp = Dispatcher(transport=InMemoryTransport())
            dp.add_service(Relay())
            return dp
        """)  # fmt: skip
    worker = subprocess.Popen(
        [str(SCRIPT), "worker", "relayapp:create", "--log-level", "warning"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert worker.stderr is not None
        lines = [worker.stderr.readline() for _ in range(3)]
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=30)
    assert worker.returncode == 0
    assert lines[0] == (
        f"pybus {pybus_package.__version__} worker: relayapp:create on InMemoryTransport, routes none, "
        "services Relay; concurrency 4, prefetch 100, max deliveries 5\n"
    )
    assert re.fullmatch(r"\S+ \S+ WARNING pybus: the relay runs\n", lines[1]), lines[1]
    assert re.fullmatch(r"\S+ \S+ WARNING shop.relay: relay ready\n", lines[2]), lines[2]


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("--concurrency", "0", "--concurrency must be a whole number >= 1, not 0"),
        ("--prefetch", "-3", "--prefetch must be a whole number >= 1, not -3"),
        ("--max-deliveries", "0", "--max-deliveries must be a whole number >= 1, not 0"),
        ("--wait", "nan", "--wait must be a number of seconds > 0, not nan"),
        ("--drain-timeout", "-1", "--drain-timeout must be a number of seconds >= 0 (inf: no limit), not -1"),
    ],
)
def test_worker_options_are_refused_by_their_flag_before_the_start_line(
    project: Path, option: str, value: str, error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    write_module(project, "noroutes.py", NO_ROUTES)
    with pytest.raises(SystemExit) as info:
        main(["worker", "noroutes:create", option, value])  # the app would be refused too: later
    assert info.value.code == 2
    assert capsys.readouterr() == ("", f"pybus: error: {error}\n")
    assert "noroutes" not in sys.modules  # refused before the app was imported


def test_the_log_format_drops_a_logger_name_the_message_repeats() -> None:
    formatter = _LogFormatter()

    def line(name: str, message: str) -> str:
        record = logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, None)
        return formatter.format(record).split(" ", 2)[2]  # after the date and time

    assert (
        line("pybus", "pybus: Redis runs with appendonly no")
        == "WARNING pybus: Redis runs with appendonly no"
    )
    assert line("pybus.otel", "pybus.otel could not end a span") == "WARNING pybus.otel could not end a span"
    assert line("shop", "order placed") == "WARNING shop: order placed"
    assert line("pybus", "pybusy: not the name") == "WARNING pybus: pybusy: not the name"
