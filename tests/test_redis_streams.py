"""The Redis Streams transport against a real redis-server (one per test)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis

from pybus import Dispatcher, Event, TransportError
from pybus.codec import default_name
from pybus.redis_streams import RedisTransport
from pybus.transport import Envelope
from tests.consuming import consuming, until


@dataclass(frozen=True)
class Paid(Event):
    n: int


KEY = f"pybus:{default_name(Paid)}"


def raw(url: str) -> Any:
    """A plain redis-py client, to look at the streams (typed loosely: replies are bytes)."""
    return aioredis.Redis.from_url(url)


class Boom(Exception):
    pass


def shop(url: str, **options: object) -> Dispatcher:
    dp = Dispatcher(transport=RedisTransport(url, group="shop", **options))  # type: ignore[arg-type]
    dp.route(Paid)
    return dp


def worker(
    url: str, handler: Callable[[Paid], object], *, consumer: str = "w1", **options: object
) -> Dispatcher:
    transport = RedisTransport(url, group="billing", consumer=consumer, **options)  # type: ignore[arg-type]
    dp = Dispatcher(transport=transport, on_error=lambda error, message: None)
    dp.route(Paid)
    dp.events.bind(Paid, handler)
    return dp


async def publish(url: str, count: int, start: int = 0) -> None:
    async with shop(url) as dp:
        for n in range(start, start + count):
            await dp.publish(Paid(n))
    assert dp.transport is not None
    await dp.transport.aclose()


async def test_round_trip_and_ack(redis_url: str) -> None:
    seen: list[int] = []
    await publish(redis_url, 100)
    async with consuming(worker(redis_url, lambda event: seen.append(event.n))) as consumer:
        await until(lambda: consumer.handled == 100)
    assert sorted(seen) == list(range(100))
    client = raw(redis_url)
    assert (await client.xpending(KEY, "billing"))["pending"] == 0
    await client.aclose()


async def test_g2_a_restarted_consumer_handles_its_own_pending_entries_first(redis_url: str) -> None:
    await publish(redis_url, 20)
    first = RedisTransport(redis_url, group="billing", consumer="w1", claim_idle=60)
    taken = await first.receive([default_name(Paid)], max_count=20, wait=0.1)
    assert len(taken) == 20
    await first.aclose()  # "dies" without acking anything
    seen: list[int] = []
    started = time.monotonic()
    async with consuming(worker(redis_url, lambda event: seen.append(event.n), claim_idle=60)) as consumer:
        await until(lambda: consumer.handled == 20)
    assert time.monotonic() - started < 1.0 + 0.5  # well within 1 s of start (plus teardown)
    assert sorted(seen) == list(range(20))


async def test_g3_messages_failing_their_first_attempt_all_take_effect(redis_url: str) -> None:
    effects: list[int] = []
    attempts: dict[int, int] = {}

    def flaky(event: Paid) -> None:
        attempts[event.n] = attempts.get(event.n, 0) + 1
        if event.n % 10 == 0 and attempts[event.n] == 1:
            raise Boom(f"first attempt of {event.n}")
        effects.append(event.n)

    await publish(redis_url, 10_000)
    async with consuming(worker(redis_url, flaky), concurrency=8) as consumer:
        await until(lambda: len(effects) == 10_000, timeout=60)
        assert consumer.failed == 1_000
    assert sorted(effects) == list(range(10_000))
    assert all(attempts[n] == (2 if n % 10 == 0 else 1) for n in range(10_000))


async def test_g4_a_poison_message_is_dead_lettered_after_max_deliveries(redis_url: str) -> None:
    deliveries = 0
    done: list[int] = []

    def poisoned(event: Paid) -> None:
        nonlocal deliveries
        if event.n == 500:
            deliveries += 1
            raise Boom("poison")
        done.append(event.n)

    await publish(redis_url, 1_000)
    client = raw(redis_url)
    await client.xadd(
        KEY, {"kind": "event", "name": default_name(Paid), "body": b"{not json", "message_id": "x"}
    )
    dp = worker(redis_url, poisoned)
    started = time.monotonic()
    async with consuming(dp, max_deliveries=4) as consumer:
        await until(lambda: len(done) == 999)
        assert time.monotonic() - started < 2.0  # the other 999 were not held up by it
        await until(lambda: consumer.dead_lettered == 2)
        transport = dp.transport
        assert isinstance(transport, RedisTransport)
        letters = await transport.dead_letters()
    assert deliveries == 4
    reasons = sorted(letter.reason for _, letter in letters)
    assert reasons[0].startswith("Cannot decode a message named")
    assert reasons[1].startswith("failed 4 times; last error: ExceptionGroup: ")
    assert "Boom: poison" in reasons[1]
    poison = next(letter for _, letter in letters if letter.envelope.attempt == 4)
    assert poison.envelope.body == b'{"n":500}'
    assert (await client.xpending(KEY, "billing"))["pending"] == 0
    await client.aclose()


async def test_dead_letters_can_be_requeued_and_purged(redis_url: str) -> None:
    handled: list[int] = []
    fail = True

    def sometimes(event: Paid) -> None:
        if fail:
            raise Boom("not yet")
        handled.append(event.n)

    await publish(redis_url, 1)
    dp = worker(redis_url, sometimes)
    async with consuming(dp, max_deliveries=1) as consumer:
        await until(lambda: consumer.dead_lettered == 1)
        transport = dp.transport
        assert isinstance(transport, RedisTransport)
        ((dead_id, _),) = await transport.dead_letters()
        fail = False
        await transport.requeue(dead_id)
        await until(lambda: handled == [0])
        assert await transport.dead_letters() == []
        with pytest.raises(TransportError, match=r"No dead letter"):
            await transport.requeue(dead_id)
        assert await transport.purge() == 0


async def test_a_message_sent_twice_takes_effect_once(redis_url: str) -> None:
    seen: list[int] = []
    producer = RedisTransport(redis_url)
    envelope = Envelope("event", default_name(Paid), b'{"n": 7}', "same-id", "same-id")
    await producer.send(envelope)
    second = await producer.send(envelope)  # e.g. a retry after a timeout that had written it
    await producer.aclose()
    client = raw(redis_url)
    async with consuming(worker(redis_url, lambda event: seen.append(event.n))) as consumer:
        await until(lambda: seen == [7])
        # Wait until the group has read the second entry and nothing is pending:
        # its copy was acked, not handled.
        async with asyncio.timeout(10):
            while True:
                await consumer.transport.flush()
                (group,) = await client.xinfo_groups(KEY)
                if group["last-delivered-id"].decode() == second and group["pending"] == 0:
                    break
                await asyncio.sleep(0.01)
    assert seen == [7]
    await client.aclose()


async def test_g8_pending_entries_survive_trimming(redis_url: str) -> None:
    await publish(redis_url, 1_000)
    paused = RedisTransport(redis_url, group="billing", consumer="paused", max_len=10_000)
    taken = await paused.receive([default_name(Paid)], max_count=1_000, wait=0.1)
    assert len(taken) == 1_000  # in hand, never acked
    client = raw(redis_url)
    for _ in range(100):
        async with client.pipeline(transaction=False) as pipe:
            for n in range(1_000):
                pipe.xadd(KEY, {"kind": "event", "name": default_name(Paid), "body": b'{"n": %d}' % n})
            await pipe.execute()
    # The billing group read the first 1,000 and has the rest unread: nothing it needs may go.
    await paused.trim(KEY)
    assert await client.xlen(KEY) == 101_000
    # The group has now read everything, but the 1,000 pending entries are the oldest:
    # MINID trimming cannot go past them, so every one of them survives, body included.
    await client.xgroup_setid(KEY, "billing", "$")
    await paused.trim(KEY)
    first, last = taken[0].receipt[1], taken[-1].receipt[1]  # type: ignore[index]
    survivors = await client.xrange(KEY, first, last)
    assert [fields[b"b"] for _, fields in survivors] == [t.body for t in taken]
    assert (await client.xpending(KEY, "billing"))["pending"] == 1_000
    # Once they are acked, the retention limit applies.
    for envelope in taken:
        await paused.ack(envelope)
    await paused.aclose()
    trimmer = RedisTransport(redis_url, group="billing", max_len=10_000)
    await trimmer.trim(KEY)
    assert await client.xlen(KEY) == 10_000
    await trimmer.aclose()
    await client.aclose()


async def test_a_send_to_an_unreachable_server_raises_a_pybus_error() -> None:
    from tests.redis_server import free_port

    transport = RedisTransport(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    with pytest.raises(TransportError, match=r"it may or may not have been written"):
        await transport.send(Envelope("event", "x", b"", "id", "id"))
    await transport.aclose()


async def test_a_send_that_fails_otherwise_raises_that_error_instead_of_waiting_forever() -> None:
    from tests.redis_server import free_port

    transport = RedisTransport(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)

    async def broken(queue: object) -> list[Any]:
        raise ValueError("not a Redis error")

    transport._execute = broken  # type: ignore[method-assign]  # a failure that is no RedisError
    sends = [transport.send(Envelope("event", "x", b"", f"id{n}", f"id{n}")) for n in range(3)]
    async with asyncio.timeout(5):
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
    assert [repr(outcome) for outcome in outcomes] == [repr(ValueError("not a Redis error"))] * 3
    await transport.aclose()
