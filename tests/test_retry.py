"""Retry policies: delays without sleeping, counts, `on`/`never`, an event handler retried
alone, the closest policy winning, timeouts, cancellation while waiting, and retries
inside a transport delivery."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

import pybus.retry
from pybus import (
    CallNext,
    Dispatcher,
    DispatcherFrozen,
    ImproperlyConfigured,
    Retry,
    current_context,
)
from pybus.transport import InMemoryBroker, InMemoryTransport
from tests.consuming import consuming, until


@dataclass(frozen=True)
class Pay:
    n: int


@dataclass(frozen=True)
class Paid:
    n: int


class Flaky(Exception):
    pass


class Fatal(Exception):
    pass


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays the engines wait between attempts, recorded instead of slept."""
    delays: list[float] = []

    async def record(seconds: float) -> None:
        delays.append(seconds)

    monkeypatch.setattr(pybus.retry, "sleep", record)
    return delays


def failing(times: int, error: type[Exception] = Flaky) -> tuple[list[int], Any]:
    """A command handler that fails `times` times, then returns the attempt; and its attempts."""
    attempts: list[int] = []

    async def handler(cmd: Pay) -> int:
        context = current_context()
        assert context is not None
        attempts.append(context.attempt)
        if len(attempts) <= times:
            raise error(f"attempt {len(attempts)}")
        return context.attempt

    return attempts, handler


def test_delays_grow_by_the_multiplier_up_to_max_delay_without_sleeping() -> None:
    policy = Retry(attempts=6, delay=0.1, multiplier=2, max_delay=0.5)
    assert [policy.delay_for(n) for n in range(1, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert Retry(delay=0.3, multiplier=1).delay_for(4) == 0.3


def test_a_delay_far_down_the_attempts_is_max_delay_not_an_overflow() -> None:
    policy = Retry(attempts=5000, delay=0.01, max_delay=1.0)
    assert policy.delay_for(1025) == policy.delay_for(4999) == 1.0


async def test_a_recursion_error_of_a_cycle_is_never_retried(slept: list[float]) -> None:
    dp = Dispatcher(retry=Retry(attempts=3, delay=0))
    calls = 0

    @dp.events.register(Paid)
    async def bounce(event: Paid) -> None:
        nonlocal calls
        calls += 1
        await dp.publish(Paid(event.n + 1))  # a cycle: each publish nests one level deeper

    async with dp:
        with pytest.raises(RecursionError):
            await dp.publish(Paid(0))
    assert calls < 5_000  # one call per level, as without a policy; retries would multiply them
    assert slept == []


def test_jitter_only_lengthens_a_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = Retry(delay=1.0, multiplier=1, jitter=0.5)
    monkeypatch.setattr("random.random", lambda: 0.0)
    assert policy.delay_for(1) == 1.0
    monkeypatch.setattr("random.random", lambda: 0.999)
    assert policy.delay_for(1) == pytest.approx(1.4995)
    monkeypatch.undo()
    delays = {policy.delay_for(1) for _ in range(200)}
    assert all(1.0 <= delay < 1.5 for delay in delays)
    assert len(delays) > 100


@pytest.mark.parametrize(
    ("options", "text"),
    [
        ({"attempts": 0}, "attempts counts every call"),
        ({"attempts": 1.5}, "attempts counts every call"),
        ({"delay": -1}, "delay=-1"),
        ({"multiplier": 0.5}, "multiplier=0.5"),
        ({"jitter": -0.1}, "jitter=-0.1"),
        ({"on": (asyncio.CancelledError,)}, "only Exception subclasses are retried"),
        ({"never": ("ValueError",)}, "takes exception classes"),
    ],
)
def test_a_policy_that_cannot_work_is_refused(options: dict[str, Any], text: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=text):
        Retry(**options)


def test_retry_must_be_a_policy() -> None:
    dp = Dispatcher()

    async def pay(cmd: Pay) -> None:
        pass

    with pytest.raises(ImproperlyConfigured, match=r"takes a pybus\.Retry policy"):
        dp.commands.bind(Pay, pay, retry=3)  # type: ignore[call-overload]
    with pytest.raises(ImproperlyConfigured, match=r"takes a pybus\.Retry policy"):
        Dispatcher(retry=True)  # type: ignore[arg-type]


async def test_a_command_is_retried_until_it_succeeds_with_the_policys_delays(slept: list[float]) -> None:
    dp = Dispatcher(retry=Retry(attempts=4, delay=0.5, multiplier=3))
    attempts, handler = failing(2)
    dp.commands.bind(Pay, handler)
    async with dp:
        assert await dp.execute(Pay(1)) == 3
    assert attempts == [1, 2, 3]
    assert slept == [0.5, 1.5]


async def test_the_last_failure_is_raised_with_a_note_once_attempts_are_spent(slept: list[float]) -> None:
    dp = Dispatcher()
    attempts, handler = failing(10)
    dp.commands.bind(Pay, handler, retry=Retry(attempts=3, delay=0))
    async with dp:
        with pytest.raises(Flaky, match="attempt 3") as raised:
            await dp.execute(Pay(1))
    assert attempts == [1, 2, 3]
    (note,) = raised.value.__notes__
    assert "failed 3 attempts (Retry(attempts=3, delay=0" in note
    assert "earlier attempts raised Flaky: attempt 1; Flaky: attempt 2" in note


async def test_never_and_on_choose_what_is_retried(slept: list[float]) -> None:
    dp = Dispatcher()
    never_attempts, never_handler = failing(10, Fatal)
    dp.commands.bind(Pay, never_handler, retry=Retry(attempts=5, never=(Fatal,)))
    only_attempts, only_handler = failing(10, Fatal)
    dp.queries.bind(Paid, only_handler, retry=Retry(attempts=5, on=(Flaky,)))
    flaky_attempts, flaky_handler = failing(1, Flaky)

    @dataclass(frozen=True)
    class Other:
        n: int

    dp.commands.bind(Other, flaky_handler, retry=Retry(attempts=5, on=(Flaky,), never=(Fatal,)))
    async with dp:
        with pytest.raises(Fatal):
            await dp.execute(Pay(1))
        with pytest.raises(Fatal):
            await dp.query(Paid(1))
        assert await dp.execute(Other(1)) == 2
    assert never_attempts == [1]
    assert only_attempts == [1]
    assert flaky_attempts == [1, 2]


async def test_a_failing_event_handler_is_retried_alone(slept: list[float]) -> None:
    dp = Dispatcher(retry=Retry(attempts=3, delay=0))
    calls: list[str] = []

    @dp.events.register(Paid)
    async def steady(event: Paid) -> None:
        calls.append("steady")

    @dp.events.register(Paid)
    async def flaky(event: Paid) -> None:
        calls.append("flaky")
        if calls.count("flaky") == 1:
            raise Flaky("once")

    @dp.events.register(Paid)
    async def after(event: Paid) -> None:
        calls.append("after")

    async with dp:
        await dp.publish(Paid(1))
    assert calls == ["steady", "flaky", "flaky", "after"]


async def test_the_closest_policy_wins(slept: list[float]) -> None:
    dp = Dispatcher(retry=Retry(attempts=2, delay=0))
    dp.commands.retry = Retry(attempts=3, delay=0)
    by_dispatcher, on_query = failing(10)
    by_router, on_command = failing(10)
    by_registration, on_own = failing(10)

    @dataclass(frozen=True)
    class Own:
        n: int

    dp.queries.bind(Paid, on_query)
    dp.commands.bind(Pay, on_command)
    dp.commands.bind(Own, on_own, retry=Retry(attempts=4, delay=0))
    async with dp:
        for call, message in ((dp.query, Paid(1)), (dp.execute, Pay(1)), (dp.execute, Own(1))):
            with pytest.raises(Flaky):
                await call(message)
    assert (len(by_dispatcher), len(by_router), len(by_registration)) == (2, 3, 4)
    with pytest.raises(DispatcherFrozen):
        dp.retry = None
    with pytest.raises(DispatcherFrozen):
        dp.events.retry = None


async def test_a_registration_timeout_bounds_each_attempt_and_is_retried() -> None:
    dp = Dispatcher()
    attempts: list[int] = []

    @dp.commands.register(Pay, timeout=0.01, retry=Retry(attempts=3, delay=0))
    async def slow_then_fast(cmd: Pay) -> str:
        attempts.append(len(attempts) + 1)
        if len(attempts) < 3:
            await asyncio.sleep(10)
        return "done"

    async with dp:
        assert await dp.execute(Pay(1)) == "done"
    assert attempts == [1, 2, 3]


async def test_a_call_timeout_bounds_every_attempt_together_and_is_not_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits: list[float] = []

    async def third_wait_never_ends(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            await asyncio.get_running_loop().create_future()  # the call's timeout must end it

    monkeypatch.setattr(pybus.retry, "sleep", third_wait_never_ends)
    dp = Dispatcher()
    attempts: list[int] = []

    @dp.commands.register(Pay, retry=Retry(attempts=100, delay=0.005, multiplier=1))
    async def always(cmd: Pay) -> None:
        attempts.append(1)
        raise Flaky("again")

    async with dp:
        with pytest.raises(TimeoutError) as raised:
            await dp.execute(Pay(1), timeout=0.05)
    assert len(attempts) == 3  # attempts 1-3 ran; the wait before the 4th was cut off
    assert any("did not finish within 0.05 s" in note for note in raised.value.__notes__)
    cut_off = raised.value.__cause__  # the cancellation the timeout raised from names the failure
    assert cut_off is not None
    assert any("waiting to retry after attempt 3" in note for note in cut_off.__notes__)


@pytest.mark.parametrize("case", ["command", "event", "concurrent events"])
async def test_a_cancellation_while_waiting_to_retry_names_the_failure_it_cut_off(case: str) -> None:
    dp = Dispatcher(concurrent_events=case == "concurrent events")
    failed_once = asyncio.Event()
    policy = Retry(attempts=2, delay=100)

    async def fails(message: object) -> None:
        failed_once.set()
        raise Flaky("first attempt")

    async def slow(message: object) -> None:
        await asyncio.sleep(100)

    if case == "command":
        dp.commands.bind(Pay, fails, retry=policy)
    else:
        dp.events.bind(Paid, fails, retry=policy)
        dp.events.bind(Paid, slow)  # still running when the cancellation comes
    async with dp:
        task = asyncio.create_task(dp.execute(Pay(1)) if case == "command" else dp.publish(Paid(1)))
        await failed_once.wait()
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError) as raised:
            await task
    assert any("waiting to retry after attempt 1 failed with Flaky: first attempt" in note
               for note in raised.value.__notes__)  # fmt: skip


async def test_cancellations_are_never_retried(slept: list[float]) -> None:
    dp = Dispatcher(retry=Retry(attempts=5, delay=0))
    calls: list[int] = []

    @dp.commands.register(Pay)
    async def cancels_itself(cmd: Pay) -> None:
        calls.append(1)
        raise asyncio.CancelledError

    async with dp:
        with pytest.raises(asyncio.CancelledError):
            await dp.execute(Pay(1))
    assert calls == [1]


class Collecting:
    calls = 0

    def __init__(self) -> None:
        self.events: list[object] = []

    async def handle(self, cmd: Pay) -> None:
        Collecting.calls += 1
        self.events.append(Paid(Collecting.calls))
        if Collecting.calls == 1:
            raise Flaky("collected, then failed")

    def add_event(self, event: object) -> None:
        self.events.append(event)

    def dump_events(self) -> list[object]:
        return self.events


async def test_events_collected_by_a_failed_attempt_are_not_published(slept: list[float]) -> None:
    dp = Dispatcher(retry=Retry(attempts=2, delay=0))
    dp.commands.bind(Pay, Collecting)
    published: list[Paid] = []

    @dp.events.register(Paid)
    async def on_paid(event: Paid) -> None:
        published.append(event)

    async with dp:
        await dp.execute(Pay(1))
    assert published == [Paid(2)]


async def test_middleware_runs_around_each_attempt_and_sees_its_number(slept: list[float]) -> None:
    seen: list[int] = []

    async def remember(message: Any, call_next: CallNext) -> Any:
        seen.append(call_next.context.attempt)
        return await call_next(message)

    dp = Dispatcher(middleware=[remember], retry=Retry(attempts=3, delay=0))
    attempts, handler = failing(2)
    dp.commands.bind(Pay, handler)
    async with dp:
        await dp.execute(Pay(1))
    assert seen == attempts == [1, 2, 3]


async def test_in_a_consumer_retries_run_inside_each_delivery_before_the_broker_redelivers(
    slept: list[float],
) -> None:
    broker = InMemoryBroker()
    shop = Dispatcher(transport=InMemoryTransport(broker))
    shop.route(Paid)
    worker = Dispatcher(transport=InMemoryTransport(broker, group="billing"), on_error=lambda e, m: None)
    worker.route(Paid)
    tries: list[tuple[int, int]] = []

    @worker.events.register(Paid, retry=Retry(attempts=2, delay=0))
    async def bill(event: Paid) -> None:
        context = current_context()
        assert context is not None
        tries.append((context.delivery, context.attempt))
        if len(tries) < 3:
            raise Flaky("not yet")

    async with shop, consuming(worker) as consumer:
        await shop.publish(Paid(1))
        await until(lambda: consumer.handled == 1)
    # Delivery 1 tried twice in process and failed; the broker delivered it again.
    assert tries == [(1, 1), (1, 2), (2, 1)]
    assert consumer.failed == 1


class SharedCollector:
    """A ready instance (one for every handling) that collects an event, then may fail."""

    def __init__(self) -> None:
        self.events: list[object] = []
        self.calls = 0

    def add_event(self, event: object) -> None:
        self.events.append(event)

    def dump_events(self) -> list[object]:
        events, self.events = self.events, []
        return events

    async def handle(self, cmd: Pay) -> None:
        self.calls += 1
        self.add_event(Paid(self.calls))
        if cmd.n < 0 or self.calls == 1:
            raise Flaky(f"call {self.calls}")


@pytest.mark.parametrize("retry", [None, Retry(attempts=3, delay=0)])
async def test_a_shared_instance_publishes_only_what_its_successful_handling_collected(
    retry: Retry | None, slept: list[float]
) -> None:
    dp = Dispatcher(retry=retry)
    dp.commands.bind(Pay, SharedCollector())
    published: list[Paid] = []

    @dp.events.register(Paid)
    async def on_paid(event: Paid) -> None:
        published.append(event)

    async with dp:
        if retry is None:
            with pytest.raises(Flaky):
                await dp.execute(Pay(1))
        await dp.execute(Pay(1))
    assert published == [Paid(2)]
