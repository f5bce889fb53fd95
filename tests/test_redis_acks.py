"""How the Redis transport batches acks, against a real redis-server.

An ack is buffered; it goes with the check of the next read, or with the acks made
meanwhile once they are due: at once when the consumer has nothing else in hand, else
within `_ACK_DELAY` (or `_ACK_BATCH` of them at once). A stop sends the acks still
waiting before it returns; a worker killed before it sent them has those messages
handled again (at least once). The tests that make the delay long set the module's
`_ACK_DELAY`, which nothing else reads.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from pybus import TransportError, redis_streams
from pybus.codec import default_name
from pybus.consumer import Consumer, current_envelope
from pybus.redis_streams import RedisTransport
from pybus.redis_wire import SHA
from pybus.transport import Envelope
from tests.consuming import consuming, until
from tests.test_redis_streams import KEY, Paid, pending, publish, raw, worker
from tests.test_redis_workers import ROOT


def one_in_hand() -> tuple[asyncio.Event, asyncio.Event, Any]:
    """A handler that keeps message 0 in hand until `release` is set (`started` says when it
    has it) and handles the others at once."""
    started, release = asyncio.Event(), asyncio.Event()

    async def handle(event: Paid) -> None:
        if event.n == 0:
            started.set()
            await release.wait()

    return started, release, handle


@asynccontextmanager
async def one_handled_while_one_in_hand(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, ack_delay: float
) -> AsyncIterator[tuple[Consumer, RedisTransport, asyncio.Event]]:
    """A consumer (acks delayed up to `ack_delay`) that has handled message 1 while message 0
    stays in hand until the event yielded is set."""
    monkeypatch.setattr(redis_streams, "_ACK_DELAY", ack_delay)
    started, release, handle = one_in_hand()
    dp = worker(redis_url, handle, claim_interval=60)
    transport = dp.transport
    assert isinstance(transport, RedisTransport)
    async with consuming(dp, wait=30) as consumer:
        await publish(redis_url, 1)
        await until(started.is_set)
        await publish(redis_url, 1, start=1)
        await until(lambda: consumer.handled == 1)
        yield consumer, transport, release


def envelope(n: int) -> Envelope:
    return Envelope("event", default_name(Paid), b'{"n":%d}' % n, f"id{n}", f"id{n}")


async def entry_ids(client: Any) -> list[bytes]:
    return [entry_id for entry_id, _ in await client.xrange(KEY)]


async def test_a_busy_consumers_ack_waits_for_a_round_trip_to_share_and_goes_when_it_is_idle(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with one_handled_while_one_in_hand(redis_url, monkeypatch, 60.0) as (consumer, transport, release):
        await until(lambda: transport._read_waiting)  # nothing more goes out: the read waits
        assert [envelope.body for envelope, _ in transport._acks] == [b'{"n":1}']
        assert await pending(redis_url) == 2  # message 1's ack waits: message 0 is in hand
        release.set()
        await until(lambda: consumer.handled == 2)
        # Nothing else in hand: both acks go at once, without waiting for the delay.
        async with asyncio.timeout(2):
            while await pending(redis_url):  # noqa: ASYNC110 - another process's state
                await asyncio.sleep(0.005)


async def test_a_busy_consumers_ack_waits_no_longer_than_the_ack_delay(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with one_handled_while_one_in_hand(redis_url, monkeypatch, 0.05) as (_, _, release):
        async with asyncio.timeout(2):
            while await pending(redis_url) != 1:  # noqa: ASYNC110 - another process's state
                await asyncio.sleep(0.005)
        assert not release.is_set()  # sent while message 0 was still in hand
        release.set()


async def test_acks_still_waiting_when_a_consumer_stops_are_sent_before_stop_returns(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = raw(redis_url)
    async with one_handled_while_one_in_hand(redis_url, monkeypatch, 60.0) as (consumer, transport, _):
        await until(lambda: transport._read_waiting)
        assert await pending(redis_url) == 2
        assert await consumer.stop(0.1) == 1  # message 0 never finished: given back
        first, _ = await entry_ids(client)
        (left,) = await client.xpending_range(KEY, "billing", min="-", max="+", count=10)
        assert (left["message_id"], left["times_delivered"]) == (first, 0)  # message 1 was acked
    await client.aclose()


@pytest.mark.parametrize("fails", [False, True], ids=["lands", "fails"])
async def test_a_flush_waits_for_the_acks_a_reads_check_carries_and_sends_those_it_failed_to(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, fails: bool
) -> None:
    """A consumer's stop flushes the acks while its last read, cancelled, still runs: the acks
    that read's duplicate check took along are sent by the time flush() returns, by the
    check or, when its round trip fails, by flush() itself."""
    monkeypatch.setattr(redis_streams, "_ACK_DELAY", 60.0)
    await publish(redis_url, 3)
    transport = RedisTransport(redis_url, group="billing", consumer="w1", claim_interval=60)
    first, second = await transport.receive([default_name(Paid)], max_count=2, wait=1.0)
    await transport.ack(first)  # buffered: `second` is still in hand
    gate = asyncio.Event()
    ended: list[str] = []  # the check's round trip, then flush()
    execute = transport._execute

    async def gated(commands: Any, connected: Any = None) -> list[Any]:
        if not any(command[:2] == ("EVALSHA", SHA["check"]) for command in commands):
            return await execute(commands, connected)
        assert ("EVALSHA", SHA["ack"]) in {command[:2] for command in commands}  # it carries the ack
        await gate.wait()
        try:
            if fails:
                raise RedisConnectionError("the connection dropped")
            return await execute(commands, connected)
        finally:
            ended.append("check")

    monkeypatch.setattr(transport, "_execute", gated)
    reading = asyncio.create_task(transport.receive([default_name(Paid)], max_count=1, wait=1.0))
    await until(lambda: not transport._acks)  # the read's check took the ack along
    flushing = asyncio.create_task(transport.flush())
    flushing.add_done_callback(lambda _: ended.append("flush"))
    for _ in range(20):  # flush() has had every chance to return
        await asyncio.sleep(0)
    gate.set()
    await flushing
    assert ended == ["check", "flush"]
    assert await pending(redis_url) == 2  # first acked; second in hand, third read
    if fails:
        with pytest.raises(TransportError, match="the connection dropped"):
            await reading
    else:
        assert [envelope.body for envelope in await reading] == [b'{"n":2}']
    await transport.release(second)
    await transport.aclose()


#: A worker whose acks wait an hour for a round trip to share: none comes (its read waits
#: for new entries, and message 0 stays in hand), so what it handles stays unacked.
DOOMED = """
import asyncio, sys
from pybus import Dispatcher, redis_streams
from pybus.codec import default_name
from pybus.redis_streams import RedisTransport
from pybus.transport import Envelope
from tests.test_redis_streams import Paid

redis_streams._ACK_DELAY = 3600.0

async def main(url: str) -> None:
    dp = Dispatcher(transport=RedisTransport(url, group="billing", consumer="doomed", claim_idle=60))
    dp.route(Paid)

    async def handle(event: Paid) -> None:
        print(event.n, flush=True)
        if event.n == 0:
            await asyncio.Event().wait()

    dp.events.bind(Paid, handle)
    async with dp:
        await dp.consumer(wait=30).run()

asyncio.run(main(sys.argv[1]))
"""


async def test_a_worker_killed_before_its_acks_were_sent_has_those_messages_handled_again(
    redis_url: str,
) -> None:
    await publish(redis_url, 1)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DOOMED, redis_url, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        assert await process.stdout.readline() == b"0\n"
        # Written in one script call, so that one read takes them all: no read's check comes
        # after it to take their acks along.
        producer = RedisTransport(redis_url)
        await asyncio.gather(*(producer.send(envelope(n)) for n in range(1, 6)))
        await producer.aclose()
        handled = [await process.stdout.readline() for _ in range(5)]
        assert sorted(handled) == [b"%d\n" % n for n in range(1, 6)]
        assert await pending(redis_url) == 6  # handled, and not acked: the acks were waiting
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()
    seen: list[tuple[int, int]] = []

    async def record(event: Paid) -> None:
        delivery = current_envelope.get()
        assert delivery is not None
        seen.append((event.n, delivery.attempt))

    survivor = worker(redis_url, record, consumer="survivor", claim_idle=0.5, claim_interval=0.1)
    async with consuming(survivor) as consumer:
        await until(lambda: consumer.handled == 6)
    # Each handled again, as its second delivery: at least once, nothing lost.
    assert sorted(seen) == [(n, 2) for n in range(6)]
    assert await pending(redis_url) == 0
