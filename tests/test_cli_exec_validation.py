"""`pybus exec` checks the JSON against the message's fields before anything is dispatched.

Each kind of mistake is tried against a dataclass, a pydantic model and a msgspec struct of the
same shape: the command line exits 2 with a message naming the class, the field and what it
expects, and the handler is never called. Good input still reaches the handler.
"""

from __future__ import annotations

import datetime
import enum
import html.parser
import subprocess
import sys
import types
import uuid
from dataclasses import InitVar, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import markdown  # type: ignore[import-untyped]  # Markdown ships no type information
import msgspec
import pydantic
import pytest

from pybus import Dispatcher
from pybus.cli import UsageError, build_message, main

ROOT = Path(__file__).resolve().parent.parent
APP = "exec_validation_app:create"


@dataclass(frozen=True)
class DcLine:
    sku: str
    qty: int = 1


@dataclass(frozen=True)
class DcOrder:
    customer: str
    lines: list[DcLine]
    note: str | None = None


class PdLine(pydantic.BaseModel):
    sku: str
    qty: int = 1


class PdOrder(pydantic.BaseModel):
    customer: str
    lines: list[PdLine]
    note: str | None = None


class MsLine(msgspec.Struct):
    sku: str
    qty: int = 1


class MsOrder(msgspec.Struct):
    customer: str
    lines: list[MsLine]
    note: str | None = None


@pytest.fixture
def handled(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The messages the app's handlers received; the app is importable as exec_validation_app."""
    received: list[object] = []

    def create() -> Dispatcher:
        dp = Dispatcher()

        async def take(order: Any) -> str:
            received.append(order)
            return f"ok {order.customer}"

        for cls in (DcOrder, PdOrder, MsOrder):
            dp.commands.bind(cls, take)
        return dp

    module = types.ModuleType("exec_validation_app")
    module.create = create  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "exec_validation_app", module)
    return received


def refused(arguments: str, message: str, capsys: pytest.CaptureFixture[str]) -> str:
    """stderr of `pybus exec APP message arguments`, which must exit 2 and print nothing."""
    with pytest.raises(SystemExit) as info:
        main(["exec", APP, message, arguments])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    return err


def takes(name: str) -> str:
    return (
        f"{name} takes a JSON object with customer: str, lines: list[{name[:2]}Line], "
        "note: str | None (optional); fix the JSON and run again\n"
    )


FAMILIES = ["DcOrder", "PdOrder", "MsOrder"]


@pytest.mark.parametrize("name", FAMILIES)
def test_good_input_reaches_the_handler(
    name: str, handled: list[object], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["exec", APP, name, '{"customer": "ada", "lines": [{"sku": "book-1"}]}']) == 0
    assert capsys.readouterr().out == '"ok ada"\n'
    (order,) = handled
    assert type(order).__name__ == name
    assert order.customer == "ada"  # type: ignore[attr-defined]
    (line,) = order.lines  # type: ignore[attr-defined]
    assert (type(line).__name__, line.sku, line.qty) == (f"{name[:2]}Line", "book-1", 1)


@pytest.mark.parametrize("name", FAMILIES)
def test_an_unknown_field_is_refused(
    name: str, handled: list[object], capsys: pytest.CaptureFixture[str]
) -> None:
    err = refused('{"customer": "ada", "lines": [], "coupon": "X"}', name, capsys)
    assert err == f"pybus: error: The arguments do not fit {name}:\n  coupon: unknown field\n{takes(name)}"
    assert handled == []


@pytest.mark.parametrize("name", FAMILIES)
def test_a_missing_required_field_is_refused(
    name: str, handled: list[object], capsys: pytest.CaptureFixture[str]
) -> None:
    err = refused('{"lines": []}', name, capsys)
    assert err == (
        f"pybus: error: The arguments do not fit {name}:\n"
        f"  customer: required field missing (expected str)\n{takes(name)}"
    )
    assert handled == []


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("DcOrder", "customer: expected str, got 7"),
        ("PdOrder", "customer: Input should be a valid string (got 7)"),
        ("MsOrder", "customer: Expected `str`, got `int`"),
    ],
)
def test_a_wrong_type_is_refused(
    name: str, problem: str, handled: list[object], capsys: pytest.CaptureFixture[str]
) -> None:
    err = refused('{"customer": 7, "lines": []}', name, capsys)
    assert err == f"pybus: error: The arguments do not fit {name}:\n  {problem}\n{takes(name)}"
    assert handled == []


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("DcOrder", 'lines[0].qty: expected int, got "two"'),
        ("PdOrder", 'lines[0].qty: Input should be a valid integer, unable to parse string as an integer '
         '(got "two")'),
        ("MsOrder", "lines[0].qty: Expected `int`, got `str`"),
    ],
)  # fmt: skip
def test_a_wrong_type_inside_a_nested_message_is_named_by_its_path(
    name: str, problem: str, handled: list[object], capsys: pytest.CaptureFixture[str]
) -> None:
    err = refused('{"customer": "ada", "lines": [{"sku": "b", "qty": "two"}]}', name, capsys)
    assert err == f"pybus: error: The arguments do not fit {name}:\n  {problem}\n{takes(name)}"
    assert handled == []


@pytest.mark.parametrize("name", FAMILIES)
def test_json_that_is_not_an_object_is_refused(
    name: str, handled: list[object], capsys: pytest.CaptureFixture[str]
) -> None:
    err = refused('["ada"]', name, capsys)
    assert err == f'pybus: error: The arguments of {name} must be a JSON object, not ["ada"]\n{takes(name)}'
    assert handled == []


@pytest.mark.parametrize("name", FAMILIES)
def test_invalid_json_is_refused(
    name: str, handled: list[object], capsys: pytest.CaptureFixture[str]
) -> None:
    err = refused("{customer: ada}", name, capsys)
    assert err == (
        f"pybus: error: The arguments for {name} are not valid JSON (Expecting property name enclosed in "
        "double quotes: line 1 column 2 (char 1)): {customer: ada}\n"
        """Write a JSON object in single quotes for the shell, as in '{"field": "value"}'\n""" + takes(name)
    )
    assert handled == []


@pytest.mark.parametrize("name", FAMILIES)
def test_every_problem_is_listed_with_the_fields_the_class_takes(
    name: str, handled: list[object], capsys: pytest.CaptureFixture[str]
) -> None:
    err = refused('{"custmer": "ada", "lines": []}', name, capsys)
    lines = err.splitlines()
    assert lines[0] == f"pybus: error: The arguments do not fit {name}:"
    assert sorted(lines[1:-1]) == [
        "  custmer: unknown field",
        "  customer: required field missing (expected str)",
    ]
    assert lines[-1] == takes(name).strip()
    assert handled == []


def test_the_real_command_exits_2_on_a_field_error() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).with_name("pybus")), "exec", "examples.orders:create_app", "PlaceOrder",
         '{"customer": "ada", "sku": 3}'],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "pybus: error: The arguments do not fit PlaceOrder:\n"
        "  sku: expected str, got 3\n"
        "PlaceOrder takes a JSON object with customer: str, sku: str; fix the JSON and run again\n"
    )


# -- what is checked for a dataclass -----------------------------------------------------


@dataclass
class Shipment:
    order_id: int
    weight: float = 0.0
    rush: bool = False
    carrier: Literal["post", "courier"] = "post"
    label: Optional[str] = None  # noqa: UP045  # the typing spelling is read too
    tags: dict[str, int] = field(default_factory=dict)
    address: DcLine | None = None
    parts: tuple[int, ...] = ()
    extra: Any = None
    scale: InitVar[int] = 1

    def __post_init__(self, scale: int) -> None:
        self.weight *= scale


def test_a_dataclass_is_built_with_its_nested_dataclasses_and_numbers() -> None:
    shipment = build_message(
        Shipment,
        {"order_id": 1, "weight": 2, "rush": True, "carrier": "courier", "label": None, "tags": {"a": 1},
         "address": {"sku": "b"}, "parts": [1, 2], "extra": {"any": ["thing"]}, "scale": 3},
    )  # fmt: skip
    assert shipment == Shipment(
        1, 6.0, True, "courier", None, {"a": 1}, DcLine("b"), (1, 2), {"any": ["thing"]}
    )
    assert isinstance(shipment, Shipment)
    assert isinstance(shipment.weight, float)
    assert isinstance(shipment.address, DcLine)


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({"order_id": True}, "order_id: expected int, got true"),
        ({"order_id": 1.5}, "order_id: expected int, got 1.5"),
        ({"order_id": 1, "weight": "9"}, 'weight: expected float, got "9"'),
        ({"order_id": 1, "rush": 1}, "rush: expected bool, got 1"),
        ({"order_id": 1, "carrier": "van"}, "carrier: expected Literal['post', 'courier'], got \"van\""),
        ({"order_id": 1, "label": 5}, "label: expected str | None, got 5"),
        ({"order_id": 1, "tags": {"a": "1"}}, 'tags.a: expected int, got "1"'),
        ({"order_id": 1, "tags": []}, "tags: expected dict[str, int], got []"),
        ({"order_id": 1, "address": {"qty": 2}}, "address.sku: required field missing (expected str)"),
        ({"order_id": 1, "address": "b"}, 'address: expected DcLine | None, got "b"'),
        ({"order_id": 1, "scale": "2"}, 'scale: expected int, got "2"'),
        ({"order_id": 1, "parts": [1, "x"]}, 'parts[1]: expected int, got "x"'),
        ({"order_id": 1, "parts": "12"}, 'parts: expected tuple[int, ...], got "12"'),
    ],
)
def test_what_a_dataclass_field_is_checked_for(arguments: dict[str, object], problem: str) -> None:
    with pytest.raises(UsageError) as info:
        build_message(Shipment, arguments)
    assert str(info.value).splitlines()[:2] == ["The arguments do not fit Shipment:", f"  {problem}"]


@dataclass
class Unresolved:
    when: NotDefinedAnywhere  # type: ignore[name-defined]  # noqa: F821


def test_annotations_that_do_not_resolve_leave_the_names_checked() -> None:
    assert build_message(Unresolved, {"when": "any value"}) == Unresolved("any value")
    with pytest.raises(UsageError, match=r"  whenever: unknown field\n  when: required field missing"):
        build_message(Unresolved, {"whenever": 1})


@dataclass
class PartlyResolved:
    when: NotDefinedAnywhere  # type: ignore[name-defined]  # noqa: F821
    count: int


def test_an_annotation_that_does_not_resolve_leaves_the_others_checked() -> None:
    assert build_message(PartlyResolved, {"when": "any value", "count": 3}) == PartlyResolved("any value", 3)
    with pytest.raises(UsageError) as info:
        build_message(PartlyResolved, {"when": "any value", "count": "3"})
    assert str(info.value).splitlines()[:2] == [
        "The arguments do not fit PartlyResolved:",
        '  count: expected int, got "3"',
    ]


class Hand:
    sku: str

    def __init__(self, sku):  # type: ignore[no-untyped-def]  # annotated in the class body only
        self.sku = sku


def test_a_plain_class_is_described_by_its_body_when_its_init_annotates_nothing() -> None:
    with pytest.raises(UsageError) as info:
        build_message(Hand, {"item": "book-1"})
    takes = str(info.value).splitlines()[-1]
    assert takes == "Hand takes a JSON object with sku: str; fix the JSON and run again"


def test_a_pydantic_model_that_chose_its_extra_keeps_it() -> None:
    class Open(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="allow")
        name: str

    assert build_message(Open, {"name": "a", "more": 1}).model_extra == {"more": 1}  # type: ignore[attr-defined]


def test_a_msgspec_struct_that_forbids_unknown_fields_reports_them_itself() -> None:
    class Strict(msgspec.Struct, forbid_unknown_fields=True):
        name: str

    with pytest.raises(UsageError) as info:
        build_message(Strict, {"name": "a", "more": 1})
    assert str(info.value).splitlines()[1] == "  more: unknown field"


@dataclass
class Checked:
    sku: str

    def __post_init__(self) -> None:
        if not self.sku:
            raise ValueError("a sku cannot be empty")


@dataclass
class Holder:
    item: Checked


@dataclass
class Nothing:
    pass


class Loose:
    def __init__(self, **fields: object) -> None:
        self.fields = fields


class Guarded(msgspec.Struct):
    sku: str

    def __post_init__(self) -> None:
        raise RuntimeError("the stock service is down")


def test_what_the_class_cannot_take_is_reported_with_what_to_do() -> None:
    with pytest.raises(UsageError) as info:
        build_message(Holder, {"item": {"sku": ""}})
    assert str(info.value).splitlines()[1] == "  item: cannot build Checked: a sku cannot be empty"
    with pytest.raises(UsageError) as info:
        build_message(Checked, {"sku": ""})
    assert str(info.value) == (
        'Cannot build Checked from {"sku": ""}: a sku cannot be empty\n'
        "Checked takes a JSON object with sku: str; fix the JSON and run again"
    )
    with pytest.raises(UsageError) as info:
        build_message(Nothing, [])
    assert str(info.value) == (
        "The arguments of Nothing must be a JSON object, not []\nNothing takes no fields: pass {} or nothing"
    )
    assert build_message(Loose, {"any": 1}).fields == {"any": 1}  # type: ignore[attr-defined]
    with pytest.raises(UsageError) as info:
        build_message(Loose, [])
    assert str(info.value).endswith("not []\nFix the JSON and run again")
    with pytest.raises(UsageError, match=r"^Cannot build Guarded from .*: the stock service is down$"):
        build_message(Guarded, {"sku": "b"})
    with pytest.raises(UsageError) as info:
        build_message(MsOrder, {"customer": "ada", "lines": [{"qty": 1}]})
    assert str(info.value).splitlines()[1] == "  lines[0].sku: required field missing"


def test_no_json_is_an_empty_object_and_annotated_types_are_shown_plain() -> None:
    with pytest.raises(UsageError) as info:
        build_message(DcOrder, None)
    assert str(info.value).splitlines()[1:3] == [
        "  customer: required field missing (expected str)",
        "  lines: required field missing (expected list[DcLine])",
    ]

    class Counted(msgspec.Struct):
        qty: Annotated[int, msgspec.Meta(ge=1)]

    with pytest.raises(UsageError) as info:
        build_message(Counted, {"qty": 0})
    assert str(info.value).splitlines()[1:] == [
        "  qty: Expected `int` >= 1",
        "Counted takes a JSON object with qty: int; fix the JSON and run again",
    ]


def test_invalid_json_for_a_string_message(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def create() -> Dispatcher:
        dp = Dispatcher()
        dp.events.bind("audit", lambda: None)
        return dp

    module = types.ModuleType("exec_string_app")
    module.create = create  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "exec_string_app", module)
    with pytest.raises(SystemExit):
        main(["exec", "exec_string_app:create", "audit", "{"])
    assert capsys.readouterr().err.endswith("\n'audit' is a string message: pass no arguments\n")


def test_the_cli_loads_no_model_library_the_app_does_not_use(tmp_path: Path) -> None:
    (tmp_path / "plainapp.py").write_text(
        "from dataclasses import dataclass\n"
        "from pybus import Dispatcher\n\n"
        "@dataclass\nclass Ping:\n    n: int\n\n"
        "dp = Dispatcher()\n"
        "dp.commands.bind(Ping, lambda ping: ping.n)\n"
    )
    check = (
        "import sys\n"
        "from pybus.cli import main\n"
        "code = main(['exec', 'plainapp:dp', 'Ping', '{\"n\": 2}'])\n"
        "print(code, sorted(m for m in ('pydantic', 'msgspec') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.stdout.splitlines() == ["2", "0 []"], result.stderr


def test_the_exec_section_shows_a_real_field_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    arguments = '{"customer": "ada", "skus": ["book-1"]}'
    with pytest.raises(SystemExit):
        main(["exec", "examples.orders:create_app", "PlaceOrder", arguments])
    shown = f"$ pybus exec examples.orders:create_app PlaceOrder '{arguments}'\n{capsys.readouterr().err}"
    assert shown in (ROOT / "docs" / "cli.md").read_text()


# -- the CLI page ----------------------------------------------------------------------


class _Cells(html.parser.HTMLParser):
    """The text of every table cell."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[str] = []
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("td", "th"):
            self.cells.append("")
            self._depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self._depth -= 1

    def handle_data(self, data: str) -> None:
        if self._depth:
            self.cells[-1] += data


def test_the_cli_page_tables_render_without_stray_backslashes() -> None:
    # As mkdocs renders it (mkdocs.yml: tables, superfences): GitHub's `\|` inside a code span
    # is shown literally by Python-Markdown.
    page = markdown.markdown(
        (ROOT / "docs" / "cli.md").read_text(), extensions=["tables", "pymdownx.superfences", "admonition"]
    )
    parser = _Cells()
    parser.feed(page)
    assert any("pybus graph APP" in cell for cell in parser.cells)
    assert [cell for cell in parser.cells if "\\" in cell] == []


# -- enums, dates and times, UUID, Decimal, tuples and sets ---------------------------------


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Size(enum.IntEnum):
    SMALL = 1
    LARGE = 2


@dataclass(frozen=True)
class Paint:
    color: Color
    when: datetime.date


@dataclass
class Everything:
    color: Color
    size: Size
    at: datetime.datetime
    opens: datetime.time
    ref: uuid.UUID
    price: Decimal
    pair: tuple[int, str]
    tags: set[str]
    codes: frozenset[int]
    shade: Optional[Color] = None  # noqa: UP045  # the typing spelling is read too
    days: list[datetime.date] | None = None


GOOD = {
    "color": "red", "size": 2, "at": "2024-05-17T09:30:00+02:00", "opens": "09:30", "price": 12.50,
    "ref": "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "pair": [1, "a"], "tags": ["x", "y", "x"],
    "codes": [3], "shade": "green", "days": ["2024-05-17", "2024-05-18"],
}  # fmt: skip
AS_IN = '(ISO 8601, as in "2024-05-17T09:30:00+00:00")'


def test_enums_dates_uuids_decimals_and_collections_are_built_from_json() -> None:
    built = build_message(Everything, GOOD)
    assert built == Everything(
        Color.RED,
        Size.LARGE,
        datetime.datetime(2024, 5, 17, 9, 30, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
        datetime.time(9, 30),
        uuid.UUID("1b4e28ba-2fa1-11d2-883f-0016d3cca427"),
        Decimal("12.5"),
        (1, "a"),
        {"x", "y"},
        frozenset({3}),
        Color.GREEN,
        [datetime.date(2024, 5, 17), datetime.date(2024, 5, 18)],
    )
    assert isinstance(built, Everything)
    written = build_message(Everything, {**GOOD, "price": "12.50", "shade": None, "days": None})
    assert isinstance(written, Everything)
    assert str(written.price) == "12.50"  # a string keeps its digits
    assert (written.shade, written.days) == (None, None)


@pytest.mark.parametrize(
    ("changed", "problem"),
    [
        ({"color": "blue"}, 'color: expected Color (one of "red", "green"), got "blue"'),
        ({"color": "RED"}, 'color: expected Color (one of "red", "green"), got "RED"'),  # values, not names
        ({"size": True}, "size: expected Size (one of 1, 2), got true"),
        ({"size": "1"}, 'size: expected Size (one of 1, 2), got "1"'),
        ({"at": "tomorrow"}, f'at: expected datetime {AS_IN}, got "tomorrow"'),
        ({"at": 1715930000}, f"at: expected datetime {AS_IN}, got 1715930000"),
        ({"opens": "25:00"}, 'opens: expected time (ISO 8601, as in "09:30:00"), got "25:00"'),
        ({"ref": "1234"}, 'ref: expected UUID (as in "1b4e28ba-2fa1-11d2-883f-0016d3cca427"), got "1234"'),
        ({"ref": 1234}, 'ref: expected UUID (as in "1b4e28ba-2fa1-11d2-883f-0016d3cca427"), got 1234'),
        ({"price": "12,50"}, 'price: expected Decimal (a number, or a string as in "12.50"), got "12,50"'),
        ({"price": "NaN"}, 'price: expected Decimal (a number, or a string as in "12.50"), got "NaN"'),
        ({"price": True}, 'price: expected Decimal (a number, or a string as in "12.50"), got true'),
        ({"pair": [1]}, "pair: expected tuple[int, str] (2 items), got [1]"),
        ({"pair": ["1", "a"]}, 'pair[0]: expected int, got "1"'),
        ({"tags": "x"}, 'tags: expected set[str], got "x"'),
        ({"tags": [["x"]]}, 'tags[0]: expected str, got ["x"]'),
        ({"codes": [1, "2"]}, 'codes[1]: expected int, got "2"'),
        ({"shade": "blue"}, 'shade: expected Color | None (one of "red", "green"), got "blue"'),
        ({"days": ["2024-05-17", "17/05/2024"]},
         'days[1]: expected date (ISO 8601, as in "2024-05-17"), got "17/05/2024"'),
    ],
)  # fmt: skip
def test_what_a_field_of_these_types_is_checked_for(changed: dict[str, object], problem: str) -> None:
    with pytest.raises(UsageError) as info:
        build_message(Everything, {**GOOD, **changed})
    assert str(info.value).splitlines()[:3] == ["The arguments do not fit Everything:", f"  {problem}", (
        "Everything takes a JSON object with color: Color, size: Size, at: datetime, opens: time, "
        "ref: UUID, price: Decimal, pair: tuple[int, str], tags: set[str], codes: frozenset[int], "
        "shade: Color | None (optional), days: list[date] | None (optional); fix the JSON and run again"
    )]  # fmt: skip


def test_a_set_of_unhashable_items_is_refused() -> None:
    @dataclass
    class Loose:
        seen: set  # type: ignore[type-arg]  # bare: any items

    assert build_message(Loose, {"seen": [1, "a"]}) == Loose({1, "a"})
    with pytest.raises(UsageError) as info:
        build_message(Loose, {"seen": [[1]]})
    assert str(info.value).splitlines()[1] == "  seen: cannot build set: unhashable type: 'list'"


def test_an_enum_and_a_date_that_do_not_fit_dispatch_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    painted: list[Paint] = []

    def create() -> Dispatcher:
        dp = Dispatcher()

        async def paint(cmd: Paint) -> str:
            painted.append(cmd)
            return f"{cmd.color.value} on {cmd.when.isoformat()}"

        dp.commands.bind(Paint, paint)
        return dp

    module = types.ModuleType("paint_app")
    module.create = create  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "paint_app", module)
    with pytest.raises(SystemExit) as info:
        main(["exec", "paint_app:create", "Paint", '{"color": "blue", "when": 5}'])
    assert info.value.code == 2
    assert capsys.readouterr() == ("", (
        "pybus: error: The arguments do not fit Paint:\n"
        '  color: expected Color (one of "red", "green"), got "blue"\n'
        '  when: expected date (ISO 8601, as in "2024-05-17"), got 5\n'
        "Paint takes a JSON object with color: Color, when: date; fix the JSON and run again\n"
    ))  # fmt: skip
    assert painted == []
    assert main(["exec", "paint_app:create", "Paint", '{"color": "red", "when": "2024-05-17"}']) == 0
    assert capsys.readouterr().out == '"red on 2024-05-17"\n'
    assert painted == [Paint(Color.RED, datetime.date(2024, 5, 17))]
