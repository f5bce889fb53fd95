"""Core dispatch overhead, next to the direct `await handler(msg)` it replaces.

Run: `uv run python tests/benchmarks/bench_core.py` (add `--quick` for a short run).

Every line builds a new message per iteration on both sides, so the ratio is
what a user sees for "construct and dispatch" against "construct and call"
(except "message reused", which sends one message again and again on both sides).
Each figure is the best of several rounds, to keep the machine's noise out, and
is the CPU time of the thread (`time.thread_time_ns`), not the wall clock: the
loops never wait, and on a shared machine the wall clock also counts the time
other processes held the core.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass

from pybus import CallNext, Dispatcher, EventCollector, Factory, HandlingContext, Middleware, Retry, Singleton


@dataclass(slots=True)
class Cmd:
    n: int


@dataclass(slots=True)
class Qry:
    n: int


@dataclass(slots=True)
class Evt:
    n: int


@dataclass(slots=True)
class Cascading:
    n: int


async def handle_cmd(cmd: Cmd) -> None:
    return None


async def handle_query(query: Qry) -> int:
    return query.n


async def handle_event(event: Evt) -> None:
    return None


async def handle_cascading(cmd: Cascading) -> Evt:
    return Evt(cmd.n)


@dataclass(slots=True)
class Injected:
    n: int


async def handle_injected(cmd: Injected, repo: object) -> None:
    return None


REPO = object()


def make_repo() -> object:
    return REPO


def repo_scope() -> Generator[object, None, None]:
    """A Factory with a teardown: the code after `yield` runs after each handling."""
    yield REPO


@dataclass(slots=True)
class Collect:
    n: int


class Collecting(EventCollector):
    """A class handler that collects its follow-up event instead of returning it."""

    async def handle(self, cmd: Collect) -> None:
        self.add_event(Evt(cmd.n))


def injected_dispatcher(repo: object) -> Dispatcher:
    dp = Dispatcher()
    dp.commands.bind(Injected, handle_injected, repo=repo)
    dp.start()
    return dp


Loop = Callable[[int], Awaitable[None]]


async def best_ns(loop: Loop, iterations: int, rounds: int) -> float:
    """Best time per iteration over `rounds` runs of `loop(iterations)`, in ns."""
    await loop(min(iterations, 1_000))  # warm caches and code paths
    best = float("inf")
    for _ in range(rounds):
        start = time.thread_time_ns()
        await loop(iterations)
        best = min(best, (time.thread_time_ns() - start) / iterations)
    return best


def simple_dispatcher(event_handlers: int) -> Dispatcher:
    dp = Dispatcher()
    dp.commands.bind(Cmd, handle_cmd)
    dp.queries.bind(Qry, handle_query)
    dp.commands.bind(Cascading, handle_cascading)
    dp.commands.bind(Collect, Collecting)
    for i in range(event_handlers):
        # Distinct function objects: the same one twice is refused as a duplicate.
        async def on_event(event: Evt) -> None:
            return None

        on_event.__qualname__ = f"on_event_{i}"
        dp.events.bind(Evt, on_event)
    dp.start()
    return dp


async def pass_through(message: object, call_next: CallNext) -> object:
    return await call_next(message)


def middleware_dispatcher(middleware: list[Middleware]) -> Dispatcher:
    """`execute(Cmd)` wrapped in dispatcher-wide `middleware`."""
    dp = Dispatcher(middleware=middleware)
    dp.commands.bind(Cmd, handle_cmd)
    dp.start()
    return dp


def crowded_dispatcher(types: int) -> tuple[Dispatcher, type]:
    """A dispatcher with `types` command classes; returns it and one class from the middle."""
    dp = Dispatcher()
    classes = [type(f"Cmd{i}", (), {"__slots__": ("n",), "__init__": _init}) for i in range(types)]
    for cls in classes:
        dp.commands.bind(cls, handle_cmd)
    dp.start()
    return dp, classes[types // 2]


@dataclass(slots=True)
class Audited:
    n: int


async def audit(event: Audited, context: HandlingContext) -> None:
    return None


async def handle_cmd_in_context(cmd: Cmd, context: HandlingContext) -> None:
    return None


def tracked_dispatcher(*, retry: Retry | None = None, takes_context: bool = False) -> Dispatcher:
    """`execute(Cmd)` in an app whose tracking is on because one handler elsewhere takes a
    `HandlingContext` (or, with `takes_context`, this one does)."""
    dp = Dispatcher(retry=retry)
    dp.commands.bind(Cmd, handle_cmd_in_context if takes_context else handle_cmd)
    dp.events.bind(Audited, audit)
    dp.start()
    assert dp.tracks_context
    return dp


def instrumented_dispatcher(*, sdk: bool = True) -> Dispatcher:
    """`execute(Cmd)` instrumented by `pybus.otel`. With `sdk`: to an SDK TracerProvider
    without span processors (every span is built, timed and ended; nothing is exported)
    and an SDK MeterProvider with an in-memory reader that is never read (every
    measurement aggregated). Without: to the API's no-op providers, which leaves
    pybus's own share of the cost."""
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider

    from pybus.otel import instrument

    dp = Dispatcher()
    dp.commands.bind(Cmd, handle_cmd)
    if sdk:
        meters = MeterProvider(metric_readers=[InMemoryMetricReader()])
        instrument(dp, tracer_provider=TracerProvider(), meter_provider=meters)
    else:
        instrument(dp, tracer_provider=trace.NoOpTracerProvider(), meter_provider=metrics.NoOpMeterProvider())
    dp.start()
    return dp


def _init(self: object, n: int) -> None:
    self.n = n  # type: ignore[attr-defined]


async def run(iterations: int, rounds: int) -> list[tuple[str, float, float]]:
    rows: list[tuple[str, float, float]] = []
    ten = [simple_dispatcher(10).events.handlers[Evt][i].target for i in range(10)]

    async def direct_cmd(n: int) -> None:
        for i in range(n):
            await handle_cmd(Cmd(i))

    async def direct_query(n: int) -> None:
        for i in range(n):
            await handle_query(Qry(i))

    async def direct_event(n: int) -> None:
        for i in range(n):
            await handle_event(Evt(i))

    async def direct_ten(n: int) -> None:
        handlers = ten
        for i in range(n):
            event = Evt(i)
            for handler in handlers:
                await handler(event)  # type: ignore[operator]

    async def direct_injected(n: int) -> None:
        for i in range(n):
            await handle_injected(Injected(i), repo=REPO)

    async def direct_cascade(n: int) -> None:
        for i in range(n):
            event = await handle_cascading(Cascading(i))
            await handle_event(event)

    reused_cmd = Cmd(0)

    async def direct_reused(n: int) -> None:
        cmd = reused_cmd
        for _ in range(n):
            await handle_cmd(cmd)

    async def direct_collected(n: int) -> None:
        for i in range(n):
            handler = Collecting()
            await handler.handle(Collect(i))
            for event in handler.dump_events():
                await handle_event(event)  # type: ignore[arg-type]

    one = simple_dispatcher(1)
    tenfold = simple_dispatcher(10)
    crowded, crowded_cls = crowded_dispatcher(10_000)
    small, small_cls = crowded_dispatcher(1)

    async def via_execute(n: int) -> None:
        execute = one.execute
        for i in range(n):
            await execute(Cmd(i))

    async def via_reused(n: int) -> None:
        execute, cmd = one.execute, reused_cmd
        for _ in range(n):
            await execute(cmd)

    async def via_collected(n: int) -> None:
        execute = one.execute
        for i in range(n):
            await execute(Collect(i))

    async def via_query(n: int) -> None:
        query = one.query
        for i in range(n):
            await query(Qry(i))

    async def via_publish_one(n: int) -> None:
        publish = one.publish
        for i in range(n):
            await publish(Evt(i))

    async def via_publish_ten(n: int) -> None:
        publish = tenfold.publish
        for i in range(n):
            await publish(Evt(i))

    async def via_cascade(n: int) -> None:
        execute = one.execute
        for i in range(n):
            await execute(Cascading(i))

    async def via_crowded(n: int) -> None:
        execute, cls = crowded.execute, crowded_cls
        for i in range(n):
            await execute(cls(i))

    async def via_small(n: int) -> None:
        execute, cls = small.execute, small_cls
        for i in range(n):
            await execute(cls(i))

    def executing(dp: Dispatcher, cls: type[Cmd | Injected]) -> Loop:
        async def loop(n: int) -> None:
            execute = dp.execute
            for i in range(n):
                await execute(cls(i))

        return loop

    plain_kwarg = injected_dispatcher(REPO)
    singleton_kwarg = injected_dispatcher(Singleton(make_repo))
    factory_kwarg = injected_dispatcher(Factory(make_repo))
    generator_kwarg = injected_dispatcher(Factory(repo_scope))

    pairs: list[tuple[str, Loop, Loop]] = [
        ("execute", via_execute, direct_cmd),
        ("execute, message reused", via_reused, direct_reused),
        ("query", via_query, direct_query),
        ("publish, 1 handler", via_publish_one, direct_event),
        ("publish, 10 handlers", via_publish_ten, direct_ten),
        ("execute + 1 follow-up event", via_cascade, direct_cascade),
        ("execute, class handler + 1 collected event", via_collected, direct_collected),
        ("execute, 1 registered type", via_small, direct_cmd),
        ("execute, 10,000 registered types", via_crowded, direct_cmd),
        ("execute, plain bound kwarg", executing(plain_kwarg, Injected), direct_injected),
        ("execute, Singleton kwarg (resolved)", executing(singleton_kwarg, Injected), direct_injected),
        ("execute, Factory kwarg", executing(factory_kwarg, Injected), direct_injected),
        ("execute, Factory generator kwarg", executing(generator_kwarg, Injected), direct_injected),
        (
            "execute, 1 pass-through middleware",
            executing(middleware_dispatcher([pass_through]), Cmd),
            direct_cmd,
        ),
        (
            "execute, 3 pass-through middleware",
            executing(middleware_dispatcher([pass_through] * 3), Cmd),
            direct_cmd,
        ),
        ("execute, tracking on", executing(tracked_dispatcher(), Cmd), direct_cmd),
        (
            "execute, tracking on, Retry never fires",
            executing(tracked_dispatcher(retry=Retry(attempts=3)), Cmd),
            direct_cmd,
        ),
        (
            "execute, handler takes HandlingContext",
            executing(tracked_dispatcher(takes_context=True), Cmd),
            direct_cmd,
        ),
        ("execute, OpenTelemetry instrumented", executing(instrumented_dispatcher(), Cmd), direct_cmd),
        (
            "execute, OpenTelemetry, no-op providers",
            executing(instrumented_dispatcher(sdk=False), Cmd),
            direct_cmd,
        ),
    ]
    for name, via, direct in pairs:
        ns = await best_ns(via, iterations, rounds)
        base = await best_ns(direct, iterations, rounds)
        rows.append((name, ns, base))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="10,000 iterations, 3 rounds")
    args = parser.parse_args()
    iterations, rounds = (10_000, 3) if args.quick else (args.iterations, args.rounds)
    rows = asyncio.run(run(iterations, rounds))
    print(f"{'case':<38} {'pybus ns/msg':>13} {'direct ns/msg':>14} {'ratio':>7} {'msg/s':>11}")
    for name, ns, base in rows:
        print(f"{name:<38} {ns:>13.0f} {base:>14.0f} {ns / base:>6.2f}x {1e9 / ns:>11,.0f}")
    by_name = {name: value for name, value, _ in rows}
    print()
    bound = by_name["execute, plain bound kwarg"]
    print(
        f"a Factory, over a bound value:    {by_name['execute, Factory kwarg'] - bound:+6.0f} ns per execute"
    )
    teardown = by_name["execute, Factory generator kwarg"] - bound
    print(f"a generator Factory, over bound:  {teardown:+6.0f} ns per execute")
    tracking = by_name["execute, tracking on"] - by_name["execute"]
    print(f"tracking on, over off:           {tracking:+6.0f} ns per execute")
    retry = by_name["execute, tracking on, Retry never fires"] - by_name["execute, tracking on"]
    print(f"a Retry that never fires:        {retry:+6.0f} ns per execute (over tracking on)")
    context = by_name["execute, handler takes HandlingContext"] - by_name["execute, tracking on"]
    print(f"a HandlingContext parameter:     {context:+6.0f} ns per execute (over tracking on)")
    otel = by_name["execute, OpenTelemetry instrumented"] - by_name["execute, tracking on"]
    print(f"OpenTelemetry (pybus.otel):      {otel:+6.0f} ns per execute (over tracking on)")
    own = by_name["execute, OpenTelemetry, no-op providers"] - by_name["execute, tracking on"]
    print(f"  of which pybus.otel's own share: {own:+6.0f} ns (no-op providers; the rest is the SDK)")


if __name__ == "__main__":
    main()
