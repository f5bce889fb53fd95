"""Background send throughput and memory, next to a bare asyncio.Queue in the same run.

Run: `uv run python tests/benchmarks/bench_workers.py` (add `--quick` for a short run).

Throughput: N messages sent with `await dp.events.send(...)`, timed until
`dp.join()` returns, with 1 and 4 workers; the baseline is an `asyncio.Queue`
of the same capacity drained by one task that awaits the same handler.
Memory: resident set size before and after 1,000,000 messages (after a warm-up),
read from /proc/self/statm.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pybus import Dispatcher

CAPACITY = 10_000


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
    start = time.perf_counter()
    for i in range(count):
        await queue.put(Tick(i))
    await queue.join()
    elapsed = time.perf_counter() - start
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

    start = time.perf_counter()
    for i in range(count):
        await room.acquire()
        task = loop.create_task(on_tick(Tick(i)), context=contextvars.copy_context())
        task.add_done_callback(finish)
    await done.wait()
    return count / (time.perf_counter() - start)


async def pybus_send(count: int, workers: int, keys: int = 0) -> float:
    dp = Dispatcher(workers=workers, queue_size=CAPACITY)
    dp.events.bind(Tick, on_tick)
    async with dp:
        send = dp.events.send
        start = time.perf_counter()
        if keys:
            for i in range(count):
                await send(Tick(i), key=i % keys)
        else:
            for i in range(count):
                await send(Tick(i))
        await dp.join()
        elapsed = time.perf_counter() - start
    return count / elapsed


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


async def main(count: int, rounds: int, memory_count: int) -> None:
    async def best(make: Callable[[], Awaitable[float]]) -> float:
        return max([await make() for _ in range(rounds)])

    bare = await best(lambda: bare_queue(count))
    rows = [
        ("bare asyncio.Queue + 1 task", bare),
        ("pybus send, 1 worker", await best(lambda: pybus_send(count, 1))),
        ("pybus send, 4 workers", await best(lambda: pybus_send(count, 4))),
        ("pybus send, 4 workers, 100 keys", await best(lambda: pybus_send(count, 4, keys=100))),
        ("a task per message (not pybus)", await best(lambda: task_per_message(count))),
    ]
    print(f"{count:,} messages, best of {rounds} rounds")
    print(f"{'case':<34} {'msg/s':>12} {'ns/msg':>8} {'vs bare':>8}")
    for name, rate in rows:
        print(f"{name:<34} {rate:>12,.0f} {1e9 / rate:>8.0f} {rate / bare:>7.2f}x")
    base, growth = await rss_growth(memory_count)
    print(f"RSS {base:.1f} MiB after warm-up; growth over {memory_count:,} more messages: {growth:+.2f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory-messages", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="20,000 messages, 2 rounds, 100,000 for memory")
    args = parser.parse_args()
    if args.quick:
        args.messages, args.rounds, args.memory_messages = 20_000, 2, 100_000
    asyncio.run(main(args.messages, args.rounds, args.memory_messages))
