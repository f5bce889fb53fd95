"""Where the nanoseconds go: each hot path rebuilt one step at a time, in one run.

Run: `uv run python tests/benchmarks/bench_anatomy.py` (`--quick` for a short run).

Every line is a loop of `await step(message)` with a new message per iteration, as in
`bench_core.py`, timed as the CPU time of the thread, best of rounds. Each step is the
previous one plus one thing the engines do, written the way the engines write it; the
difference to the previous line is that thing's cost. The last line of each path is the
real call, so the steps can be checked to add up. The tables in docs/benchmarks.md
("Where the nanoseconds go") come from this script.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pybus import Factory
from pybus.providers import enter_generator, leave_generator
from tests.benchmarks.bench_core import (
    REPO,
    Cascading,
    Cmd,
    Collect,
    Collecting,
    Evt,
    Injected,
    best_ns,
    handle_cascading,
    handle_cmd,
    handle_event,
    handle_injected,
    injected_dispatcher,
    make_repo,
    repo_scope,
    simple_dispatcher,
)

Step = Callable[[Any], Awaitable[Any]]


@dataclass
class Path:
    name: str
    message: Callable[[int], object]
    #: Each step adds one thing to the one before; a name in parentheses is a reference
    #: line, compared with the first line and left out of the chain.
    steps: list[tuple[str, Step]]


def loop_of(step: Step, make: Callable[[int], object]) -> Callable[[int], Awaitable[None]]:
    async def loop(n: int) -> None:
        for i in range(n):
            await step(make(i))

    return loop


Handler = Callable[[Any], Awaitable[Any]]
TABLE: dict[type, Handler] = {Cmd: handle_cmd, Evt: handle_event, Cascading: handle_cascading}
ONE: dict[type, Any] = {Evt: handle_event}
TUPLES: dict[type, tuple[Handler, ...]] = {Evt: (handle_event,)}


def plain_call(message: Any) -> Any:
    """A plain function in front of the handler (the sync `handle` that hands it over)."""
    return handle_cmd(message)


def plain_lookup(message: Any) -> Any:
    handler = TABLE.get(message.__class__)
    return handler(message)  # type: ignore[misc]


def plain_lookup_timeout(message: Any, timeout: float | None = None) -> Any:
    if timeout is None:
        handler = TABLE.get(message.__class__)
        if handler is not None:
            return handler(message)
    raise AssertionError


async def wrapper(message: Any) -> Any:
    """A coroutine of our own around the handler's."""
    return await handle_event(message)


async def wrapper_lookup(message: Any) -> Any:
    handler = ONE.get(message.__class__)
    return await handler(message)  # type: ignore[misc]


async def wrapper_loop(message: Any) -> Any:
    for handler in TUPLES[message.__class__]:
        await handler(message)


async def wrapper_lookup_checks(message: Any, timeout: float | None = None) -> None:
    if timeout is not None:
        raise AssertionError
    invokes = ONE.get(message.__class__)
    if invokes is None:
        raise AssertionError
    if invokes.__class__ is not tuple:
        try:
            result = await invokes(message)
        except Exception:
            raise
        if result is None:
            return


async def chain_wrapper(message: Any) -> Any:
    result = await handle_cascading(message)
    await handle_event(result)
    return result


WANTED: dict[type, Handler] = {Evt: handle_event}


async def chain_lookups(message: Any) -> Any:
    invoke = TABLE.get(message.__class__)
    result = await invoke(message)  # type: ignore[misc]
    invokes = WANTED.get(result.__class__)
    await invokes(result)  # type: ignore[misc]
    return result


def chain_in_front(message: Any) -> Any:
    """The plain function of a dispatcher whose other commands are handed over."""
    invoke = NONE.get(message.__class__)
    if invoke is not None:
        raise AssertionError
    return chain_lookups(message)


NONE: dict[type, Handler] = {Cmd: handle_cmd}


def factory_call(message: Any) -> Any:
    return handle_injected(message, repo=make_repo())


def factory_call_positional(message: Any) -> Any:
    return handle_injected(message, make_repo())


SCOPE = Factory(repo_scope)


async def generator_with(message: Any) -> None:
    scope = repo_scope()
    repo = enter_generator(SCOPE, scope)
    try:
        await handle_injected(message, repo)
    except BaseException as exc:
        leave_generator(SCOPE, scope, exc)
        raise
    leave_generator(SCOPE, scope, None)


async def generator_bare(message: Any) -> None:
    scope: Iterator[object] = repo_scope()
    repo = next(scope)
    await handle_injected(message, repo)
    for _ in scope:
        break


async def collected_by_hand(message: Any) -> None:
    handler = Collecting()
    await handler.handle(message)
    for event in handler.dump_events():
        await handle_event(event)  # type: ignore[arg-type]


async def collected_wrapped(message: Any) -> None:
    collected: list[Any] = []
    handler = Collecting()
    await handler.handle(message)
    events = handler.dump_events()
    collected.extend(events)
    await handle_event(collected[0])


def paths() -> list[Path]:
    one = simple_dispatcher(1)
    factory = injected_dispatcher(Factory(make_repo))
    generator = injected_dispatcher(Factory(repo_scope))
    bound = injected_dispatcher(REPO)
    return [
        Path(
            "execute (a handler proven to return None, handed over)",
            Cmd,
            [
                ("await handler(msg)", handle_cmd),
                ("+ a plain function in front", plain_call),
                ("+ a dict lookup on the class", plain_lookup),
                ("+ the timeout and miss checks", plain_lookup_timeout),
                ("dp.execute (all of it)", one.execute),
            ],
        ),
        Path(
            "publish, 1 handler",
            Evt,
            [
                ("await handler(msg)", handle_event),
                ("+ a coroutine of our own", wrapper),
                ("+ a dict lookup", wrapper_lookup),
                ("+ the checks (timeout, miss, one handler, result)", wrapper_lookup_checks),
                ("(a loop over a 1-tuple, without the checks)", wrapper_loop),
                ("dp.publish (all of it)", one.publish),
            ],
        ),
        Path(
            "execute + 1 returned follow-up event",
            Cascading,
            [
                ("a coroutine awaiting handler(msg), then on_event(result)", chain_wrapper),
                ("+ two dict lookups (handler, follow-up)", chain_lookups),
                ("+ a plain function in front (the dispatcher hands others over)", chain_in_front),
                ("dp.execute (all of it)", one.execute),
            ],
        ),
        Path(
            "Factory kwarg (plain function)",
            Injected,
            [
                ("await handler(msg, repo=REPO)", lambda m: handle_injected(m, repo=REPO)),
                ("(dp.execute with a bound value)", bound.execute),
                ("+ a function calling the factory, by keyword", factory_call),
                ("(the same, by position)", factory_call_positional),
                ("dp.execute, Factory (all of it)", factory.execute),
            ],
        ),
        Path(
            "Factory kwarg (generator with teardown)",
            Injected,
            [
                ("await handler(msg, repo=REPO)", lambda m: handle_injected(m, repo=REPO)),
                ("+ generator made, entered, ended by hand", generator_bare),
                ("+ pybus's enter and leave (notes, checks)", generator_with),
                ("dp.execute, generator Factory (all of it)", generator.execute),
            ],
        ),
        Path(
            "class handler + 1 collected event",
            Collect,
            [
                ("by hand: make, handle, dump, publish", collected_by_hand),
                ("+ a list of follow-ups", collected_wrapped),
                ("dp.execute (all of it)", one.execute),
            ],
        ),
    ]


async def run(iterations: int, rounds: int) -> None:
    for path in paths():
        print(f"\n{path.name}")
        print(f"  {'step':<66} {'ns/msg':>8} {'added':>8}")
        first: float | None = None
        previous: float | None = None
        for name, step in path.steps:
            ns = await best_ns(loop_of(step, path.message), iterations, rounds)
            if first is None:
                added = ""
                first = previous = ns
            elif name.startswith("("):
                added = f"{ns - first:+8.0f} on the first"
            else:
                assert previous is not None
                added = f"{ns - previous:+8.0f}"
                previous = ns
            print(f"  {name:<66} {ns:>8.0f} {added}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="20,000 iterations, 3 rounds")
    args = parser.parse_args()
    iterations, rounds = (20_000, 3) if args.quick else (args.iterations, args.rounds)
    asyncio.run(run(iterations, rounds))


if __name__ == "__main__":
    main()
