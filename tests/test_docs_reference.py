"""The API reference documents every option of the constructors, with its default.

The reference page (docs/reference.md) renders the docstrings with mkdocstrings: a
class shows its `__init__` signature and its "Args:" section as a table of name,
type, meaning and default. These tests build the site and read those tables back
from the HTML, so a parameter added to a constructor without a line in its
docstring, a default that the page shows wrong, or a setting that stops the table
from rendering, fails here.
"""

from __future__ import annotations

import html
import inspect
import re
import sys
from collections.abc import Callable
from html.parser import HTMLParser
from typing import Any

import pytest

from pybus import Dispatcher
from pybus.consumer import Consumer
from pybus.redis_streams import RedisTransport
from tests.docs_site import ROOT, built_site

# The anchor mkdocstrings gives each object on the reference page, and what it documents.
CONSTRUCTORS: dict[str, Callable[..., Any]] = {
    "pybus.Dispatcher": Dispatcher.__init__,
    "pybus.Dispatcher.consumer": Dispatcher.consumer,
    "pybus.Dispatcher.serve": Dispatcher.serve,
    "pybus.consumer.Consumer": Consumer.__init__,
    "pybus.redis_streams.RedisTransport": RedisTransport.__init__,
}


class _Cells(HTMLParser):
    """The rows of the first parameters table: the text of each cell, with a name the page
    shortens (`<span title="signal.SIGINT">SIGINT</span>`) written in full."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self._tables = 0
        self._titled = 0  # inside a span whose title says the full name

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._tables += 1
        if self._tables != 1:
            return
        if tag == "tr" and ("class", "doc-section-item") in attrs:
            self.rows.append([])
        elif tag == "td" and self.rows:
            self._cell = []
        elif tag == "span" and self._cell is not None:
            title = dict(attrs).get("title")
            if self._titled or title:
                self._titled += 1
                if self._titled == 1 and title:
                    self._cell.append(title)

    def handle_endtag(self, tag: str) -> None:
        if tag == "span" and self._titled:
            self._titled -= 1
        elif tag == "td" and self._cell is not None:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None and not self._titled:
            self._cell.append(data)


def documented(anchor: str) -> dict[str, tuple[str, str]]:
    """name -> (meaning, default) from the object's parameters table on the built page."""
    page = (built_site() / "reference" / "index.html").read_text()
    start = page.find(f'id="{anchor}"')
    assert start != -1, f"the reference page has no entry {anchor}"
    start = page.find("</h", start)  # past the object's own heading
    # The object's own part: up to its children (a class) or the next object's heading.
    ends = [
        page.find(marker, start + 1) for marker in ('class="doc doc-children"', 'class="doc doc-heading"')
    ]
    part = page[start : min(end for end in ends if end != -1)]
    cells = _Cells()
    cells.feed(part)
    assert cells.rows, f"{anchor} shows no parameters table on the reference page"
    table: dict[str, tuple[str, str]] = {}
    for row in cells.rows:
        name, _type, meaning, default = row
        table[html.unescape(name)] = (meaning, html.unescape(default))
    return table


def parameters(function: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """The parameters a caller passes, named as a docstring names them (`*args`, `**kwargs`)."""
    prefixes: dict[Any, str] = {
        inspect.Parameter.VAR_POSITIONAL: "*",
        inspect.Parameter.VAR_KEYWORD: "**",
    }
    return {
        prefixes.get(parameter.kind, "") + parameter.name: parameter
        for parameter in inspect.signature(function).parameters.values()
        if parameter.name != "self"
    }


@pytest.mark.parametrize("anchor", sorted(CONSTRUCTORS))
def test_every_parameter_is_documented_with_its_meaning(anchor: str) -> None:
    signature = parameters(CONSTRUCTORS[anchor])
    table = documented(anchor)
    missing = [name for name in signature if name not in table]
    assert not missing, (
        f"{anchor}: the reference page does not document {missing}; add them to the "
        "docstring's Args: section (one line each: what it means)"
    )
    stale = [name for name in table if name not in signature]
    assert not stale, f"{anchor}: the reference page documents {stale}, which the signature lacks"
    assert list(table) == list(signature), f"{anchor}: document the parameters in the signature's order"
    for name, (meaning, _default) in table.items():
        assert len(meaning) > 10, f"{anchor}: {name} has no meaning on the reference page"


@pytest.mark.parametrize("anchor", sorted(CONSTRUCTORS))
def test_every_default_shown_is_the_real_one(anchor: str) -> None:
    function = CONSTRUCTORS[anchor]
    namespace = vars(sys.modules[function.__module__])
    table = documented(anchor)
    for name, parameter in parameters(function).items():
        shown = table[name][1]
        if parameter.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            empty = "{}" if parameter.kind is inspect.Parameter.VAR_KEYWORD else "()"
            assert shown == empty, f"{anchor}: {name} takes what is passed, the page shows {shown!r}"
        elif parameter.default is inspect.Parameter.empty:
            assert shown == "required", f"{anchor}: {name} has no default, the page shows {shown!r}"
        else:
            assert eval(shown, namespace) == parameter.default, (  # the page shows source text
                f"{anchor}: {name} defaults to {parameter.default!r}, the page shows {shown!r}"
            )


def test_the_reference_page_lists_the_constructors() -> None:
    page = (ROOT / "docs" / "reference.md").read_text()
    for anchor in CONSTRUCTORS:
        assert f"[{anchor}]" in page or f"::: {anchor}" in page, f"docs/reference.md does not show {anchor}"
    assert re.search(r"merge_init_into_class: true", (ROOT / "mkdocs.yml").read_text())
