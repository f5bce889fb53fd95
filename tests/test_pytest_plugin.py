"""The plugin's default fixtures, with no override of the factory, and what installs them."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from pathlib import Path

from pybus import Dispatcher
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
