"""The `pybus` command line, run as a user runs it, against examples/orders.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec
import pydantic
import pytest

import pybus as pybus_package
from pybus import Dispatcher, Event, Singleton
from pybus.cli import UsageError, build_message, find_message, format_routes, load_dispatcher, main, to_json
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
        (("routes", "examples.orders"), 2, "'examples.orders' holds no Dispatcher; name the one to use"),
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
    assert result.stderr == "pybus: error: prefetch must be a whole number >= 1, not 0\n"


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
    assert result.stderr == "pybus: error: max_deliveries must be a whole number >= 1, not 0\n"
    result = pybus("worker", "examples.redis_worker:create_worker", "--wait", "0")
    assert result.returncode == 2
    assert result.stderr == "pybus: error: wait must be a number of seconds > 0, not 0.0\n"


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
    with pytest.raises(UsageError, match="is a file path that is not a module below this folder"):
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
