"""The Redis transport's acks and stops, against a real redis-server: acks sent while the
next read still waits, and sends, consumer stops and dispatcher stops that return within
their documented bounds when cancellations are lost inside redis-py, injected at random
moments, or when the server is stalled (SIGSTOP)."""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pybus import Dispatcher, State, TransportError, redis_streams
from pybus.codec import default_name
from pybus.redis_streams import RedisTransport
from pybus.redis_wire import SHA
from pybus.transport import Envelope
from tests.consuming import consuming, until
from tests.redis_server import redis_server
from tests.test_redis_recovery import untracked
from tests.test_redis_streams import KEY, Boom, Paid, pending, publish, raw, worker

#: What a stop may take past its drain timeout with a healthy redis-server: the
#: give-backs and the last acks, one round trip each, on a machine running the suite.
SLACK = 1.0


@pytest.fixture
def lost_cancellations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The first cancellation that lands in a redis-py socket write or read is lost: the
    call goes on as if nothing had happened. CPython 3.11's `asyncio.wait_for`, which
    redis-py wraps writes in, loses one that lands as the write completes; this is that
    fault at every call, reads included, so that code relying on one cancellation is
    caught. Writes take up to 2 ms, so that cancellations land in them. Yields a
    one-item list counting the cancellations lost."""
    lost = [0]
    rng = random.Random(7)

    async def uncancellable(call: Any) -> Any:
        running = asyncio.ensure_future(call)
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            if not running.done():
                lost[0] += 1  # and the call goes on; a second cancellation is not lost
            try:
                return await running
            except asyncio.CancelledError:
                running.cancel()
                raise

    send, read = AbstractConnection.send_packed_command, AbstractConnection.read_response

    async def send_packed_command(self: Any, command: Any, check_health: bool = True) -> None:
        async def write() -> None:
            await asyncio.sleep(rng.uniform(0, 0.002))
            await send(self, command, check_health)

        await uncancellable(write())

    async def read_response(self: Any, *args: Any, **kwargs: Any) -> Any:
        return await uncancellable(read(self, *args, **kwargs))

    monkeypatch.setattr(AbstractConnection, "send_packed_command", send_packed_command)
    monkeypatch.setattr(AbstractConnection, "read_response", read_response)
    return lost


# -- acks ---------------------------------------------------------------------------------------


async def test_acks_are_sent_while_the_next_read_still_waits(redis_url: str) -> None:
    """A read waits up to `wait` (here 30 s) for new entries; the acks of what was handled
    meanwhile do not wait for it: Redis has them within a round trip or so."""

    async def handle(event: Paid) -> None:
        await asyncio.sleep(0.01)  # by then the next read waits for new entries

    dp = worker(redis_url, handle, claim_interval=60)
    transport = dp.transport
    assert isinstance(transport, RedisTransport)
    async with consuming(dp, wait=30) as consumer:
        await until(lambda: transport._read_waiting)
        total = 0
        for size in (1, 10, 1):
            await publish(redis_url, size, start=total)
            total += size
            await until(lambda: consumer.handled == total)  # noqa: B023 - awaited in the loop
            async with asyncio.timeout(1):
                while await pending(redis_url):  # noqa: ASYNC110 - another process's state
                    await asyncio.sleep(0.002)
            assert transport._read_waiting  # the read after the handling has not returned
        assert consumer.handled == 12


async def test_an_ack_round_trip_that_fails_reaches_the_error_hook_and_its_acks_are_sent_later(
    redis_url: str,
) -> None:
    errors: list[tuple[BaseException, object]] = []
    handled: list[int] = []

    async def handle(event: Paid) -> None:
        await asyncio.sleep(0.01)  # the ack is sent while the next read waits, not with it
        handled.append(event.n)

    dp = worker(
        redis_url, handle, claim_interval=60, on_error=lambda error, message: errors.append((error, message))
    )
    transport = dp.transport
    assert isinstance(transport, RedisTransport)
    original = transport._execute
    failing = [1]

    async def execute(commands: Any, connected: Any = None) -> list[Any]:
        if failing and all(command[:2] == ("EVALSHA", SHA["ack"]) for command in commands):
            failing.pop()  # the first round trip of acks alone
            raise RedisConnectionError("the connection dropped")
        return await original(commands, connected)

    transport._execute = execute  # type: ignore[method-assign]
    async with consuming(dp, wait=30) as consumer:
        await until(lambda: transport._read_waiting)
        await publish(redis_url, 1)
        await until(lambda: consumer.handled == 1)
        await until(lambda: transport._ack_failure is not None)
        # Tried again on its own, no other ack or read needed (the read still waits).
        async with asyncio.timeout(2):
            while await pending(redis_url):  # noqa: ASYNC110 - another process's state
                await asyncio.sleep(0.005)
        assert transport._read_waiting
        await publish(redis_url, 1, start=1)  # its ack() raises the failure: the hook hears of it
        await until(lambda: len(errors) == 1)
        async with asyncio.timeout(5):
            while await pending(redis_url):  # noqa: ASYNC110 - another process's state
                await asyncio.sleep(0.005)
    error, message = errors[0]
    assert isinstance(error, TransportError)
    assert str(error) == (
        "Could not ack 1 message(s): ConnectionError: the connection dropped; they stay pending in "
        "Redis and the acks are sent again with the next ones (or by aclose())"
    )
    assert isinstance(message, Envelope)  # reported with the envelope whose ack() raised it
    assert message.body == b'{"n":1}'
    assert handled == [0, 1]  # each once: nothing was handled again


async def test_a_consumer_of_several_streams_holds_no_more_than_concurrency_plus_prefetch(
    redis_url: str,
) -> None:
    """XREADGROUP over several streams takes up to COUNT from each; a read of `prefetch`
    takes `prefetch` in all, so a consumer of three routed names holds at most 1 + 2."""
    release = asyncio.Event()

    async def handle(event: Any) -> None:
        await release.wait()

    names = ["a", "b", "c"]
    producer = Dispatcher(transport=RedisTransport(redis_url, group="shop"))
    dp = Dispatcher(transport=RedisTransport(redis_url, group="billing", consumer="w1"))
    for name in names:
        producer.route(name, name=name)
        dp.route(name, name=name)
        dp.events.bind(name, handle)
    async with producer:
        for _ in range(10):
            for name in names:
                await producer.publish(name)
    client = raw(redis_url)
    most = 0
    async with consuming(dp, concurrency=1, prefetch=2) as consumer:
        await until(lambda: consumer.handled == 0 and consumer._held == 3)
        for _ in range(40):
            counts = [(await client.xpending(f"pybus:{name}", "billing"))["pending"] for name in names]
            most = max(most, sum(counts))
            await asyncio.sleep(0.005)
        release.set()
        await until(lambda: consumer.handled == 30)
    await client.aclose()
    assert producer.transport is not None
    await producer.transport.aclose()
    assert most == 3


async def test_a_busy_stream_does_not_keep_a_consumer_from_its_other_streams(redis_url: str) -> None:
    order: list[str] = []

    async def handle(event: Any) -> None:
        order.append(event)

    producer = Dispatcher(transport=RedisTransport(redis_url, group="shop"))
    dp = Dispatcher(transport=RedisTransport(redis_url, group="billing", consumer="w1"))
    for name in ("busy", "quiet"):
        producer.route(name, name=name)
        dp.route(name, name=name)
        dp.events.bind(name, handle)
    async with producer:
        for _ in range(50):
            await producer.publish("busy")
        await producer.publish("quiet")
    async with consuming(dp, concurrency=1, prefetch=2) as consumer:
        await until(lambda: consumer.handled == 51)
    assert producer.transport is not None
    await producer.transport.aclose()
    assert order.index("quiet") < 6  # the reads start at each stream in turn


# -- sends --------------------------------------------------------------------------------------


async def test_a_send_to_a_stalled_redis_raises_within_its_timeout_though_cancellations_are_lost(
    lost_cancellations: list[int],
) -> None:
    """A hundred sends to a redis-server stopped with SIGSTOP, each with the timeout
    landing at another moment of redis-py's writes, which lose the cancellation: each
    raises TransportError within its timeout. Before, the timeout cancelled the write
    once, lost it, and the send waited for the socket timeout (35 s)."""
    timeout, rng = 0.05, random.Random(5)
    with redis_server() as (url, process):
        transport = RedisTransport(url, group="shop", timeout=timeout)
        producer = Dispatcher(transport=transport)
        producer.route(Paid)
        async with producer:
            await producer.publish(Paid(0))  # connected, scripts loaded
            process.send_signal(signal.SIGSTOP)
            try:
                for run in range(100):
                    await asyncio.sleep(rng.uniform(0, 0.003))
                    loop = asyncio.get_running_loop()
                    sends = [
                        loop.create_task(producer.publish(Paid(run))) for _ in range(rng.choice([1, 1, 3]))
                    ]
                    started = loop.time()
                    done, late = await asyncio.wait(sends, timeout=timeout + 0.5)
                    assert not late, f"run {run}: a send did not return within {timeout + 0.5} s"
                    took = loop.time() - started
                    assert took <= timeout + 0.5
                    for send in done:
                        error = send.exception()
                        assert isinstance(error, TransportError), error
                        assert "within 0.05 s" in str(error) or "no connection was made" in str(error)
                # Still stopped: the writes cut off still wait on their connections, so closing
                # says so within its timeout (once the server runs again, it may answer them
                # all before the close looks, and the close is clean: that race is not the test).
                with pytest.raises(
                    TransportError, match=r"did not answer within 0.05 s while the transport closed"
                ):
                    await transport.aclose()
            finally:
                process.send_signal(signal.SIGCONT)
    assert lost_cancellations[0] > 0


async def test_a_close_cancelled_while_its_acks_are_in_flight_is_finished_by_the_next_close(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A close sends the buffered acks; cancelled meanwhile, it still closes the connections,
    which cuts that round trip (here before Redis has it). A second aclose() sends them,
    as the failure it raises says, instead of leaving their messages to be handled again
    after claim_idle."""
    monkeypatch.setattr(redis_streams, "_ACK_DELAY", 60.0)
    await publish(redis_url, 2)
    transport = RedisTransport(redis_url, group="billing", consumer="w1", claim_interval=60)
    first, second = await transport.receive([default_name(Paid)], max_count=2, wait=1.0)
    await transport.ack(first)  # buffered: `second` is still in hand
    execute, cut = transport._execute, asyncio.Event()

    async def cut_by_the_close(commands: Any, connected: Any = None) -> list[Any]:
        if cut.is_set() or not all(command[:2] == ("EVALSHA", SHA["ack"]) for command in commands):
            return await execute(commands, connected)
        await cut.wait()
        raise RedisConnectionError("Connection closed by server.")

    monkeypatch.setattr(transport, "_execute", cut_by_the_close)
    closing = asyncio.create_task(transport.aclose())
    await until(lambda: transport._acks_sent == 1)  # the close sends the ack
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    cut.set()
    await until(lambda: transport._ack_failure is not None)
    with pytest.raises(TransportError, match=r"^Could not ack 1 message\(s\): .*sent again"):
        await transport.aclose()
    assert not transport._acks
    client = raw(redis_url)
    (left,) = await client.xpending_range(KEY, "billing", min="-", max="+", count=10)
    assert left["message_id"] == second.receipt[1]  # type: ignore[index]
    await client.aclose()


async def test_connections_that_do_not_close_cleanly_are_a_transport_error(redis_url: str) -> None:
    transport = RedisTransport(redis_url, group="shop")
    producer = Dispatcher(transport=transport)
    producer.route(Paid)
    async with producer:
        await producer.publish(Paid(0))
    original = transport.client.aclose

    async def aclose() -> None:
        await original()
        raise RedisTimeoutError("Timed out closing connection after 5.0")

    transport.client.aclose = aclose
    with pytest.raises(TransportError) as raised:
        await transport.aclose()
    assert str(raised.value) == (
        "The connections to Redis did not close cleanly: TimeoutError: Timed out closing connection after 5.0"
    )


async def test_a_give_back_that_fails_as_the_transport_closes_is_raised_by_aclose(redis_url: str) -> None:
    """aclose() gives back what waits to be handed out again; when Redis refuses, the entry
    stays pending, and the caller (the dispatcher's error hook) must hear of it."""
    await publish(redis_url, 1)
    transport = RedisTransport(redis_url, group="billing", consumer="w1")
    (taken,) = await transport.receive([default_name(Paid)], max_count=1, wait=1)
    await transport.retry(taken, Boom("failed once"))  # waits in the transport for its next try

    async def refusing(calls: Any, limit: str = "") -> Any:
        raise RedisConnectionError("the connection dropped")

    transport._hold = refusing  # type: ignore[method-assign]
    with pytest.raises(TransportError, match=r"^Could not give back 1 message\(s\) .*the connection dropped"):
        await transport.aclose()


# -- consumer and dispatcher stops ----------------------------------------------------------------


def hearing(errors: list[str]) -> Callable[[BaseException, object], None]:
    """An error hook that keeps what it hears in `errors`."""
    return lambda error, message: errors.append(f"{type(error).__name__}: {error}")


async def stopped_under_fire(
    rng: random.Random, stop: Coroutine[Any, Any, int], running: asyncio.Task[Any], seconds: float, run: int
) -> float:
    """Start `stop`, cancel it or `running` 0-3 times at random moments, and fail unless
    both end within `seconds + SLACK`; return when the stop started (loop time)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    stopping = loop.create_task(stop)
    for _ in range(rng.randint(0, 3)):
        await asyncio.sleep(rng.uniform(0, 0.005))
        rng.choice([stopping, running]).cancel()
    _, late = await asyncio.wait([stopping, running], timeout=seconds + SLACK)
    assert not late, f"run {run}: not stopped within {seconds + SLACK} s"
    return started


async def test_consumer_stops_return_within_their_bound_whatever_cancellations_land(
    redis_url: str, lost_cancellations: list[int]
) -> None:
    """A hundred consumers, each stopped at a random moment with a random drain timeout,
    while the stop call and the consumer's own task are cancelled at random moments and
    redis-py loses cancellations: the consumer ends within drain + SLACK, and nothing it
    took is left pending in Redis unless given back."""
    rng = random.Random(11)
    handled: set[int] = set()

    async def handle(event: Paid) -> None:
        await asyncio.sleep(rng.choice([0, 0, 0.002, 0.02]))
        handled.add(event.n)

    await publish(redis_url, 300)  # the later consumers wait for new entries: stop cancels that wait
    client = raw(redis_url)
    loop = asyncio.get_running_loop()
    for run in range(100):
        errors: list[str] = []
        dp = worker(redis_url, handle, consumer=f"w{run}", claim_idle=30, timeout=2, on_error=hearing(errors))
        async with dp:
            consumer = dp.consumer(
                concurrency=rng.choice([1, 4]),
                prefetch=rng.choice([1, 10, 100]),
                wait=rng.choice([0.01, 1.0]),
            )
            running = loop.create_task(consumer.run())
            await asyncio.sleep(rng.uniform(0, 0.1))  # some stop a consumer that waits for new entries
            drain = rng.choice([0, 0.01, 0.05])
            started = await stopped_under_fire(rng, consumer.stop(drain), running, drain, run)
            async with asyncio.timeout(SLACK):
                await consumer.stop(drain)  # and a later stop returns at once
            assert loop.time() - started <= drain + SLACK
        left = await untracked(client)
        assert left == [], f"run {run}: left pending untracked; the error hook heard {errors}"
    await client.aclose()
    assert len(handled) > 0
    assert lost_cancellations[0] > 0


async def test_dispatcher_stops_return_within_their_bound_whatever_cancellations_land(
    redis_url: str, lost_cancellations: list[int]
) -> None:
    """A hundred `serve()`s, each stopped with `dp.stop(timeout)` at a random moment, the
    stop call and serve() cancelled at random moments, redis-py losing cancellations: the
    dispatcher is stopped within timeout + SLACK, its transport closed (no connection
    left), and nothing it took is left pending in Redis unless given back."""
    rng = random.Random(13)

    async def handle(event: Paid) -> None:
        await asyncio.sleep(rng.choice([0, 0.002, 0.02]))

    await publish(redis_url, 300)  # the later dispatchers wait for new entries: stop cancels that wait
    client = raw(redis_url)
    loop = asyncio.get_running_loop()
    for run in range(100):
        dp = worker(redis_url, handle, consumer=f"w{run}", claim_idle=30, timeout=2.0)
        serving = loop.create_task(
            dp.serve(stop_signals=(), concurrency=rng.choice([1, 4]), wait=rng.choice([0.01, 1.0]))
        )
        await asyncio.sleep(rng.uniform(0, 0.1))  # some stop a consumer that waits for new entries
        timeout = rng.choice([0, 0.01, 0.05])
        started = await stopped_under_fire(rng, dp.stop(timeout), serving, timeout, run)
        async with asyncio.timeout(SLACK):
            await dp.stop()
        assert loop.time() - started <= timeout + SLACK
        assert dp.state is State.STOPPED
        assert await untracked(client) == [], f"run {run}"
    clients = await client.client_list()
    assert len(clients) == 1, clients  # only this one: every dispatcher closed its connections
    await client.aclose()
    assert lost_cancellations[0] > 0


async def test_a_stop_with_redis_stalled_returns_within_drain_plus_the_transport_timeout() -> None:
    """redis-server stopped (SIGSTOP) while a worker consumes: dp.stop(0.1) returns within
    the drain timeout plus twice the transport's `timeout` (the consumer's give-backs and
    acks, all at once; the transport's close), and the error hook hears that what it
    held stays pending. Before, each step waited its own timeout, one after the other."""
    errors: list[BaseException] = []
    handled: list[int] = []

    async def handle(event: Paid) -> None:
        await asyncio.sleep(0.01 if len(handled) < 20 else 5)  # then in flight at the deadline
        handled.append(event.n)

    with redis_server() as (url, process):
        await publish(url, 500)
        dp = worker(
            url, handle, claim_idle=30, timeout=1.0, on_error=lambda error, message: errors.append(error)
        )
        serving = asyncio.create_task(dp.serve(stop_signals=(), concurrency=4))
        await until(lambda: len(handled) >= 20)
        process.send_signal(signal.SIGSTOP)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            # The drain, then the consumer's give-backs (of the cancelled handlings and of the
            # read ahead) and last acks together, then the transport's close: 0.1 + 2 x 1.0 s.
            bound = 0.1 + 2 * 1.0 + 0.6
            await asyncio.wait([asyncio.create_task(dp.stop(0.1))], timeout=bound)
            took = loop.time() - started
            assert dp.state is State.STOPPED
            assert took <= bound, took
            await serving
        finally:
            process.send_signal(signal.SIGCONT)
    assert any("did not answer within 1.0 s while the transport closed" in str(error) for error in errors)
