"""Background send throughput and memory, next to a bare asyncio.Queue in the same run.

Run: `uv run python tests/benchmarks/bench_workers.py` (add `--quick` for a short run).

Throughput: N messages sent with `await dp.events.send(...)`, timed until
`dp.join()` returns, with 1 and 4 workers (4 is the default); the baseline is an
`asyncio.Queue` of the same capacity drained by one task that awaits the same
handler. The cases take turns within each round, so that a machine whose load
changes during the run slows them alike; each case's figure is its best round.
`--clock cpu` times with the thread's CPU time instead of the wall clock: on a
machine shared with other work, the time the process waited for a core is then
left out.

`--profile` adds where the time goes: 10,000 messages sent into an empty queue
(the sender never waits, so the lanes run only after it), timed while sending
and while the workers handle them, the share of the garbage collector in a
whole run, and the steps a message takes, each timed alone (timeit, best of 7):
the first step of a handling as the lanes ran it before (`start_in`, a frame and
a `StopIteration` per message) and as they run it now (`handlings`).

Memory: resident set size before and after 1,000,000 messages (after a warm-up),
read from /proc/self/statm.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import gc
import os
import time
import timeit
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from threading import get_ident
from typing import Any

from pybus import Dispatcher
from pybus.lanes import InContext, handlings, running_in

CAPACITY = 10_000
clock = time.perf_counter


@dataclass(slots=True)
class Tick:
    n: int


async def on_tick(event: Tick) -> None:
    return None


async def bare_queue(count: int) -> float:
    queue: asyncio.Queue[Tick] = asyncio.Queue(CAPACITY)

    async def worker() -> None:
        while True:
            item = await queue.get()
            await on_tick(item)
            queue.task_done()

    task = asyncio.create_task(worker())
    start = clock()
    for i in range(count):
        await queue.put(Tick(i))
    await queue.join()
    elapsed = clock() - start
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return count / elapsed


async def task_per_message(count: int) -> float:
    """What pybus's lanes replace: a task per message, each in a copy of the sender's context
    (`asyncio.create_task(coro, context=ctx)`), at most CAPACITY at a time."""
    loop = asyncio.get_running_loop()
    room = asyncio.Semaphore(CAPACITY)
    done = asyncio.Event()
    finished = 0

    def finish(task: asyncio.Task[None]) -> None:
        nonlocal finished
        room.release()
        finished += 1
        if finished == count:
            done.set()

    start = clock()
    for i in range(count):
        await room.acquire()
        task = loop.create_task(on_tick(Tick(i)), context=contextvars.copy_context())
        task.add_done_callback(finish)
    await done.wait()
    return count / (clock() - start)


async def pybus_send(count: int, workers: int, keys: int = 0) -> float:
    dp = Dispatcher(workers=workers, queue_size=CAPACITY)
    dp.events.bind(Tick, on_tick)
    async with dp:
        send = dp.events.send
        start = clock()
        if keys:
            for i in range(count):
                await send(Tick(i), key=i % keys)
        else:
            for i in range(count):
                await send(Tick(i))
        await dp.join()
        elapsed = clock() - start
    return count / elapsed


# -- where the time goes ---------------------------------------------------------------


async def bare_phases() -> tuple[float, float]:
    """ns per message putting CAPACITY messages into an empty queue, then handling them."""
    queue: asyncio.Queue[Tick] = asyncio.Queue(CAPACITY)

    async def worker() -> None:
        while True:
            item = await queue.get()
            await on_tick(item)
            queue.task_done()

    task = asyncio.create_task(worker())
    await asyncio.sleep(0)  # the worker waits on the empty queue
    start = clock()
    for i in range(CAPACITY):
        await queue.put(Tick(i))
    sent = clock()
    await queue.join()
    done = clock()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return (sent - start) / CAPACITY * 1e9, (done - sent) / CAPACITY * 1e9


async def pybus_phases() -> tuple[float, float]:
    """The same with `await dp.events.send(...)` and the default 4 workers."""
    dp = Dispatcher(queue_size=CAPACITY)
    dp.events.bind(Tick, on_tick)
    async with dp:
        send = dp.events.send
        await send(Tick(-1))  # the workers start, and wait on the empty queue
        await dp.join()
        start = clock()
        for i in range(CAPACITY):
            await send(Tick(i))
        sent = clock()
        await dp.join()
        done = clock()
    return (sent - start) / CAPACITY * 1e9, (done - sent) / CAPACITY * 1e9


async def collector_share(run: Callable[[], Awaitable[float]], count: int) -> float:
    """ns per message spent in the garbage collector during `run()`."""
    spent = 0.0
    began = 0.0

    def timing(phase: str, info: dict[str, Any]) -> None:
        nonlocal spent, began
        if phase == "start":
            began = clock()
        else:
            spent += clock() - began

    gc.callbacks.append(timing)
    try:
        await run()
    finally:
        gc.callbacks.remove(timing)
    return spent / count * 1e9


def start_in_before(context: contextvars.Context, coroutine: Any, owner: object) -> InContext | None:
    """The first step of a handling as the lanes ran it before the stepper (`start_in`
    with an owner, as it was): a frame of its own, and a `StopIteration` to catch."""
    try:
        step = context.run(_first_step_before, coroutine, owner)
    except StopIteration:
        return None
    return InContext(coroutine, context, step)


def _first_step_before(coroutine: Any, owner: object) -> Any:
    running_in.set(owner)
    return coroutine.send(None)


def steps() -> list[tuple[str, float]]:
    """ns for each step of a message, timed alone (what the event workers of a started
    dispatcher run); each handling gets a fresh copy of a context, whose cost is left out."""
    dp = Dispatcher()
    dp.events.bind(Tick, on_tick)
    dp.start()
    owner = object()
    ready: deque[object] = deque()
    names = {
        "copy_context": contextvars.copy_context,
        "context": contextvars.copy_context(),
        "get_ident": get_ident,
        "thread": get_ident(),
        "ready": ready,
        "take": ready.popleft,
        "message": Tick(0),
        "owner": owner,
        "set_owner": running_in.set,
        "start_in_before": start_in_before,
        "on_tick": on_tick,
        "handler_only": handlings(on_tick, owner).send,
        "through_publish": handlings(dp.events.engine.publish, owner).send,  # type: ignore[union-attr]
    }

    def timed(statement: str) -> float:
        number = 100_000
        return min(timeit.repeat(statement, globals=names, number=number, repeat=7)) / number * 1e9

    nothing = timed("pass")
    fresh = timed("context.copy()") - nothing  # left out of the steps that take a fresh copy
    alone = {
        "copy the sender's context": "copy_context()",
        "compare the thread": "get_ident() != thread",
        "queue and take, a tuple per message": "ready.append((message, context, None)); m, c, k = take()",
        "queue and take, flat": (
            "ready.append(message); ready.append(context); ready.append(None); "
            "m = take(); c = take(); k = take()"
        ),
    }
    in_fresh_copy = {
        "mark the context: running_in.set": "context.copy().run(set_owner, owner)",
        "first step by start_in (before)": "start_in_before(context.copy(), on_tick(message), owner)",
        "first step by the stepper (now)": "context.copy().run(handler_only, message)",
        "the same through the event engine": "context.copy().run(through_publish, message)",
    }
    return [(name, timed(statement) - nothing) for name, statement in alone.items()] + [
        (name, timed(statement) - nothing - fresh) for name, statement in in_fresh_copy.items()
    ]


async def profile(count: int, rounds: int) -> None:
    bare_send, bare_handle, pybus_sending, pybus_handling = [], [], [], []
    bare_gc, pybus_gc = [], []
    for _ in range(rounds):
        sending, handling = await bare_phases()
        bare_send.append(sending)
        bare_handle.append(handling)
        sending, handling = await pybus_phases()
        pybus_sending.append(sending)
        pybus_handling.append(handling)
        bare_gc.append(await collector_share(lambda: bare_queue(count), count))
        pybus_gc.append(await collector_share(lambda: pybus_send(count, 4), count))
    rows = [
        ("sending (until queued)", min(bare_send), min(pybus_sending)),
        ("handling (workers)", min(bare_handle), min(pybus_handling)),
        (f"garbage collector ({count:,} msgs)", min(bare_gc), min(pybus_gc)),
    ]
    print(f"\nwhere the time goes, ns per message, best of {rounds} rounds")
    print(f"{'phase':<38} {'bare':>8} {'pybus':>8} {'more':>8}")
    for name, bare, pybus in rows:
        print(f"{name:<38} {bare:>8.0f} {pybus:>8.0f} {pybus - bare:>+8.0f}")
    print("\nsteps, each timed alone, ns (best of 7; the wall clock)")
    for name, ns in steps():
        print(f"{name:<38} {ns:>8.0f}")


# -- memory ----------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def rss_growth(count: int) -> tuple[float, float]:
    dp = Dispatcher(workers=4, queue_size=CAPACITY)
    dp.events.bind(Tick, on_tick)
    async with dp:
        for i in range(100_000):  # warm-up: allocator pools, caches
            await dp.events.send(Tick(i), key=i % 1000)
        await dp.join()
        before = rss_bytes()
        for i in range(count):
            await dp.events.send(Tick(i), key=i % 1000)
        await dp.join()
        after = rss_bytes()
    return before / 2**20, (after - before) / 2**20


async def main(count: int, rounds: int, memory_count: int, with_profile: bool) -> None:
    cases: list[tuple[str, Callable[[], Awaitable[float]]]] = [
        ("bare asyncio.Queue + 1 task", lambda: bare_queue(count)),
        ("pybus send, 1 worker", lambda: pybus_send(count, 1)),
        ("pybus send, 4 workers", lambda: pybus_send(count, 4)),
        ("pybus send, 4 workers, 100 keys", lambda: pybus_send(count, 4, keys=100)),
        ("a task per message (not pybus)", lambda: task_per_message(count)),
    ]
    best = dict.fromkeys((name for name, _ in cases), 0.0)
    for _ in range(rounds):  # the cases take turns: a change of load slows them alike
        for name, run in cases:
            best[name] = max(best[name], await run())
    bare = best["bare asyncio.Queue + 1 task"]
    what = "CPU time" if clock is time.thread_time else "wall clock"
    print(f"{count:,} messages, best of {rounds} rounds ({what})")
    print(f"{'case':<34} {'msg/s':>12} {'ns/msg':>8} {'vs bare':>8}")
    for name, rate in best.items():
        print(f"{name:<34} {rate:>12,.0f} {1e9 / rate:>8.0f} {rate / bare:>7.2f}x")
    if with_profile:
        await profile(count, rounds)
    if memory_count:
        base, growth = await rss_growth(memory_count)
        print(f"RSS {base:.1f} MiB after warm-up; growth over {memory_count:,} more messages: ", end="")
        print(f"{growth:+.2f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory-messages", type=int, default=1_000_000, help="0: no memory measure")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--profile", action="store_true", help="where the time goes, per phase")
    parser.add_argument("--quick", action="store_true", help="20,000 messages, 2 rounds, 100,000 for memory")
    args = parser.parse_args()
    if args.quick:
        args.messages, args.rounds, args.memory_messages = 20_000, 2, 100_000
    if args.clock == "cpu":
        clock = time.thread_time
    asyncio.run(main(args.messages, args.rounds, args.memory_messages, args.profile))
