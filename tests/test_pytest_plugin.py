"""The plugin's default fixtures, with no override of the factory."""

from __future__ import annotations

from collections.abc import Callable

from pybus import Dispatcher
from pybus.testing import TrackedSession


async def test_default_factory_gives_an_empty_started_dispatcher(
    pybus_dispatcher: Dispatcher, pybus_track: Callable[..., TrackedSession]
) -> None:
    assert pybus_dispatcher.started
    session = await pybus_track().publish("hello")
    assert session.no_handler.messages == ["hello"]
