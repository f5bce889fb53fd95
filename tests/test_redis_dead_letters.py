"""Dead letters of the Redis transport: what `pybus dlq` and `RedisDeadLetters` show and do,
against a real redis-server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import traceback
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from pybus import Dispatcher, Event, TransportError
from pybus.codec import default_name
from pybus.redis_dead_letters import RedisDeadLetters, error_line
from pybus.redis_streams import RedisTransport
from pybus.redis_wire import entry_fields
from pybus.transport import Envelope
from tests.consuming import consuming, until
from tests.test_redis_workers import ROOT, SCRIPT, effects, produce_with, start_worker, stop, wait_for

JOBS = "pybus:examples.jobs"


@dataclass(frozen=True)
class Charged(Event):
    n: int


def pybus_dlq(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), "dlq", "examples.redis_worker:create_worker", *args],
        cwd=ROOT, env={**os.environ, "REDIS_URL": url}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def formatted(error: BaseException) -> str:
    """A reason as the consumer writes it for a failed handling."""
    first = f"failed 5 times; last error: {type(error).__name__}: {error}\n"
    return first + "".join(traceback.format_exception(error))


class Tricky(Exception):
    """An error whose message looks like the end of a traceback."""

    def __str__(self) -> str:
        return "line one\nTraceback (most recent call last):\n  fake\nValueError: fake inner"


def tricky() -> None:
    raise Tricky()


def multi_line() -> None:
    raise ValueError("multi\nline message")


def both_in_group() -> None:
    errors: list[Exception] = []
    for make in (tricky, multi_line):
        error = raised(make)
        assert isinstance(error, Exception)
        error.add_note("raised by handle handling event Paid")  # as the engine notes it
        errors.append(error)
    raise ExceptionGroup("publishing Paid: 2 event handler(s) failed", errors)


def nested_groups() -> None:
    try:
        two_in_group()
    except ExceptionGroup as exc:
        raise ExceptionGroup("publishing Paid: 2 event handler(s) failed", [exc, KeyError("k")]) from None


def no_message() -> None:
    raise TimeoutError


def raised(make: Any) -> BaseException:
    try:
        make()
    except BaseException as exc:
        return exc
    raise AssertionError("did not raise")


def bad_amount() -> None:
    raise ValueError("bad amount")


def chained() -> None:
    try:
        bad_amount()
    except ValueError as exc:
        raise KeyError("order-7") from exc


def in_group() -> None:
    try:
        chained()
    except KeyError as exc:
        raise ExceptionGroup("publishing Paid: 1 event handler(s) failed", [exc]) from None


def two_in_group() -> None:
    raise ExceptionGroup("publishing Paid: 2 event handler(s) failed", [ValueError("a"), TypeError("b")])


def group_then_outer() -> None:
    try:
        two_in_group()
    except ExceptionGroup:
        raise RuntimeError("outer") from None


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (bad_amount, "ValueError: bad amount"),
        (chained, "KeyError: 'order-7'"),  # the outermost, not its cause
        (in_group, "KeyError: 'order-7'"),  # an event handler's error, unwrapped from publish's group
        (two_in_group, "ValueError: a; TypeError: b"),
        (group_then_outer, "RuntimeError: outer"),
        (tricky, "Tricky: line one\\nTraceback (most recent call last):\\n  fake\\nValueError: fake inner"),
        (multi_line, "ValueError: multi\\nline message"),
        (
            both_in_group,
            f"{__name__}.Tricky: line one\\nTraceback (most recent call last):\\n  fake"
            "\\nValueError: fake inner; ValueError: multi\\nline message",
        ),
        (nested_groups, "ValueError: a; TypeError: b; KeyError: 'k'"),
        (no_message, "TimeoutError"),
    ],
)
def test_the_error_line_is_the_errors_own_type_and_message(make: Any, expected: str) -> None:
    error = raised(make)
    error.add_note("delivery 5 of Paid (message id m1)")  # as the consumer adds
    assert error_line(formatted(error)) == expected


def test_a_reason_not_written_by_the_consumer_shows_its_tracebacks_error() -> None:
    reason = "given up by hand\n" + "".join(traceback.format_exception(raised(chained)))
    assert error_line(reason) == "KeyError: 'order-7'"


async def test_a_dead_letter_stores_its_error_on_one_line(redis_url: str) -> None:
    def fails(event: Charged) -> None:
        if event.n == 0:
            raise ValueError("multi\nline message")
        raise Tricky()

    transport = RedisTransport(redis_url, group="billing", consumer="w1")
    dp = Dispatcher(transport=transport, on_error=lambda error, message: None)
    dp.route(Charged)
    dp.events.bind(Charged, fails)
    await send_jobs(redis_url, Charged(0), Charged(1))
    async with consuming(dp, max_deliveries=1) as consumer:
        await until(lambda: consumer.dead_lettered == 2)
    async with RedisDeadLetters(redis_url) as dead:
        letters = sorted(await dead.letters(), key=lambda letter: letter.envelope.body)
    assert [letter.error for letter in letters] == [
        "ValueError: multi\\nline message",
        f"{__name__}.Tricky: line one\\nTraceback (most recent call last):\\n  fake\\nValueError: fake inner",
    ]
    assert [letter.stored_error for letter in letters] == [letter.error for letter in letters]
    assert "Traceback (most recent call last):" in letters[1].reason  # the reason is kept whole


def test_a_reason_without_a_traceback_is_its_own_first_line() -> None:
    assert (
        error_line("Cannot decode a message named 'x': bad JSON\nmore")
        == "Cannot decode a message named 'x': bad JSON"
    )
    assert error_line("") == ""


def test_dlq_list_shows_the_error_and_keeps_the_traceback(redis_url: str) -> None:
    from examples.redis_worker import Job

    url = redis_url
    asyncio.run(produce_with(url, 20, seconds=0))
    asyncio.run(send_jobs(url, Job(20, -1.0)))  # fails every time: dead-lettered after 5 deliveries
    worker = start_worker(url, "w", concurrency=2)
    try:
        wait_for(lambda: len(effects(url)) == 20 and pybus_dlq(url, "list").stdout, 20, "the dead letter")
    finally:
        stop(worker)
    listed = pybus_dlq(url, "list")
    (line,) = listed.stdout.splitlines()
    dead_id, name, attempts, _, error = line.split("  ", 4)
    assert (name, attempts, error) == (
        "examples.jobs",
        "attempts=5",
        "ValueError: job 20 cannot take -1.0 seconds",
    )

    async def reason() -> str:
        async with RedisDeadLetters(url) as dead:
            return (await dead.get(dead_id)).reason

    full = asyncio.run(reason())  # the whole traceback is kept
    assert "Traceback (most recent call last):\n" in full
    assert '    raise ValueError(f"job {job.n} cannot take {job.seconds} seconds")\n' in full


async def send_jobs(url: str, *jobs: object) -> None:
    from examples.redis_worker import ROUTE, Job

    dp = Dispatcher(transport=RedisTransport(url, group="producer"))
    for job in jobs:
        dp.route(type(job), name=ROUTE if type(job) is Job else None)
    async with dp:
        for job in jobs:
            await dp.publish(job)
    assert dp.transport is not None
    await dp.transport.aclose()


def test_dlq_requeue_finds_a_dead_letter_past_the_first_ten_thousand(redis_url: str) -> None:
    url = redis_url
    envelope = Envelope("event", "examples.jobs", b'{"n": 1}', "m-last", "m-last")
    client: Any = redis.Redis.from_url(url)
    client.xgroup_create(JOBS, "jobs", id="0", mkstream=True)
    for start in range(0, 10_050, 1_000):
        with client.pipeline(transaction=False) as pipe:
            for n in range(start, min(start + 1_000, 10_050)):
                filler = Envelope("event", "examples.jobs", b'{"n": 0}', f"m{n}", f"m{n}")
                fields = {**entry_fields(filler), "reason": "old", "attempt": "5", "stream": JOBS}
                pipe.xadd("pybus:dead", {**fields, "entry_id": "1-1", "group": "jobs"})
            pipe.execute()
    asyncio.run(dead_letter_one(url, envelope))  # the 10,051st, written the transport's own way
    (last_id, _), *_ = client.xrevrange("pybus:dead", count=1)
    requeued = pybus_dlq(url, "requeue", last_id.decode())
    assert requeued.returncode == 0, requeued.stderr
    assert requeued.stdout.startswith(f"{last_id.decode()} -> ")
    assert client.xlen("pybus:dead") == 10_050
    assert client.xrange("pybus:dead", last_id, last_id) == []
    ((_, fields),) = client.xrevrange(JOBS, count=1)  # the new entry, for the jobs group only
    assert (fields[b"i"], fields[b"b"], fields[b"g"]) == (b"m-last", b'{"n": 1}', b"jobs")
    client.close()


async def dead_letter_one(url: str, envelope: Envelope) -> None:
    transport = RedisTransport(url, group="jobs", consumer="w")
    await transport.send(envelope)
    (taken,) = await transport.receive([envelope.name], max_count=1, wait=1.0)
    await transport.dead_letter(taken, "failed 5 times; last: ValueError: no")
    await transport.aclose()


@pytest.mark.parametrize("dead_id", ["1-1", "nonsense"])
async def test_requeue_of_a_missing_dead_letter_says_so(redis_url: str, dead_id: str) -> None:
    async with RedisDeadLetters(redis_url) as dead:
        with pytest.raises(TransportError, match=rf"^No dead letter '{dead_id}' in pybus:dead"):
            await dead.requeue(dead_id)


@dataclass(frozen=True)
class Paid(Event):
    amount: int = 1


async def test_a_requeued_dead_letter_is_for_the_group_that_gave_up_on_it_only(redis_url: str) -> None:
    """Billing dead-letters a message that shipping handled; requeuing it gives it to billing
    again, and never to shipping, even once shipping's record of handled ids has expired."""
    name = default_name(Paid)
    billing_seen: list[str] = []
    fail = True

    def billing(event: Paid) -> None:
        if fail:
            raise RuntimeError("billing is down")
        billing_seen.append("paid")

    shipping = RedisTransport(redis_url, group="shipping", consumer="s")
    dp = Dispatcher(
        transport=RedisTransport(redis_url, group="billing", consumer="b"), on_error=lambda e, m: None
    )
    dp.route(Paid)
    dp.events.bind(Paid, billing)
    async with consuming(dp, max_deliveries=1) as consumer, RedisDeadLetters(redis_url) as dead:
        await dp.publish(Paid())
        (handled,) = await shipping.receive([name], max_count=10, wait=1.0)
        await shipping.ack(handled)
        await shipping.flush()
        await until(lambda: consumer.dead_lettered == 1)
        (letter,) = await dead.letters()
        assert letter.group == "billing"
        fail = False
        await dead.requeue(letter.id)
        await until(lambda: billing_seen == ["paid"])
    client: Any = aioredis.Redis.from_url(redis_url)
    await client.delete("pybus:done:shipping")  # as if dedupe_window had passed
    await client.aclose()
    assert await shipping.receive([name], max_count=10, wait=0.2) == []
    await shipping.flush()
    assert (await shipping.client.xpending(f"pybus:{name}", "shipping"))["pending"] == 0  # acked, unhandled
    await shipping.aclose()
