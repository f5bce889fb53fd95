"""End to end over Redis Streams: publish, consume, handle, ack; next to raw redis-py.

Run: `uv run python tests/benchmarks/bench_redis.py` (starts its own redis-server;
`--messages N` to change the 100,000 default, `--rounds N` the 5 rounds, `--prefetch N`
to run pybus's consumer with another prefetch than its default).

Raw: redis-py pipelines of 100 XADDs, then XREADGROUP COUNT 100 with one
XACK per batch. pybus: 100 tasks publishing concurrently (the sends of one
event-loop turn share one script call), and one consumer with the default
settings (`worker.consumer()`, as `serve()` and `pybus worker` use them) running
a handler that counts. Both runs produce and then consume the same number of
messages; the consuming clock stops when the last entry is acknowledged (the
group has nothing pending, as XPENDING reports), not at the last handling. So the
"consume + handle + ack" line compares the consumer with a raw XREADGROUP/XACK loop
over a stream filled beforehand, and the "end to end" line both phases: its rate is
messages over the total time of both. Each round runs raw and then
pybus, each against a fresh redis-server; each side's figure is its best round,
which keeps the noise of a shared machine out (the server runs on the same cores).

Latency, on an idle consumer with the default settings: a lone message from the
moment `publish` is called to the moment Redis has its ack (p50 and p99 of 200,
each sent once the previous one is acked), and a burst of 10 published at once
until all are acked (p50 and p99 of 50 bursts). Acks are observed by polling
XPENDING every 0.2 ms from a separate connection.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from pybus import Dispatcher, Event
from pybus.redis_streams import RedisTransport
from tests.redis_server import redis_server


@dataclass(frozen=True)
class Tick(Event):
    n: int


async def raw(url: str, count: int) -> tuple[float, float]:
    client: Any = aioredis.Redis.from_url(url)
    key = "raw:ticks"
    await client.xgroup_create(key, "g", id="0", mkstream=True)
    start = time.perf_counter()
    for base in range(0, count, 100):
        async with client.pipeline(transaction=False) as pipe:
            for n in range(base, min(base + 100, count)):
                pipe.xadd(key, {"body": b'{"n":%d}' % n})
            await pipe.execute()
    produced = time.perf_counter()
    seen = 0
    while seen < count:
        reply = await client.xreadgroup("g", "c", {key: ">"}, count=100)
        entries = reply[0][1]
        seen += len(entries)
        await client.xack(key, "g", *(entry_id for entry_id, _ in entries))
    consumed = time.perf_counter()
    await client.aclose()
    return produced - start, consumed - produced


def counting_worker(url: str, count: int) -> tuple[Dispatcher, asyncio.Event]:
    """The benchmarks' worker: consumer "c" of group "bench", whose handler counts the ticks;
    the event is set once it has handled `count` of them."""
    handled = 0
    done = asyncio.Event()
    worker = Dispatcher(transport=RedisTransport(url, group="bench", consumer="c"))
    worker.route(Tick, name="bench.tick")

    @worker.events.register(Tick)
    async def count_it(event: Tick) -> None:
        nonlocal handled
        handled += 1
        if handled == count:
            done.set()

    return worker, done


async def pybus_e2e(url: str, count: int, prefetch: int | None) -> tuple[float, float]:
    producer = Dispatcher(transport=RedisTransport(url, group="producer"))
    producer.route(Tick, name="bench.tick")
    worker, done = counting_worker(url, count)

    async def publisher(first: int, step: int) -> None:
        for n in range(first, count, step):
            await producer.publish(Tick(n))

    async with producer:
        start = time.perf_counter()
        await asyncio.gather(*(publisher(first, 100) for first in range(100)))
        produced = time.perf_counter()
    watcher: Any = aioredis.Redis.from_url(url)
    async with worker:
        consumer = worker.consumer() if prefetch is None else worker.consumer(prefetch=prefetch)
        reading = asyncio.create_task(consumer.run())
        await done.wait()
        await all_acked(watcher, worker)
        consumed = time.perf_counter()
        await consumer.stop(5)
        await reading
    await watcher.aclose()
    return produced - start, consumed - produced


async def all_acked(watcher: Any, worker: Dispatcher) -> None:
    """Return once the worker's group has nothing pending."""
    key = f"pybus:{worker.routes[Tick]}"
    while (await watcher.xpending(key, "bench"))["pending"]:  # noqa: ASYNC110 - Redis's state
        await asyncio.sleep(0.0002)


async def latency(url: str) -> tuple[list[float], list[float]]:
    """Seconds from publish to ack: of lone messages, and of bursts of 10 (to the last ack)."""
    producer = Dispatcher(transport=RedisTransport(url, group="producer"))
    producer.route(Tick, name="bench.tick")
    worker = Dispatcher(transport=RedisTransport(url, group="bench", consumer="c"))
    worker.route(Tick, name="bench.tick")
    handled = 0
    arrived = asyncio.Event()

    @worker.events.register(Tick)
    async def count_it(event: Tick) -> None:
        nonlocal handled
        handled += 1
        arrived.set()

    watcher: Any = aioredis.Redis.from_url(url)
    lone: list[float] = []
    bursts: list[float] = []
    async with producer, worker:
        consumer = worker.consumer()
        reading = asyncio.create_task(consumer.run())
        for size, runs, results in ((1, 200, lone), (10, 50, bursts)):
            for _ in range(runs):
                await asyncio.sleep(0.005)  # the consumer is idle, in its blocking wait
                goal = handled + size
                start = time.perf_counter()
                await asyncio.gather(*(producer.publish(Tick(n)) for n in range(size)))
                while handled < goal:
                    arrived.clear()
                    await arrived.wait()
                await all_acked(watcher, worker)
                results.append(time.perf_counter() - start)
        await consumer.stop(5)
        await reading
    await watcher.aclose()
    return lone, bursts


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


#: What the performance issue asks of each line (pybus over raw redis-py).
TARGETS = {"consume + handle + ack": "at least 0.6x", "end to end": "at least 0.9x"}


async def main(count: int, rounds: int, prefetch: int | None) -> None:
    raw_runs, our_runs = [], []
    for _ in range(rounds):
        with redis_server() as (url, _):
            raw_runs.append(await raw(url, count))
        with redis_server() as (url, _):
            our_runs.append(await pybus_e2e(url, count, prefetch))
    raw_produce, raw_consume = min(run[0] for run in raw_runs), min(run[1] for run in raw_runs)
    ours_produce, ours_consume = min(run[0] for run in our_runs), min(run[1] for run in our_runs)
    raw_rate = count / min(sum(run) for run in raw_runs)
    ours_rate = count / min(sum(run) for run in our_runs)
    settings = "default settings" if prefetch is None else f"prefetch {prefetch}"
    print(
        f"{count:,} messages, one redis-server per run (persistence off), 1 consumer ({settings}), "
        f"best of {rounds} rounds"
    )
    print(f"{'phase':<26} {'raw redis-py msg/s':>19} {'pybus msg/s':>12} {'ratio':>6}  target")
    for name, theirs, ours in (
        ("produce", raw_produce, ours_produce),
        ("consume + handle + ack", raw_consume, ours_consume),
    ):
        line = f"{name:<26} {count / theirs:>19,.0f} {count / ours:>12,.0f} {theirs / ours:>5.2f}x"
        print(f"{line}  {TARGETS.get(name, '')}".rstrip())
    line = f"{'end to end':<26} {raw_rate:>19,.0f} {ours_rate:>12,.0f} {ours_rate / raw_rate:>5.2f}x"
    print(f"{line}  {TARGETS['end to end']}")
    with redis_server() as (url, _):
        lone, bursts = await latency(url)
    for name, values in (("lone message", lone), ("burst of 10", bursts)):
        print(
            f"publish to ack, {name:<13} p50 {percentile(values, 0.5) * 1000:6.2f} ms"
            f"   p99 {percentile(values, 0.99) * 1000:6.2f} ms   ({len(values)} runs)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prefetch", type=int, default=None, help="the consumer's prefetch")
    options = parser.parse_args()
    asyncio.run(main(options.messages, options.rounds, options.prefetch))
