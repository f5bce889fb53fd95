"""The Redis Streams transport against a real redis-server (one per test)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis

from pybus import Dispatcher, Event, HandlingContext, TransportError, current_context
from pybus.codec import default_name
from pybus.consumer import Consumer
from pybus.redis_dead_letters import RedisDeadLetters
from pybus.redis_streams import RedisTransport
from pybus.transport import Envelope
from tests.consuming import consuming, until
from tests.redis_server import redis_server


@dataclass(frozen=True)
class Paid(Event):
    n: int


KEY = f"pybus:{default_name(Paid)}"


def raw(url: str) -> Any:
    """A plain redis-py client, to look at the streams (typed loosely: replies are bytes)."""
    return aioredis.Redis.from_url(url)


async def pending(url: str) -> int:
    """How many entries the billing group has pending."""
    client = raw(url)
    try:
        return int((await client.xpending(KEY, "billing"))["pending"])
    finally:
        await client.aclose()


class Boom(Exception):
    pass


def shop(url: str, **options: object) -> Dispatcher:
    dp = Dispatcher(transport=RedisTransport(url, group="shop", **options))  # type: ignore[arg-type]
    dp.route(Paid)
    return dp


def worker(
    url: str,
    handler: Callable[[Paid], object],
    *,
    consumer: str = "w1",
    on_error: Callable[[BaseException, object], object] = lambda error, message: None,
    **options: object,
) -> Dispatcher:
    transport = RedisTransport(url, group="billing", consumer=consumer, **options)  # type: ignore[arg-type]
    dp = Dispatcher(transport=transport, on_error=on_error)
    dp.route(Paid)
    dp.events.bind(Paid, handler)
    return dp


async def publish(url: str, count: int, start: int = 0) -> None:
    async with shop(url) as dp:
        for n in range(start, start + count):
            await dp.publish(Paid(n))
    assert dp.transport is not None
    await dp.transport.aclose()


async def read_up_to(client: Any, consumer: Consumer, entry_id: str, *, pending: int) -> None:
    """Wait (bounded) until the billing group has read up to `entry_id` and has `pending` left."""
    async with asyncio.timeout(10):
        while True:
            await consumer.transport.flush()
            (group,) = await client.xinfo_groups(KEY)
            if group["last-delivered-id"].decode() == entry_id and group["pending"] == pending:
                return
            await asyncio.sleep(0.01)


async def test_round_trip_and_ack(redis_url: str) -> None:
    seen: list[int] = []
    await publish(redis_url, 100)
    async with consuming(worker(redis_url, lambda event: seen.append(event.n))) as consumer:
        await until(lambda: consumer.handled == 100)
    assert sorted(seen) == list(range(100))
    assert await pending(redis_url) == 0


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
    async with RedisDeadLetters(redis_url) as dead:
        letters = await dead.letters()
    assert deliveries == 4
    reasons = sorted(letter.reason for letter in letters)
    assert reasons[0].startswith("Cannot decode a message named")
    assert reasons[1].startswith("failed 4 times; last error: HandlerFailures: ")
    assert "Boom: poison" in reasons[1]
    poison = next(letter for letter in letters if letter.envelope.attempt == 4)
    assert poison.error == f"{Boom.__module__}.Boom: poison"
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
    async with consuming(dp, max_deliveries=1) as consumer, RedisDeadLetters(redis_url) as dead:
        await until(lambda: consumer.dead_lettered == 1)
        (letter,) = await dead.letters()
        fail = False
        await dead.requeue(letter.id)
        await until(lambda: handled == [0])
        assert await dead.letters() == []
        with pytest.raises(TransportError, match=r"No dead letter"):
            await dead.requeue(letter.id)
        assert await dead.purge() == 0


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
        # The group read the second entry and nothing is pending: its copy was acked, not handled.
        await read_up_to(client, consumer, second, pending=0)
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
    with pytest.raises(TransportError) as raised:
        await transport.send(Envelope("event", "x", b"", "id", "id"))
    assert raised.value.maybe_written is False
    assert str(raised.value).startswith("Could not write x (message id id) to Redis: ConnectionError: ")
    assert str(raised.value).endswith("; no connection was made, so nothing was sent and it was not written")
    await transport.aclose()


async def test_a_send_that_fails_otherwise_raises_that_error_instead_of_waiting_forever() -> None:
    from tests.redis_server import free_port

    transport = RedisTransport(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)

    async def broken(commands: Any, connected: Any = None) -> list[Any]:
        raise ValueError("not a Redis error")

    transport._execute = broken  # type: ignore[method-assign]  # a failure that is no RedisError
    sends = [transport.send(Envelope("event", "x", b"", f"id{n}", f"id{n}")) for n in range(3)]
    async with asyncio.timeout(5):
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
    assert [repr(outcome) for outcome in outcomes] == [repr(ValueError("not a Redis error"))] * 3
    await transport.aclose()


# -- a message sent twice: neither copy may be lost ------------------------------------------


async def test_a_copy_skipped_while_the_first_is_in_hand_does_not_hide_its_failure(redis_url: str) -> None:
    """E1 is in hand, E2 (same message id) arrives and is acked as a duplicate, then E1
    fails: E1 must be retried and take effect, not be skipped as already done."""
    client = raw(redis_url)
    handlings: list[int] = []
    in_hand = asyncio.Event()
    copy_acked = asyncio.Event()

    async def first_fails(event: Paid) -> None:
        handlings.append(event.n)
        if len(handlings) == 1:
            in_hand.set()
            await copy_acked.wait()
            raise Boom("first attempt")

    producer = RedisTransport(redis_url)
    envelope = Envelope("event", default_name(Paid), b'{"n": 7}', "same-id", "same-id")
    await producer.send(envelope)
    async with consuming(worker(redis_url, first_fails)) as consumer:
        await until(in_hand.is_set)
        second = await producer.send(envelope)  # e.g. a producer's retry after a timeout
        await read_up_to(client, consumer, second, pending=1)  # the copy was acked: the first is pending
        assert handlings == [7]
        copy_acked.set()
        await until(lambda: consumer.handled == 1)
    await producer.aclose()
    assert handlings == [7, 7]  # the failed first attempt, then the retry: took effect once
    assert consumer.dead_lettered == 0
    assert (await client.xpending(KEY, "billing"))["pending"] == 0
    await client.aclose()


# -- a send that wrote its entry never raises ------------------------------------------------


async def test_a_failing_trim_is_logged_and_never_fails_a_send(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = raw(redis_url)
    # A producer whose user may not run XTRIM: every trim fails, every XADD works.
    await client.acl_setuser("producer", enabled=True, nopass=True, commands=["+@all", "-xtrim"], keys=["*"])
    producer = RedisTransport(redis_url.replace("//", "//producer:x@"), max_len=50)
    ids = [await producer.send(Envelope("event", "x", b"", f"m{n}", f"m{n}")) for n in range(200)]
    await producer.aclose()  # waits for the trims started in the background
    assert len(ids) == 200  # the 100th and the 200th send started a trim: both returned their entry
    assert await client.xlen("pybus:x") == 200
    trims = [record for record in caplog.records if "Could not trim pybus:x" in record.getMessage()]
    assert trims
    assert {(record.name, record.levelname) for record in trims} == {("pybus", "WARNING")}
    assert "no permissions to run the 'xtrim' command" in trims[0].getMessage()
    assert "the sends were written" in trims[0].getMessage()
    await client.aclose()


async def test_a_send_cut_off_after_it_reached_redis_may_have_been_written() -> None:
    with redis_server() as (url, process):
        client = raw(url)
        producer = RedisTransport(url, timeout=0.5)
        await producer.send(Envelope("event", "x", b"", "m1", "m1"))  # connected
        process.send_signal(signal.SIGSTOP)  # the server stops answering, the socket stays open
        try:
            with pytest.raises(TransportError) as raised:
                await producer.send(Envelope("event", "x", b"", "m2", "m2"))
        finally:
            process.send_signal(signal.SIGCONT)
        assert raised.value.maybe_written is True
        assert str(raised.value) == (
            "Could not write x (message id m2) to Redis within 0.5 s: TimeoutError; the command may "
            "have reached Redis, so it may have been written and be delivered"
        )
        assert "again" not in str(raised.value)  # no advice to resend: publish gives a new id
        async with asyncio.timeout(10):  # and indeed it was: Redis ran it once it resumed
            while await client.xlen("pybus:x") < 2:  # noqa: ASYNC110 - Redis has no event for it
                await asyncio.sleep(0.01)
        await producer.aclose()
        await client.aclose()


def test_transport_error_keeps_its_plain_constructor() -> None:
    assert str(TransportError("broker away")) == "broker away"
    assert TransportError("broker away").maybe_written is False
    assert TransportError("cut off", maybe_written=True).maybe_written is True


# -- release: giving back is no delivery ------------------------------------------------------


async def test_graceful_restarts_that_release_never_count_as_deliveries(redis_url: str) -> None:
    """Consumers that stop gracefully give back what they hold with release(). However often
    that happens, the next delivery has the same attempt, whether it is the same consumer
    reading its own pending entries after a restart, or another one claiming them at once
    (not after claim_idle), so that max_deliveries counts failed handlings only."""
    await publish(redis_url, 10)
    names = [default_name(Paid)]
    for name in ("w0", "w0", "w1", "w1", "w2", "w0"):
        transport = RedisTransport(redis_url, group="billing", consumer=name, claim_idle=60)
        taken = await transport.receive(names, max_count=10, wait=1.0)
        assert sorted(envelope.body for envelope in taken) == sorted(b'{"n":%d}' % n for n in range(10))
        assert [envelope.attempt for envelope in taken] == [1] * 10, name
        for envelope in taken:
            await transport.release(envelope)
        await transport.aclose()
    failed: set[int] = set()

    def fails_once(event: Paid) -> None:
        if event.n not in failed:
            failed.add(event.n)
            raise Boom(f"first attempt of {event.n}")

    async with consuming(worker(redis_url, fails_once, claim_idle=60), max_deliveries=2) as consumer:
        await until(lambda: consumer.handled == 10)
    assert consumer.failed == 10
    assert consumer.dead_lettered == 0  # each failed once, at attempt 1 of 2


# -- exactly max_deliveries ---------------------------------------------------------------------


async def test_a_message_that_always_fails_is_handled_exactly_max_deliveries_times(redis_url: str) -> None:
    handlings: dict[int, int] = {}

    async def always_fails(event: Paid) -> None:
        handlings[event.n] = handlings.get(event.n, 0) + 1
        await asyncio.sleep(0.3)  # in flight longer than claim_idle, while claims run
        raise Boom(f"always {event.n}")

    await publish(redis_url, 2)  # fewer than the concurrency: the consumer keeps reading and claiming
    dp = worker(redis_url, always_fails, claim_idle=0.2, claim_interval=0.05)
    async with consuming(dp, concurrency=4, max_deliveries=5) as consumer:
        await until(lambda: consumer.dead_lettered >= 2, timeout=20)
    assert handlings == {0: 5, 1: 5}
    async with RedisDeadLetters(redis_url) as dead:
        letters = await dead.letters()
    assert [letter.envelope.attempt for letter in letters] == [5, 5]
    assert await pending(redis_url) == 0  # nothing left to deliver


async def test_two_live_consumers_never_take_each_others_work_in_progress(redis_url: str) -> None:
    handlings: dict[int, int] = {}

    async def always_fails(event: Paid) -> None:
        handlings[event.n] = handlings.get(event.n, 0) + 1
        await asyncio.sleep(0.45)  # longer than claim_idle: the holder keeps the entry fresh
        raise Boom(f"always {event.n}")

    await publish(redis_url, 6)
    options: dict[str, Any] = {"claim_idle": 0.3, "claim_interval": 0.05}
    first = worker(redis_url, always_fails, consumer="w1", **options)
    second = worker(redis_url, always_fails, consumer="w2", **options)
    async with (
        consuming(first, concurrency=4, max_deliveries=3) as one,
        consuming(second, concurrency=4, max_deliveries=3) as two,
    ):
        await until(lambda: one.dead_lettered + two.dead_lettered >= 6, timeout=20)
    assert handlings == dict.fromkeys(range(6), 3)
    assert one.dead_lettered + two.dead_lettered == 6


# -- reclaiming a dead consumer's entries ---------------------------------------------------------


async def test_an_idle_consumer_blocked_in_a_long_read_reclaims_within_the_bound(redis_url: str) -> None:
    claim_idle, claim_interval = 0.5, 0.25
    await publish(redis_url, 50)
    dead = RedisTransport(redis_url, group="billing", consumer="dead", claim_idle=claim_idle)
    assert len(await dead.receive([default_name(Paid)], max_count=50, wait=1.0)) == 50
    seen: list[int] = []
    survivor = worker(
        redis_url, lambda event: seen.append(event.n), claim_idle=claim_idle, claim_interval=claim_interval
    )
    # wait=5: with nothing new to read, each read would block 5 s, far past the next claim.
    async with consuming(survivor, wait=5.0):
        await asyncio.sleep(0.3)  # let the survivor settle into its blocking read
        await dead.aclose()  # it stops without acking or giving back what it was handling
        died = time.monotonic()
        await until(lambda: len(seen) == 50)
        took = time.monotonic() - died
    assert sorted(seen) == list(range(50))
    # The documented bound; entries go idle when their holder stops refreshing them.
    assert took <= claim_idle + claim_interval + 1.0, took


async def test_a_restarted_consumer_reads_many_own_pending_entries_once_each(redis_url: str) -> None:
    await publish(redis_url, 1_200)
    first = RedisTransport(redis_url, group="billing", consumer="w1", claim_idle=60)
    assert len(await first.receive([default_name(Paid)], max_count=1_200, wait=1.0)) == 1_200
    await first.aclose()  # dies holding them all
    handled: list[int] = []

    async def in_hand_a_while(event: Paid) -> None:
        await asyncio.sleep(0.005)  # still in hand when the next few are read
        handled.append(event.n)

    restarted = worker(redis_url, in_hand_a_while, claim_idle=60)
    async with consuming(restarted, concurrency=16, prefetch=4) as consumer:  # reads a few at a time
        await until(lambda: consumer.handled == 1_200)
    assert sorted(handled) == list(range(1_200))  # each once: none read again while in hand
    assert await pending(redis_url) == 0


async def test_a_retry_never_takes_back_an_entry_another_consumer_claimed(redis_url: str) -> None:
    await publish(redis_url, 1)
    slow = RedisTransport(redis_url, group="billing", consumer="slow", claim_idle=60)
    (envelope,) = await slow.receive([default_name(Paid)], max_count=1, wait=1.0)
    client = raw(redis_url)
    entry_id = envelope.receipt[1]  # type: ignore[index]
    # Another consumer claimed it meanwhile (as it would from a consumer stalled past claim_idle).
    await client.xclaim(KEY, "billing", "other", min_idle_time=0, message_ids=[entry_id])
    await slow.retry(envelope, Boom("failed here"))
    assert await slow.receive([default_name(Paid)], max_count=1, wait=0) == []  # not handed out again
    ((_, owner, _, deliveries),) = [
        (item["message_id"], item["consumer"], 0, item["times_delivered"])
        for item in await client.xpending_range(KEY, "billing", min="-", max="+", count=10)
    ]
    assert (owner, deliveries) == (b"other", 2)  # still the other consumer's; no delivery added
    await slow.aclose()
    await client.aclose()


async def test_ids_and_headers_cross_redis_into_the_workers_handling_context(redis_url: str) -> None:
    sender = Dispatcher(transport=RedisTransport(redis_url, group="shop"))
    sender.route(Paid)
    sender.add_header_source(lambda headers: headers.update(traceparent="00-abc-def-01"))
    sent: list[HandlingContext] = []

    @sender.commands.register(Charge)
    async def charge(cmd: Charge) -> Paid:
        context = current_context()
        assert context is not None
        sent.append(context)
        return Paid(cmd.n)

    got: list[HandlingContext] = []

    def remember(event: Paid) -> None:
        context = current_context()
        assert context is not None
        got.append(context)

    async with sender, consuming(worker(redis_url, remember)) as consumer:
        await sender.execute(Charge(1))
        await until(lambda: consumer.handled == 1)
    assert sender.transport is not None
    await sender.transport.aclose()
    (root,), (delivered,) = sent, got
    assert delivered.correlation_id == delivered.causation_id == root.message_id
    assert delivered.message_id != root.message_id
    assert dict(delivered.headers) == {"traceparent": "00-abc-def-01"}
    assert (delivered.kind, delivered.handler, delivered.delivery) == ("event", "remember", 1)


@dataclass(frozen=True)
class Charge:
    n: int
