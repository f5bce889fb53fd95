"""`pybus.returns.returns_none`: proven only when every return is bare and the source is the running code."""

from __future__ import annotations

import asyncio
import functools
import importlib
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pybus import Dispatcher
from pybus.returns import returns_none


async def no_return(x: object) -> None:
    await asyncio.sleep(0)  # a method of an imported module: compiled differently alone


async def bare_returns(x: object) -> None:
    if x:
        return
    return None


async def returns_value(x: object) -> object:
    return x


async def returns_conditionally(x: object) -> object:
    return 1 if x else None


async def nested_returns(x: object) -> None:
    def inner() -> int:
        return 5

    values = [i for i in range(3)]  # noqa: F841 - a comprehension is code of its own
    _ = lambda: 3  # noqa: E731
    return None


def decorated(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    async def wrapper(*args: Any) -> Any:
        return await func(*args)

    return wrapper


@decorated
async def wrapped(x: object) -> None:
    pass


def sync_function(x: object) -> None:
    pass


class Handler:
    async def handle(self, x: object) -> None:
        await asyncio.sleep(0)

    async def answer(self, x: object) -> int:
        return 42


def closure() -> Callable[..., Any]:
    captured = 1

    async def inner(x: object) -> None:
        print(captured)

    return inner


namespace: dict[str, Any] = {}
exec("async def made_by_exec(x):\n    pass\n", namespace)


@pytest.mark.parametrize(
    ("func", "expected"),
    [
        (no_return, True),
        (bare_returns, True),
        (nested_returns, True),
        (Handler.handle, True),
        (Handler().handle, True),
        (closure(), True),
        (returns_value, False),
        (returns_conditionally, False),
        (Handler().answer, False),
        (wrapped, False),  # the wrapper's source is not what runs
        (sync_function, False),
        (namespace["made_by_exec"], False),  # no source
        (functools.partial(no_return), False),  # not a function: the engines unwrap partials themselves
        (len, False),
    ],
    ids=lambda value: getattr(value, "__qualname__", repr(value)),
)
def test_what_is_proven(func: object, expected: bool) -> None:
    assert returns_none(func) is expected


@pytest.fixture
def module_dir(tmp_path: Path) -> Iterator[Path]:
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))


def test_a_file_edited_since_import_is_not_trusted(module_dir: Path) -> None:
    """The running code returns its message; the file now says `return None`: no proof,
    so the returned event is still published."""
    path = module_dir / "edited_handlers.py"
    path.write_text("async def handle(message):\n    return message\n")
    module = importlib.import_module("edited_handlers")
    path.write_text("async def handle(message):\n    return None\n")
    assert returns_none(module.handle) is False


async def test_an_edited_file_still_publishes_what_the_running_handler_returns(module_dir: Path) -> None:
    path = module_dir / "edited_app.py"
    path.write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass

            @dataclass
            class Done:
                n: int

            async def handle(cmd):
                return Done(cmd)
            """
        )
    )
    module = importlib.import_module("edited_app")
    path.write_text(path.read_text().replace("return Done(cmd)", "return None"))
    seen: list[object] = []

    async def on_done(event: object) -> None:
        seen.append(event)

    dp = Dispatcher()
    dp.commands.bind(int, module.handle)
    dp.events.bind(module.Done, on_done)
    dp.start()
    assert await dp.execute(7) == module.Done(7)
    assert seen == [module.Done(7)]
    await dp.stop()
