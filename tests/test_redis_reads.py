"""The Redis transport's two ways of reading new entries, against a real redis-server: a
consumer of one stream reads with `XREADGROUP` and checks the message ids with the acks
in a second round trip; a consumer of several streams reads and checks in one script
(`redis_wire.TAKE`). Each behaviour that depends on the read is shown for both: a message
sent twice takes effect once (also with message ids that are empty or hold a line break,
which the one-argument check and the acks' marks must not split), a copy read while the
first is in hand is skipped without hiding its failure, an entry requeued for another
group is acked without being handled."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from pybus import Dispatcher, TransportError
from pybus.codec import default_name
from pybus.redis_streams import RedisTransport
from pybus.redis_wire import SHA, entry_fields
from pybus.transport import Envelope
from tests.consuming import consuming, until
from tests.test_redis_streams import KEY, Paid, publish, raw

NAME = default_name(Paid)
STREAMS = pytest.mark.parametrize("streams", [1, 2], ids=["one stream", "several streams"])


def worker(url: str, seen: list[Any], streams: int, **options: object) -> Dispatcher:
    """A billing worker of Paid that records what it handles; with `streams` 2 it consumes
    a second routed name too, so that its reads go over several streams."""
    transport = RedisTransport(url, group="billing", consumer="w1", **options)  # type: ignore[arg-type]
    dp = Dispatcher(transport=transport, on_error=lambda error, message: None)
    dp.route(Paid)
    dp.events.bind(Paid, lambda event: seen.append(event.n))
    if streams == 2:
        dp.route("other", name="other")
        dp.events.bind("other", lambda event: seen.append(event))
    return dp


def paid(n: int, message_id: str) -> Envelope:
    return Envelope("event", NAME, b'{"n": %d}' % n, message_id, message_id)


async def settled(client: Any) -> int:
    """What the billing group has pending, once it has read everything there is."""
    async with asyncio.timeout(10):
        while True:
            (group,) = await client.xinfo_groups(KEY)
            (last,) = await client.xrevrange(KEY, "+", "-", count=1)
            if group["last-delivered-id"] == last[0]:
                return int(group["pending"])
            await asyncio.sleep(0.005)


@STREAMS
@pytest.mark.parametrize("message_id", ["same-id", "", "line\nbreak", "\n"], ids=repr)
async def test_a_message_sent_twice_takes_effect_once(redis_url: str, streams: int, message_id: str) -> None:
    producer = RedisTransport(redis_url)
    await producer.send(paid(7, message_id))
    await producer.send(paid(7, message_id))  # e.g. a retry after a timeout that had written it
    await producer.send(paid(8, "another"))
    seen: list[Any] = []
    client = raw(redis_url)
    async with consuming(worker(redis_url, seen, streams)) as consumer:
        await until(lambda: sorted(seen) == [7, 8])
        while await settled(client):  # the copy is acked, unhandled
            await consumer.transport.flush()
        await producer.send(paid(7, message_id))  # read later, after the first was recorded
        await producer.send(paid(9, "last"))
        await until(lambda: 9 in seen)
        while await settled(client):
            await consumer.transport.flush()
    assert sorted(seen) == [7, 8, 9]
    await producer.aclose()
    await client.aclose()


@STREAMS
async def test_a_copy_read_while_the_first_is_in_hand_does_not_hide_its_failure(
    redis_url: str, streams: int
) -> None:
    in_hand, copy_acked = asyncio.Event(), asyncio.Event()
    handlings: list[int] = []

    async def first_fails(event: Paid) -> None:
        handlings.append(event.n)
        if len(handlings) == 1:
            in_hand.set()
            await copy_acked.wait()
            raise RuntimeError("first attempt")

    dp = worker(redis_url, [], streams)
    dp.events.bind(Paid, first_fails)
    producer = RedisTransport(redis_url)
    await producer.send(paid(7, "same-id"))
    client = raw(redis_url)
    async with consuming(dp) as consumer:
        await until(in_hand.is_set)
        await producer.send(paid(7, "same-id"))
        while await settled(client) != 1:  # the copy was acked: the first is pending
            await consumer.transport.flush()
        copy_acked.set()
        await until(lambda: consumer.handled == 1)
    assert handlings == [7, 7]  # the failed first attempt, then its retry
    assert await settled(client) == 0
    await producer.aclose()
    await client.aclose()


@STREAMS
async def test_an_entry_requeued_for_another_group_is_acked_without_being_handled(
    redis_url: str, streams: int
) -> None:
    client = raw(redis_url)
    fields = dict(entry_fields(paid(1, "for-shipping")))
    await client.xadd(KEY, {**fields, "g": "shipping"})
    producer = RedisTransport(redis_url)
    await producer.send(paid(2, "for-everyone"))
    seen: list[Any] = []
    async with consuming(worker(redis_url, seen, streams)) as consumer:
        await until(lambda: seen == [2])
        while await settled(client):
            await consumer.transport.flush()
    assert seen == [2]
    await producer.aclose()
    await client.aclose()


async def test_entries_whose_check_failed_after_the_read_come_with_the_next_read_once(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One stream's read takes its entries (`XREADGROUP`, a delivery counted), then checks
    them in a second round trip: when that one fails, the read raises and the entries wait
    here, handed out by the next read as they were (their first delivery), not claimed
    after `claim_idle` as a second one."""
    await publish(redis_url, 2)
    transport = RedisTransport(redis_url, group="billing", consumer="w1", claim_interval=60)
    execute = transport._execute
    failing = [1]

    async def failing_check(commands: Any, connected: Any = None) -> list[Any]:
        if failing and any(command[:2] == ("EVALSHA", SHA["check"]) for command in commands):
            failing.pop()
            raise RedisConnectionError("the connection dropped")
        return await execute(commands, connected)

    monkeypatch.setattr(transport, "_execute", failing_check)
    with pytest.raises(TransportError, match="the connection dropped"):
        await transport.receive([NAME], max_count=10, wait=1.0)
    taken = await transport.receive([NAME], max_count=10, wait=1.0)
    assert [(envelope.body, envelope.attempt) for envelope in taken] == [(b'{"n":0}', 1), (b'{"n":1}', 1)]
    client = raw(redis_url)
    delivered = await client.xpending_range(KEY, "billing", min="-", max="+", count=10)
    assert [item["times_delivered"] for item in delivered] == [1, 1]
    for envelope in taken:
        await transport.ack(envelope)
    await transport.aclose()
    assert (await client.xpending(KEY, "billing"))["pending"] == 0
    await client.aclose()
