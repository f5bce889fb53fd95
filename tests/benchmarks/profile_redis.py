"""Where a Redis consumer's time goes, per message: the numbers behind the table
"Redis: where the time goes" of docs/benchmarks.md.

Run: `uv run python tests/benchmarks/profile_redis.py` (starts its own redis-server;
`--messages N` to change the 50,000 default, `--rounds N` the 3 rounds; each figure is
its best round).

1. The consumer of bench_redis.py (default settings, a handler that counts) over a
   stream filled beforehand: wall time, the client's CPU time (`time.process_time`,
   which a busy machine inflates less than the wall), round trips to Redis, reads and
   their size, and Redis's own time per command (`INFO commandstats`).
2. The same consumer and dispatcher without Redis: a transport that hands out envelopes
   built beforehand and acks nothing, with the dispatcher's handling (decode, context,
   engine, handler) and with the handler awaited directly in its place.
3. The transport's Python per message, without I/O: turning a read's reply into
   envelopes, the check's hand-out, the ack and its script arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
import uuid
from collections import Counter
from itertools import repeat
from typing import Any

import redis.asyncio as aioredis

from pybus import Dispatcher
from pybus.codec import JsonCodec
from pybus.redis_streams import RedisTransport
from pybus.transport import Envelope, Transport
from tests.benchmarks.bench_redis import Tick, all_acked, counting_worker
from tests.redis_server import redis_server


async def fill(url: str, count: int) -> None:
    producer = Dispatcher(transport=RedisTransport(url, group="producer"))
    producer.route(Tick, name="bench.tick")

    async def publisher(first: int) -> None:
        for n in range(first, count, 100):
            await producer.publish(Tick(n))

    async with producer:
        await asyncio.gather(*(publisher(first) for first in range(100)))


async def commandstats(client: Any) -> dict[str, tuple[int, int]]:
    info = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): (item["calls"], item["usec"]) for name, item in info.items()}


async def consume_from_redis(url: str, count: int) -> dict[str, Any]:
    worker, done = counting_worker(url, count)
    transport = worker.transport
    assert isinstance(transport, RedisTransport)
    trips: Counter[str] = Counter()
    sizes: list[int] = []
    execute, receive = transport._execute, transport.receive

    async def counted(commands: Any, *args: Any, **options: Any) -> Any:
        if callable(commands):  # before 2026-11-27, commands were queued in a redis-py pipeline
            trips["pipeline"] += 1
        else:
            trips[" + ".join(sorted({str(command[0]) for command in commands}))] += 1
        return await execute(commands, *args, **options)

    async def sized(names: Any, **options: Any) -> list[Envelope]:
        found = await receive(names, **options)
        sizes.append(len(found))
        return found

    transport._execute = counted  # type: ignore[method-assign]
    transport.receive = sized  # type: ignore[method-assign]
    watcher: Any = aioredis.Redis.from_url(url)
    async with worker:
        consumer = worker.consumer()
        before = await commandstats(watcher)
        wall, cpu = time.perf_counter(), time.process_time()
        reading = asyncio.create_task(consumer.run())
        await done.wait()
        await all_acked(watcher, worker)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        after = await commandstats(watcher)
        await consumer.stop(5)
        await reading
    await watcher.aclose()
    server = {
        name: (calls - before.get(name, (0, 0))[0], usec - before.get(name, (0, 0))[1])
        for name, (calls, usec) in after.items()
        if name not in ("info", "xpending") and usec > before.get(name, (0, 0))[1]
    }
    return {
        "wall": wall / count,
        "cpu": cpu / count,
        "trips": trips,
        "reads": len([size for size in sizes if size]),
        "read size": statistics.median([size for size in sizes if size]),
        "server": server,
    }


class Handed(Transport):
    """Hands out envelopes built beforehand; acks cost nothing."""

    def __init__(self, envelopes: list[Envelope], done: asyncio.Future[None]) -> None:
        self.envelopes = envelopes
        self.position = 0
        self.acked = 0
        self.done = done

    async def receive(self, names: Any, *, max_count: int, wait: float) -> list[Envelope]:
        await asyncio.sleep(0)
        found = self.envelopes[self.position : self.position + max_count]
        self.position += len(found)
        if not found:
            await asyncio.sleep(3600)
        return found

    async def ack(self, envelope: Envelope) -> None:
        self.acked += 1
        if self.acked == len(self.envelopes):
            self.done.set_result(None)

    async def send(self, envelope: Envelope) -> str:
        raise NotImplementedError


async def consume_without_redis(count: int, *, direct: bool) -> float:
    """CPU seconds per message of the consumer and dispatcher alone; with `direct`, the
    handler is awaited in place of the engine's handling."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    envelopes = [
        Envelope("event", "bench.tick", b'{"n":%d}' % n, ids[n], ids[n], None, 1, ("k", b"%d-0" % n))
        for n in range(count)
    ]
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    dp = Dispatcher(transport=Handed(envelopes, done))
    dp.route(Tick, name="bench.tick")

    async def handler(event: Tick) -> None:
        pass

    dp.events.register(Tick)(handler)
    codec = JsonCodec({Tick: "bench.tick"})
    async with dp:
        consumer = dp.consumer()
        if direct:

            async def handle(message: Any, envelope: Envelope) -> None:
                await handler(message)

            consumer._handlers = {"event": handle}
        cpu = time.process_time()
        reading = asyncio.create_task(consumer.run())
        await done
        cpu = time.process_time() - cpu
        await consumer.stop(1)
        await reading
    assert codec.decode("bench.tick", b'{"n":1}') == Tick(1)
    return cpu / count


class _Pipe:
    """Takes what the transport of before 2026-11-27 queued in a pipeline."""

    def evalsha(self, *args: Any) -> None:
        pass


async def transport_python(count: int) -> dict[str, float]:
    """CPU seconds per message of the transport's own Python on a read's reply, no I/O (the
    best of 5 rounds, the collector off): the reply's entries turned into envelopes and
    held, handed out after the check, acked (buffered, the ack script's arguments, the
    entry forgotten). Runs on the transport of before 2026-11-27 too."""
    from pybus import redis_wire as wire

    key, batch = "pybus:bench.tick", 50
    replies = []
    for round_ in range(max(1, count // batch)):
        items = []
        for n in range(batch):
            message_id = str(uuid.uuid4())
            sent = Envelope("event", "bench.tick", b'{"n":%d}' % n, message_id, message_id)
            fields = wire.entry_fields(sent)
            raw = [b"i", message_id.encode(), b"h", fields["h"], b"b", fields["b"]]
            items.append([b"%d-%d" % (round_, n), raw])
        replies.append(items)
    best: dict[str, float] = {}
    for _ in range(5):
        transport = RedisTransport("redis://127.0.0.1:1/0", group="bench", consumer="c")
        transport._acking = asyncio.get_running_loop().create_future()  # type: ignore[assignment]  # no ack task
        times: dict[str, float] = {}
        gc.disable()
        try:
            cpu = time.process_time()
            if hasattr(transport, "_accept_new"):
                read = [[e for e in transport._accept_new(key, items) if e is not None] for items in replies]
            else:
                read = [
                    [
                        e
                        for e in map(
                            transport._accept, wire.entries([(key, items)], with_deleted=True), repeat(1)
                        )
                        if e
                    ]
                    for items in replies
                ]
            times["reply to envelopes (held, keep-alive)"] = time.process_time() - cpu
            cpu = time.process_time()
            handed = [transport._hand_out([(envelope, 0) for envelope in found]) for found in read]
            times["hand-out after the check (duplicates)"] = time.process_time() - cpu
            cpu = time.process_time()
            for found in handed:
                for envelope in found:
                    await transport.ack(envelope)
                acks, transport._acks = transport._acks, []
                if hasattr(transport, "_acked"):
                    transport._ack_commands(acks)
                    transport._acked(acks)
                else:
                    queue_acks = getattr(transport, "_queue_acks", None)  # before 2026-11-27
                    assert queue_acks is not None
                    queue_acks(_Pipe(), acks)
                    for envelope, _ in acks:
                        transport._forget(envelope)
            times["ack: buffer, script arguments, forget"] = time.process_time() - cpu
        finally:
            gc.enable()
        for name, seconds in times.items():
            best[name] = min(best.get(name, seconds), seconds)
        if transport._keeper is not None:
            transport._keeper.cancel()
        transport._acking = None
        await transport.aclose()
    return {name: seconds / (len(replies) * batch) for name, seconds in best.items()}


async def main(count: int, rounds: int) -> None:
    runs = []
    for _ in range(rounds):
        with redis_server() as (url, _):
            await fill(url, count)
            runs.append(await consume_from_redis(url, count))
    best = min(runs, key=lambda run: run["cpu"])
    fastest = min(run["wall"] for run in runs)
    print(f"{count:,} messages, best of {rounds} rounds (client CPU; wall: the fastest round)")
    print(f"consume + handle + ack: {1 / fastest:,.0f} msg/s wall, client CPU {best['cpu'] * 1e6:.2f} µs/msg")
    print(f"reads: {best['reads']}, median {best['read size']:.0f} entries")
    for name, trips in sorted(best["trips"].items(), key=lambda item: -item[1]):
        print(f"  round trips [{name}]: {trips} ({trips * 1000 / count:.1f} per 1,000 messages)")
    total = 0.0
    for name, (calls, usec) in sorted(best["server"].items(), key=lambda item: -item[1][1]):
        print(f"  redis {name}: {calls} calls, {usec / count:.2f} µs/msg")
        if name in ("evalsha", "eval", "xreadgroup", "xrevrange", "xread", "xclaim"):
            total += usec / count
    print(f"  redis, all top-level commands: about {total:.2f} µs/msg (a script's time includes its calls)")
    alone = min([await consume_without_redis(count, direct=False) for _ in range(rounds)])
    direct = min([await consume_without_redis(count, direct=True) for _ in range(rounds)])
    print(f"consumer + dispatcher, no Redis: {alone * 1e6:.2f} µs/msg CPU")
    print(
        f"  of which the engine's handling (over awaiting the handler): {(alone - direct) * 1e6:.2f} µs/msg"
    )
    codec = JsonCodec({Tick: "bench.tick"})
    cpu = time.process_time()
    for n in range(count):
        codec.decode("bench.tick", b'{"n":%d}' % (n % 1000))
    print(f"  of which decoding the body: {(time.process_time() - cpu) / count * 1e6:.2f} µs/msg")
    for name, seconds in (await transport_python(count)).items():
        print(f"transport, {name}: {seconds * 1e6:.2f} µs/msg CPU")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    asyncio.run(main(options.messages, options.rounds))
