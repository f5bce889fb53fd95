"""What it would cost to make the current handling visible inside every handler.

Run: `uv run python tests/benchmarks/bench_context_cost.py`

Issue 5 asks for `current_context()` in every handler while `execute` stays
within 2.0x of a direct await. This script measures, in one run, a direct
`await handler(Cmd(i))`, a dispatch shaped like pybus's fast path (one
coroutine frame, a dict lookup, a None check), and that same dispatch with
each way of publishing the current handling to code running inside it.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from asyncio import current_task
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Cmd:
    n: int


async def handler(cmd: Cmd) -> None:
    return None


FAST: dict[type, Callable[[Any], Awaitable[Any]]] = {Cmd: handler}
INFO = ("command", Cmd, "handler")
CURRENT: contextvars.ContextVar[Any] = contextvars.ContextVar("current", default=None)
STACKS: dict[object, list[Any]] = {}


class Stack(list[Any]):
    __slots__ = ("task",)
    task: object


async def plain(message: Any) -> Any:
    result = await FAST[message.__class__](message)
    if result is not None:
        pass
    return result


async def contextvar_with_parent(message: Any) -> Any:
    invoke = FAST[message.__class__]
    token = CURRENT.set((INFO, message, CURRENT.get()))
    try:
        result = await invoke(message)
    finally:
        CURRENT.reset(token)
    return result


async def contextvar_only(message: Any) -> Any:
    invoke = FAST[message.__class__]
    token = CURRENT.set((INFO, message))
    result = await invoke(message)
    CURRENT.reset(token)
    return result


async def stack_per_task(message: Any) -> Any:
    invoke = FAST[message.__class__]
    stack = CURRENT.get()
    if stack is None or stack.task is not current_task():
        stack = Stack()
        stack.task = current_task()
        CURRENT.set(stack)
    stack.append((INFO, message))
    try:
        result = await invoke(message)
    finally:
        stack.pop()
    return result


async def dict_by_task(message: Any) -> Any:
    invoke = FAST[message.__class__]
    task = current_task()
    stack = STACKS.get(task)
    if stack is None:
        stack = STACKS[task] = []
    stack.append((INFO, message))
    try:
        result = await invoke(message)
    finally:
        stack.pop()
    return result


async def best(dispatch: Callable[[Any], Awaitable[Any]] | None, count: int, rounds: int) -> float:
    async def loop() -> None:
        if dispatch is None:
            for i in range(count):
                await handler(Cmd(i))
        else:
            for i in range(count):
                await dispatch(Cmd(i))

    fastest = float("inf")
    for _ in range(rounds):
        start = time.perf_counter_ns()
        await loop()
        fastest = min(fastest, (time.perf_counter_ns() - start) / count)
    return fastest


async def main(count: int = 300_000, rounds: int = 5) -> None:
    cases: list[tuple[str, Callable[[Any], Awaitable[Any]] | None]] = [
        ("direct await handler(msg)", None),
        ("dispatch, no context", plain),
        ("dispatch + ContextVar set/reset, parent", contextvar_with_parent),
        ("dispatch + ContextVar set/reset", contextvar_only),
        ("dispatch + per-task stack", stack_per_task),
        ("dispatch + dict keyed by task", dict_by_task),
    ]
    direct = await best(None, count, rounds)
    print(f"{'case':<42} {'ns/msg':>7} {'vs direct':>10}")
    for name, dispatch in cases:
        ns = direct if dispatch is None else await best(dispatch, count, rounds)
        print(f"{name:<42} {ns:>7.0f} {ns / direct:>9.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
