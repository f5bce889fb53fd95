"""The Redis Streams transport when things are cut short, against a real redis-server:
reads and outcomes cancelled in the middle of a round trip, a redis-server restarted
without its data, settings that cannot work."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from pybus import Dispatcher, ImproperlyConfigured
from pybus.codec import default_name
from pybus.consumer import current_envelope
from pybus.redis_streams import RedisTransport
from pybus.redis_wire import entry_fields
from pybus.transport import Envelope
from tests.consuming import until
from tests.test_redis_streams import KEY, Boom, Paid, publish, raw, worker

NAMES = [default_name(Paid)]
A_DAY_MS = 24 * 3600 * 1000


async def untracked(client: Any) -> list[tuple[bytes, bytes, int, int]]:
    """The billing group's pending entries that were not given back as never delivered
    (idle a day, no delivery counted): (entry id, consumer, idle ms, deliveries)."""
    found = await client.xpending_range(KEY, "billing", min="-", max="+", count=1_000)
    return [
        (item["message_id"], item["consumer"], item["time_since_delivered"], item["times_delivered"])
        for item in found
        if item["time_since_delivered"] < A_DAY_MS // 2 or item["times_delivered"] != 0
    ]


async def ack_all(client: Any) -> None:
    for item in await client.xpending_range(KEY, "billing", min="-", max="+", count=1_000):
        await client.xack(KEY, "billing", item["message_id"])


async def cancel_after(task: asyncio.Task[Any], steps: int) -> Any:
    """Cancel `task` after `steps` turns of the event loop; its result if it finished first."""
    for _ in range(steps):
        await asyncio.sleep(0)
    task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        return None


# -- cancellations ------------------------------------------------------------------------------


async def test_a_read_cancelled_at_any_moment_leaves_no_entry_untracked(redis_url: str) -> None:
    """The consumer cancels the read in flight when it stops. Wherever that lands (in the
    non-blocking read, in a claim, in the read of this consumer's own entries, as new
    entries arrive in a blocking read), what Redis delivered is given back by aclose()
    (or was returned and is released, as the consumer does): nothing stays pending with a
    delivery counted, waiting for claim_idle."""
    client = raw(redis_url)
    leaks: list[tuple[int, list[Any]]] = []
    rng = random.Random(7)
    for round_ in range(300):
        transport = RedisTransport(redis_url, group="billing", consumer="w1", claim_idle=60)
        if round_ % 3 == 2:  # nothing to read: it blocks, and an entry arrives as it is cancelled
            reading = asyncio.create_task(transport.receive(NAMES, max_count=10, wait=5.0))
            await asyncio.sleep(0.01)
            await client.xadd(KEY, entry_fields(Envelope("event", NAMES[0], b'{"n":0}', f"m{round_}", "c")))
            steps = rng.randrange(3)
        else:
            await publish(redis_url, 1 + round_ % 2, start=round_)
            reading = asyncio.create_task(transport.receive(NAMES, max_count=10, wait=1.0))
            steps = rng.randrange(60)
        taken = await cancel_after(reading, steps)
        for envelope in taken or []:
            await transport.release(envelope)  # handed out and never started: the consumer gives it back
        await transport.aclose()
        left = await untracked(client)
        if left:
            leaks.append((round_, left))
        await ack_all(client)
    await client.aclose()
    assert leaks == []


async def test_entries_cancelled_reads_took_come_again_at_once_with_the_same_attempt(redis_url: str) -> None:
    """However many reads were cancelled, by consumers of the same name or others, the next
    consumer gets every entry at once (not after claim_idle) and as attempt 1."""
    await publish(redis_url, 20)
    for steps in range(100):
        transport = RedisTransport(redis_url, group="billing", consumer=f"w{steps % 3}", claim_idle=60)
        reading = asyncio.create_task(transport.receive(NAMES, max_count=20, wait=1.0))
        read = await cancel_after(reading, steps)
        if read is not None:  # it ended within `steps` turns: a cancellation has landed at every earlier one
            for envelope in read:
                await transport.release(envelope)
            await transport.aclose()
            break
        await transport.aclose()
    else:
        pytest.fail("a read took more than 100 turns of the event loop: not every turn was cut")
    transport = RedisTransport(redis_url, group="billing", consumer="last", claim_idle=60)
    taken = await transport.receive(NAMES, max_count=20, wait=1.0)
    assert sorted(envelope.body for envelope in taken) == sorted(b'{"n":%d}' % n for n in range(20))
    assert {envelope.attempt for envelope in taken} == {1}
    for envelope in taken:
        await transport.ack(envelope)
    await transport.aclose()


async def test_a_retry_cancelled_midway_still_counts_its_failure_and_is_given_back(redis_url: str) -> None:
    """The failure counts (the next delivery is attempt 2) and the entry is given back at
    close, so another consumer takes it at once, not after claim_idle."""
    client = raw(redis_url)
    for steps in range(1, 12):
        await publish(redis_url, 1, start=steps)
        transport = RedisTransport(redis_url, group="billing", consumer="w1", claim_idle=60)
        (envelope,) = await transport.receive(NAMES, max_count=1, wait=1.0)
        assert envelope.attempt == 1
        await cancel_after(asyncio.create_task(transport.retry(envelope, Boom("failed"))), steps)
        await transport.aclose()
        other = RedisTransport(redis_url, group="billing", consumer=f"other{steps}", claim_idle=60)
        again = await other.receive(NAMES, max_count=1, wait=0.5)
        assert [(item.message_id, item.attempt) for item in again] == [(envelope.message_id, 2)], steps
        await other.ack(again[0])
        await other.aclose()
        assert await client.xpending_range(KEY, "billing", min="-", max="+", count=10) == []
    await client.aclose()


async def test_graceful_stops_at_random_moments_never_count_a_delivery(redis_url: str) -> None:
    """Workers that never fail, stopped gracefully at random moments (the read in flight
    cancelled, handlings cancelled at the drain deadline) and restarted: every message is
    handled as attempt 1 and nothing is left pending. And messages that always fail are
    handled exactly max_deliveries times across such restarts."""
    attempts: dict[int, list[int]] = {}

    async def handle(event: Paid) -> None:
        envelope = current_envelope.get()
        assert envelope is not None
        await asyncio.sleep(random.choice([0, 0, 0.001]))
        attempts.setdefault(event.n, []).append(envelope.attempt)
        if event.n % 2:
            raise Boom(f"always {event.n}")

    count, rng = 300, random.Random(3)
    producing = asyncio.create_task(publish(redis_url, count))
    rounds = 0
    while not producing.done() or rounds < 10:
        dp = worker(redis_url, handle, consumer=rng.choice(["w1", f"w{rounds + 2}"]), claim_idle=30)
        concurrency = rng.choice([1, 4, 16])
        serving = asyncio.create_task(
            dp.serve(stop_signals=(), concurrency=concurrency, max_deliveries=3, wait=rng.choice([0.01, 0.5]))
        )
        await asyncio.sleep(rng.random() * 0.05)
        await dp.stop(0)
        await serving
        rounds += 1
    await producing
    dp = worker(redis_url, handle, consumer="last", claim_idle=30)
    serving = asyncio.create_task(dp.serve(stop_signals=(), concurrency=8, max_deliveries=3))
    await until(lambda: sum(len(seen) for seen in attempts.values()) >= count // 2 * 4, timeout=20)
    await dp.stop(5)
    await serving
    ok = {n: seen for n, seen in attempts.items() if n % 2 == 0}
    failing = {n: seen for n, seen in attempts.items() if n % 2}
    assert {n: seen for n, seen in ok.items() if seen != [1]} == {}
    assert {n: seen for n, seen in failing.items() if seen != [1, 2, 3]} == {}
    assert len(ok) + len(failing) == count
    client = raw(redis_url)
    assert (await client.xpending(KEY, "billing"))["pending"] == 0
    await client.aclose()


# -- redis-server restarted without its data ----------------------------------------------------


async def lose_everything(url: str) -> None:
    """What the clients of a redis-server restarted without its data see: every connection
    closed by the server, no keys, no scripts."""
    client = raw(url)
    await client.flushall()
    await client.script_flush()
    await client.execute_command("CLIENT", "KILL", "TYPE", "normal")  # all but this one
    await client.aclose()
    await asyncio.sleep(0.1)  # the clients' event loops see their connections close


async def test_after_redis_restarts_without_its_data_a_worker_consumes_again(redis_url: str) -> None:
    """The stream and the group are gone: the worker's read fails once with NOGROUP (the
    error hook hears of it), creates them again, and handles what is sent next."""
    seen: list[int] = []
    errors: list[str] = []
    transport = RedisTransport(redis_url, group="billing", consumer="w1", timeout=1.0)
    dp = Dispatcher(transport=transport, on_error=lambda error, message: errors.append(str(error)))
    dp.route(Paid)
    dp.events.bind(Paid, lambda event: seen.append(event.n))
    serving = asyncio.create_task(dp.serve(stop_signals=(), wait=0.2))
    await publish(redis_url, 1)
    await until(lambda: seen == [0])
    await lose_everything(redis_url)
    await publish(redis_url, 3, start=1)  # a new producer: sending after a restart is tested below
    await until(lambda: sorted(seen) == [0, 1, 2, 3], timeout=10)
    await dp.stop(5)
    await serving
    gone = [error for error in errors if "NOGROUP" in error]
    assert len(gone) <= 1, errors
    assert all("they are created again at the next read" in error for error in gone)


async def test_a_send_right_after_a_restart_succeeds(redis_url: str) -> None:
    """Each pooled connection the server closed is replaced before anything is written to it."""
    producer = RedisTransport(redis_url, timeout=1.0)
    envelopes = [Envelope("event", "x", b"", f"m{n}", f"m{n}") for n in range(3)]
    await asyncio.gather(*(producer.send(envelope) for envelope in envelopes))
    await lose_everything(redis_url)
    for envelope in envelopes:  # one at a time: each on a connection the server closed
        assert await producer.send(envelope)
    await producer.aclose()


# -- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_len", [0, -1, 1.5, True, "100"])
def test_max_len_below_one_is_refused_at_construction(max_len: Any) -> None:
    with pytest.raises(ImproperlyConfigured) as refused:
        RedisTransport("redis://localhost:1/0", max_len=max_len)
    assert str(refused.value) == (
        f"max_len must be None (no trimming) or a whole number of entries >= 1, not {max_len!r}"
    )


async def test_max_len_of_one_trims_to_one_entry_without_a_trim_error(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    producer = RedisTransport(redis_url, max_len=1)
    for n in range(100):  # the 100th send trims
        await producer.send(Envelope("event", "x", b"", f"m{n}", f"m{n}"))
    await producer.aclose()
    client = raw(redis_url)
    assert await client.xlen("pybus:x") == 1
    await client.aclose()
    assert [record for record in caplog.records if "trim" in record.getMessage()] == []
