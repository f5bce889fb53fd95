"""pybus next to the dispatchers a user would pick instead, measured in one run.

Run (the peers are in the `bench-peers` dependency group, which nothing installs by
default; it is not part of the test suite):

    uv run --group bench-peers python tests/benchmarks/bench_peers.py          # 200,000 iterations, 7 rounds
    uv run --group bench-peers python tests/benchmarks/bench_peers.py --quick  # 10,000 iterations, 3 rounds

`uv run --group` adds the peers to the project's .venv, where they stay. To keep them
out, run in an environment of its own:
`UV_PROJECT_ENVIRONMENT=/tmp/pybus-peers uv run --group bench-peers python tests/benchmarks/bench_peers.py`.

A peer that is not installed, or does not import on the running Python, is skipped
with the reason printed. iambus 0.2.1 imports only on CPython 3.13 (on 3.11 and 3.12 a
type alias in `iambus/core/api/typing.py` raises `TypeError: unhashable type:
'ParamSpecKwargs'`), so its line comes from a run on 3.13, where pybus and the other
peers are measured again (give uv the interpreter's path if `--python 3.13` finds none):

    UV_PROJECT_ENVIRONMENT=/tmp/pybus-peers-3.13 uv run --python 3.13 --group bench-peers \\
        python tests/benchmarks/bench_peers.py

Each peer does what pybus does, in the fastest way its own documentation shows: the
same handler bodies (which do nothing), its own message base class where it requires
one, handler classes resolved by a container that returns a ready instance (a new one
only where the handler collects events on itself). Where a peer handles events after
the caller went on (iambus, pyventus), the loop ends when the last one was handled.
Each figure is the best of the rounds (`bench_core.best_ns`), and each is followed by
the same direct loop, `await handler(msg)` on a slotted dataclass, so the ratio to it
compares across peers even when the machine is noisy. A peer whose round would take
more than `--budget` seconds runs fewer iterations (the "iterations" column). A case a
peer cannot do is "n/a", with the reason under the table.
"""

import argparse
import asyncio
import importlib
import importlib.metadata
import platform
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tests.benchmarks.bench_core import (
    Cascading,
    Cmd,
    Evt,
    Loop,
    best_ns,
    handle_cascading,
    handle_cmd,
    handle_event,
    simple_dispatcher,
)

EXECUTE_REUSED = "execute, message reused"
EXECUTE_BUILT = "execute, message built each time"
PUBLISH_ONE = "publish, 1 handler"
PUBLISH_TEN = "publish, 10 handlers"
FOLLOW_UP = "execute + 1 follow-up event"
CASES = (EXECUTE_REUSED, EXECUTE_BUILT, PUBLISH_ONE, PUBLISH_TEN, FOLLOW_UP)

# For each case, a loop running it n times, or the reason the peer cannot.
Cases = dict[str, Loop | str]
Call = Callable[[Any], Awaitable[object]]


def reusing(call: Call, message: object) -> Loop:
    async def loop(n: int) -> None:
        for _ in range(n):
            await call(message)

    return loop


def building(call: Call, make: Callable[[int], object]) -> Loop:
    async def loop(n: int) -> None:
        for i in range(n):
            await call(make(i))

    return loop


def building_by_keyword(call: Call, make: Callable[..., object]) -> Loop:
    """For message classes whose fields are keyword-only (diator's)."""

    async def loop(n: int) -> None:
        for i in range(n):
            await call(make(n=i))

    return loop


def ten_event_handlers() -> list[Callable[[Evt], Awaitable[None]]]:
    """Ten distinct functions with `handle_event`'s body (a peer may refuse one twice)."""
    handlers: list[Callable[[Evt], Awaitable[None]]] = []
    for i in range(10):

        async def on_event(event: Evt) -> None:
            return None

        on_event.__qualname__ = f"on_event_{i}"
        handlers.append(on_event)
    return handlers


def direct_cases() -> dict[str, Loop]:
    ten = ten_event_handlers()

    async def direct_ten(n: int) -> None:
        for i in range(n):
            event = Evt(i)
            for handler in ten:
                await handler(event)

    async def direct_chain(n: int) -> None:
        for i in range(n):
            await handle_event(await handle_cascading(Cascading(i)))

    return {
        EXECUTE_REUSED: reusing(handle_cmd, Cmd(0)),
        EXECUTE_BUILT: building(handle_cmd, Cmd),
        PUBLISH_ONE: building(handle_event, Evt),
        PUBLISH_TEN: direct_ten,
        FOLLOW_UP: direct_chain,
    }


class Instances:
    """A container for diator's and python-cqrs's `resolve(handler_class)` protocol: the
    instance made up front for each class in `shared`, a new one for any other (a
    handler that collects the events of one handling on itself)."""

    def __init__(self, *, shared: tuple[type, ...]) -> None:
        self.made: dict[type, object] = {cls: cls() for cls in shared}

    async def resolve(self, type_: type) -> object:
        made = self.made.get(type_)
        return made if made is not None else type_()


# --- pybus ----------------------------------------------------------------------------


def pybus_cases() -> Cases:
    one = simple_dispatcher(1)
    ten = simple_dispatcher(10)
    return {
        EXECUTE_REUSED: reusing(one.execute, Cmd(0)),
        EXECUTE_BUILT: building(one.execute, Cmd),
        PUBLISH_ONE: building(one.publish, Evt),
        PUBLISH_TEN: building(ten.publish, Evt),
        FOLLOW_UP: building(one.execute, Cascading),
    }


# --- troopy: a command bus --------------------------------------------------------------


def troopy_cases(troopy: Any) -> Cases:
    # Its own router rather than the module-global one that `@command` fills.
    router = troopy.MessageRouter()
    router.attach(Cmd, handle_cmd)
    # dispatch() calls the handler and returns what it returns: here the coroutine.
    dispatch = troopy.MessageBus(router=router).dispatch
    commands_only = "commands only: one handler per message class (a second attach raises)"
    return {
        EXECUTE_REUSED: reusing(dispatch, Cmd(0)),
        EXECUTE_BUILT: building(dispatch, Cmd),
        PUBLISH_ONE: commands_only,
        PUBLISH_TEN: commands_only,
        FOLLOW_UP: "no follow-up messages: dispatch returns the handler's return value",
    }


# --- blinker: signals -------------------------------------------------------------------


def blinker_cases(blinker: Any) -> Cases:
    # One signal per message type; the message is the sender, so a receiver gets it as
    # its argument. Strong references skip blinker's weakref lookup per receiver.
    one = blinker.Signal()
    one.connect(handle_event, weak=False)
    ten = blinker.Signal()
    for receiver in ten_event_handlers():
        ten.connect(receiver, weak=False)
    signals_only = "signals only: no single handler whose result comes back to the caller"
    return {
        EXECUTE_REUSED: signals_only,
        EXECUTE_BUILT: signals_only,
        PUBLISH_ONE: building(one.send_async, Evt),
        PUBLISH_TEN: building(ten.send_async, Evt),
        FOLLOW_UP: "no follow-ups: a receiver that sends another signal makes a nested send",
    }


# --- mediatr: a mediator for requests ---------------------------------------------------


async def mediatr_handle_cmd(cmd: Cmd) -> None:
    # mediatr keys a handler by its first parameter's annotation: a class here, since
    # this module does not postpone annotations (a string would take its slower lookup).
    return None


def mediatr_cases(mediatr: Any) -> Cases:
    mediatr.Mediator.register_handler(mediatr_handle_cmd)
    send = mediatr.Mediator().send_async
    requests_only = "requests only: mediatr 1.3 has no notifications or publish"
    return {
        EXECUTE_REUSED: reusing(send, Cmd(0)),
        EXECUTE_BUILT: building(send, Cmd),
        PUBLISH_ONE: requests_only,
        PUBLISH_TEN: requests_only,
        FOLLOW_UP: "requests only: a handler's result is only returned",
    }


# --- diator: CQRS mediator with domain events -------------------------------------------


def diator_cases(requests: Any, events: Any, mediator: Any) -> Cases:
    @dataclass(frozen=True, kw_only=True)
    class DiatorCmd(requests.Request):  # type: ignore[misc]
        n: int

    @dataclass(frozen=True, kw_only=True)
    class DiatorCascading(requests.Request):  # type: ignore[misc]
        n: int

    @dataclass(frozen=True, kw_only=True)
    class DiatorEvt(events.DomainEvent):  # type: ignore[misc]
        n: int

    class CmdHandler:
        def __init__(self) -> None:
            self.events: list[object] = []

        async def handle(self, request: DiatorCmd) -> None:
            return None

    class CascadingHandler:
        def __init__(self) -> None:
            self.events: list[object] = []

        async def handle(self, request: DiatorCascading) -> None:
            self.events.append(DiatorEvt(n=request.n))

    class OnEvent:
        async def handle(self, event: DiatorEvt) -> None:
            return None

    tenfold = [type(f"OnEvent{i}", (OnEvent,), {}) for i in range(10)]
    container = Instances(shared=(CmdHandler, OnEvent, *tenfold))
    request_map = requests.RequestMap()
    request_map.bind(DiatorCmd, CmdHandler)
    request_map.bind(DiatorCascading, CascadingHandler)
    one_map, ten_map = events.EventMap(), events.EventMap()
    one_map.bind(DiatorEvt, OnEvent)
    for handler in tenfold:
        ten_map.bind(DiatorEvt, handler)
    send = mediator.Mediator(
        request_map=request_map,
        container=container,
        event_emitter=events.EventEmitter(event_map=one_map, container=container),
    ).send
    return {
        EXECUTE_REUSED: reusing(send, DiatorCmd(n=0)),
        # A diator Request draws a uuid4 for its request_id: part of building one.
        EXECUTE_BUILT: building_by_keyword(send, DiatorCmd),
        PUBLISH_ONE: building_by_keyword(events.EventEmitter(one_map, container).emit, DiatorEvt),
        PUBLISH_TEN: building_by_keyword(events.EventEmitter(ten_map, container).emit, DiatorEvt),
        FOLLOW_UP: building_by_keyword(send, DiatorCascading),
    }


# --- python-cqrs: CQRS framework (mediators, events, outbox, sagas) ---------------------


def cqrs_cases(cqrs: Any) -> Cases:
    class CqrsCmd(cqrs.Request):  # type: ignore[misc]
        n: int

    class CqrsCascading(cqrs.Request):  # type: ignore[misc]
        n: int

    class CqrsEvt(cqrs.DomainEvent):  # type: ignore[misc]
        n: int

    class CmdHandler(cqrs.RequestHandler[CqrsCmd, None]):  # type: ignore[misc]
        async def handle(self, request: CqrsCmd) -> None:
            return None

    class CascadingHandler(cqrs.RequestHandler[CqrsCascading, None]):  # type: ignore[misc]
        def __init__(self) -> None:
            self._events: list[object] = []

        @property
        def events(self) -> list[object]:
            return self._events

        async def handle(self, request: CqrsCascading) -> None:
            self._events.append(CqrsEvt(request.n))

    class OnEvent(cqrs.EventHandler[CqrsEvt]):  # type: ignore[misc]
        async def handle(self, event: CqrsEvt) -> None:
            return None

    tenfold = [type(f"OnEvent{i}", (OnEvent,), {}) for i in range(10)]
    container = Instances(shared=(CmdHandler, OnEvent, *tenfold))
    request_map = cqrs.RequestMap()
    request_map.bind(CqrsCmd, CmdHandler)
    request_map.bind(CqrsCascading, CascadingHandler)
    one_map, ten_map = cqrs.EventMap(), cqrs.EventMap()
    one_map.bind(CqrsEvt, OnEvent)
    for handler in tenfold:
        ten_map.bind(CqrsEvt, handler)
    # Built by hand rather than by cqrs.bootstrap, which adds a logging middleware;
    # follow-up events handled one after another, not in a task each.
    send = cqrs.RequestMediator(
        request_map=request_map,
        container=container,
        event_emitter=cqrs.EventEmitter(event_map=one_map, container=container),
        event_map=one_map,
        concurrent_event_handle_enable=False,
    ).send
    return {
        EXECUTE_REUSED: reusing(send, CqrsCmd(0)),
        EXECUTE_BUILT: building(send, CqrsCmd),
        PUBLISH_ONE: building(cqrs.EventMediator(event_map=one_map, container=container).send, CqrsEvt),
        PUBLISH_TEN: building(cqrs.EventMediator(event_map=ten_map, container=container).send, CqrsEvt),
        FOLLOW_UP: building(send, CqrsCascading),
    }


# --- iambus: queued message bus ---------------------------------------------------------


class Countdown:
    """Counts handlings of events that are handled after the caller went on, and wakes
    `wait` when the expected number were."""

    def __init__(self) -> None:
        self.left = 0
        self.done = asyncio.Event()

    def expect(self, count: int) -> None:
        self.left = count
        self.done.clear()

    def handled(self) -> None:
        self.left -= 1
        if not self.left:
            self.done.set()

    async def wait(self) -> None:
        await self.done.wait()


def iambus_cases(iambus: Any) -> Cases:
    countdown = Countdown()

    def counting() -> Callable[[Evt], Awaitable[None]]:
        async def on_event(event: Evt) -> None:
            countdown.handled()

        return on_event

    def dispatcher() -> Any:
        # Signal handlers would be the loop's; a benchmark should not install them.
        return iambus.Dispatcher(listen_for_signals=False)

    commands = dispatcher()
    commands.commands.bind(Cmd, handle_cmd)
    # A returned Evt is a follow-up; iambus sends it from a task of its own, later.
    commands.commands.bind(Cascading, handle_cascading, response_event=Evt)
    commands.events.bind(Evt, counting())
    one, ten = dispatcher(), dispatcher()
    one.events.bind(Evt, counting())
    for _ in range(10):
        ten.events.bind(Evt, counting())
    for started in (commands, one, ten):
        started.start()
    # A command's caller waits for its result (wait_for_response=True, as iambus's
    # README shows for commands); an event's caller goes on once it is queued.
    execute = commands.commands.handle

    async def execute_reused(n: int) -> None:
        cmd = Cmd(0)
        for _ in range(n):
            await execute(cmd, wait_for_response=True)

    async def execute_built(n: int) -> None:
        for i in range(n):
            await execute(Cmd(i), wait_for_response=True)

    def publishing(router: Any, handlers: int) -> Loop:
        publish = router.handle

        async def loop(n: int) -> None:
            countdown.expect(n * handlers)
            for i in range(n):
                await publish(Evt(i))
            await countdown.wait()

        return loop

    async def follow_up(n: int) -> None:
        countdown.expect(n)
        for i in range(n):
            await execute(Cascading(i), wait_for_response=True)
        await countdown.wait()

    return {
        EXECUTE_REUSED: execute_reused,
        EXECUTE_BUILT: execute_built,
        PUBLISH_ONE: publishing(one.events, 1),
        PUBLISH_TEN: publishing(ten.events, 10),
        FOLLOW_UP: follow_up,
    }


# --- pyventus: event emitters ----------------------------------------------------------


def pyventus_cases(events: Any) -> Cases:
    countdown = Countdown()

    def counting() -> Callable[[Evt], Awaitable[None]]:
        async def on_event(event: Evt) -> None:
            countdown.handled()

        return on_event

    # Each EventLinker subclass is a registry of its own (EventLinker itself is global).
    class OneLinker(events.EventLinker):  # type: ignore[misc]
        pass

    class TenLinker(events.EventLinker):  # type: ignore[misc]
        pass

    OneLinker.subscribe(Evt, event_callback=counting())
    for _ in range(10):
        TenLinker.subscribe(Evt, event_callback=counting())

    def publishing(linker: type, handlers: int) -> Loop:
        # emit() returns at once and runs the subscribers in a task per emission; the
        # loop ends when all were handled. debug=False: left to None, pyventus turns its
        # debug logging on whenever a tracer or profiler is attached.
        emit = events.AsyncIOEventEmitter(event_linker=linker, debug=False).emit

        async def loop(n: int) -> None:
            countdown.expect(n * handlers)
            for i in range(n):
                emit(Evt(i))
            await countdown.wait()

        return loop

    events_only = "events only: emit() returns nothing and runs the subscribers in a background task"
    return {
        EXECUTE_REUSED: events_only,
        EXECUTE_BUILT: events_only,
        PUBLISH_ONE: publishing(OneLinker, 1),
        PUBLISH_TEN: publishing(TenLinker, 10),
        FOLLOW_UP: "no follow-ups: a subscriber that emits another event starts another task",
    }


@dataclass(frozen=True)
class Peer:
    distribution: str
    modules: tuple[str, ...]
    build: Callable[..., Cases]


PEERS = (
    Peer("pybus-cqrs", (), pybus_cases),
    Peer("troopy", ("troopy",), troopy_cases),
    Peer("blinker", ("blinker",), blinker_cases),
    Peer("mediatr", ("mediatr",), mediatr_cases),
    Peer("diator", ("diator.requests", "diator.events", "diator.mediator"), diator_cases),
    Peer("python-cqrs", ("cqrs",), cqrs_cases),
    Peer("pyventus", ("pyventus.events",), pyventus_cases),
    Peer("iambus", ("iambus",), iambus_cases),
)


def load(peer: Peer) -> tuple[str, Cases | str]:
    """The peer's name with its version, and its cases or why it is skipped."""
    try:
        name = f"{peer.distribution} {importlib.metadata.version(peer.distribution)}"
    except importlib.metadata.PackageNotFoundError:
        return peer.distribution, "not installed: run with `uv run --group bench-peers`"
    try:
        modules = [importlib.import_module(module) for module in peer.modules]
    except Exception as exc:
        python = f"{platform.python_implementation()} {platform.python_version()}"
        return name, f"does not import on {python}: {type(exc).__name__}: {exc}"
    return name, peer.build(*modules)


async def within(budget: float, loop: Loop, iterations: int) -> int:
    """`iterations`, or fewer (not under 1,000) if a round of the loop would take more
    than `budget` seconds of this thread's CPU time: the slowest peers take 100 to 1,000
    times as long as pybus."""
    await loop(1_000)  # warm up, then time 1,000 more
    start = time.thread_time_ns()
    await loop(1_000)
    per_iteration = (time.thread_time_ns() - start) / 1_000
    return max(1_000, min(iterations, int(budget * 1e9 / per_iteration)))


async def run(iterations: int, rounds: int, budget: float, only: set[str]) -> None:
    direct = direct_cases()
    peers: list[tuple[str, Cases]] = []
    for peer in PEERS:
        if only and peer.distribution not in only:
            continue
        name, cases = load(peer)
        if isinstance(cases, str):
            print(f"skipped {name}: {cases}")
        else:
            peers.append((name, cases))
    python = f"{platform.python_implementation()} {platform.python_version()}"
    print(f"{python}; best of {rounds} rounds of {iterations:,} iterations (fewer past {budget} s a round)\n")

    rows: list[tuple[str, str, float, float, int] | tuple[str, str, str]] = []
    for case in CASES:
        # The peers take turns within a case, so a slow spell of the machine falls on
        # several of them rather than on one.
        for name, cases in peers:
            loop = cases[case]
            if isinstance(loop, str):
                rows.append((case, name, loop))
                continue
            count = await within(budget, loop, iterations)
            ns = await best_ns(loop, count, rounds)
            base = await best_ns(direct[case], iterations, rounds)
            rows.append((case, name, ns, base, count))

    print("| case | dispatcher | ns/msg | msg/s | direct ns/msg | ratio | iterations |")
    print("|---|---|---:|---:|---:|---:|---:|")
    previous = ""
    for row in rows:
        case = row[0] if row[0] != previous else ""
        previous = row[0]
        if len(row) == 3:
            print(f"| {case} | {row[1]} | n/a | | | | |")
        else:
            _, name, ns, base, count = row
            figures = f"{ns:,.0f} | {1e9 / ns:,.0f} | {base:,.0f} | {ns / base:.2f}x | {count:,}"
            print(f"| {case} | {name} | {figures} |")
    print()
    for row in rows:
        if len(row) == 3:
            print(f"- n/a, {row[1]}, {row[0]}: {row[2]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="10,000 iterations, 3 rounds")
    parser.add_argument(
        "--budget",
        type=float,
        default=0.3,
        metavar="SECONDS",
        help="fewer iterations for a peer whose round would take longer than this (default 0.3)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="DISTRIBUTION",
        help="measure only this one (repeat for more), e.g. --only pybus-cqrs --only troopy",
    )
    args = parser.parse_args()
    iterations, rounds = (10_000, 3) if args.quick else (args.iterations, args.rounds)
    asyncio.run(run(iterations, rounds, args.budget, set(args.only)))


if __name__ == "__main__":
    main()
