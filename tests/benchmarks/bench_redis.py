"""End to end over Redis Streams: publish, consume, handle, ack; next to raw redis-py.

Run: `uv run python tests/benchmarks/bench_redis.py` (starts its own redis-server;
`--messages N` to change the 100,000 default, `--rounds N` the 5 rounds).

Raw: redis-py pipelines of 100 XADDs, then XREADGROUP COUNT 100 with one
XACK per batch. pybus: 100 tasks publishing concurrently (the sends of one
event-loop turn share one script call), and one consumer (reads of 100, up to
200 held, so the next read overlaps the handling of a batch; acks in batches of
up to 1,000, sent with the next read) running a handler that counts. Both runs
produce and then consume the same number of messages, and the rate is messages
over the total time of both phases. Each round runs raw and then pybus, each
against a fresh redis-server; each side's figure is its best round, which keeps
the noise of a shared machine out (the server runs on the same cores).
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


async def pybus_e2e(url: str, count: int) -> tuple[float, float]:
    producer = Dispatcher(transport=RedisTransport(url, group="producer"))
    producer.route(Tick)
    handled = 0
    done = asyncio.Event()
    worker = Dispatcher(transport=RedisTransport(url, group="bench", consumer="c", ack_batch=1000))
    worker.route(Tick)

    @worker.events.register(Tick)
    async def count_it(event: Tick) -> None:
        nonlocal handled
        handled += 1
        if handled == count:
            done.set()

    async def publisher(first: int, step: int) -> None:
        for n in range(first, count, step):
            await producer.publish(Tick(n))

    async with producer:
        start = time.perf_counter()
        await asyncio.gather(*(publisher(first, 100) for first in range(100)))
        produced = time.perf_counter()
    async with worker:
        consumer = worker.consumer(concurrency=200, prefetch=100, wait=0.1)
        reading = asyncio.create_task(consumer.run())
        await done.wait()
        consumed = time.perf_counter()
        await consumer.stop(5)
        await reading
    for dp in (producer, worker):
        assert dp.transport is not None
        await dp.transport.aclose()
    return produced - start, consumed - produced


async def main(count: int, rounds: int) -> None:
    raw_runs, our_runs = [], []
    for _ in range(rounds):
        with redis_server() as (url, _):
            raw_runs.append(await raw(url, count))
        with redis_server() as (url, _):
            our_runs.append(await pybus_e2e(url, count))
    raw_produce, raw_consume = min(run[0] for run in raw_runs), min(run[1] for run in raw_runs)
    ours_produce, ours_consume = min(run[0] for run in our_runs), min(run[1] for run in our_runs)
    raw_rate = count / min(sum(run) for run in raw_runs)
    ours_rate = count / min(sum(run) for run in our_runs)
    print(
        f"{count:,} messages, one redis-server per run (persistence off), 1 consumer, best of {rounds} rounds"
    )
    print(f"{'phase':<26} {'raw redis-py msg/s':>19} {'pybus msg/s':>12} {'ratio':>6}")
    for name, theirs, ours in (
        ("produce", raw_produce, ours_produce),
        ("consume + handle + ack", raw_consume, ours_consume),
    ):
        print(f"{name:<26} {count / theirs:>19,.0f} {count / ours:>12,.0f} {theirs / ours:>5.2f}x")
    print(f"{'end to end':<26} {raw_rate:>19,.0f} {ours_rate:>12,.0f} {ours_rate / raw_rate:>5.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    asyncio.run(main(options.messages, options.rounds))
