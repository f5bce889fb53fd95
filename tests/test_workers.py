"""Background engines: send, workers, backpressure, ordering keys, join, stop."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from pybus import (
    Dispatcher,
    DispatcherClosed,
    DispatcherNotStarted,
    HandlerNotFound,
    HandlerSignatureError,
    ImproperlyConfigured,
    QueueFull,
)
from pybus.errors import HandlerFailures
from pybus.workers import EngineStatistics


@dataclass(frozen=True)
class Tick:
    n: int


@dataclass(frozen=True)
class Job:
    n: int
    key: str = ""


class Boom(Exception):
    pass


@dataclass(frozen=True)
class Probe:
    n: int


def two_failing_handlers(dp: Dispatcher) -> None:
    """Tick handlers `first` and `second`, raising Boom("first") and Boom("second")."""
    for name in ("first", "second"):

        async def failing(event: Tick, name: str = name) -> None:
            raise Boom(name)

        failing.__name__ = failing.__qualname__ = name
        dp.events.bind(Tick, failing)


class Errors:
    """An on_error hook that records what it is given."""

    def __init__(self) -> None:
        self.seen: list[tuple[BaseException, object]] = []

    def __call__(self, error: BaseException, message: object) -> None:
        self.seen.append((error, message))


async def test_a_thousand_events_sent_inside_async_with_are_handled_at_exit() -> None:
    handled: list[int] = []
    dp = Dispatcher()

    @dp.events.register(Tick)
    async def on_tick(event: Tick) -> None:
        await asyncio.sleep(0)
        handled.append(event.n)

    async with dp:
        for i in range(1000):
            await dp.events.send(Tick(i))
    assert sorted(handled) == list(range(1000))
    stats = dp.statistics().events
    assert (stats.handled, stats.failed, stats.queued, stats.in_flight) == (1000, 0, 0, 0)


async def test_failing_and_cancelled_handlers_do_not_stop_the_next_message() -> None:
    errors, done = Errors(), []
    dp = Dispatcher(workers=1, on_error=errors)

    @dp.commands.register(Job)
    async def job(cmd: Job) -> None:
        if cmd.n == 1:
            raise Boom("job 1 failed")
        if cmd.n == 2:
            raise asyncio.CancelledError  # e.g. a cancelled inner task
        done.append(cmd.n)

    async with dp:
        for i in range(4):
            await dp.commands.send(Job(i))
    assert done == [0, 3]
    assert [(type(e), m) for e, m in errors.seen] == [(Boom, Job(1)), (asyncio.CancelledError, Job(2))]
    assert errors.seen[0][0].__notes__[-1].startswith("while handling command Job in the background (job (")
    stats = dp.statistics().commands
    assert (stats.handled, stats.failed) == (2, 2)


async def test_the_default_error_hook_logs_message_handler_and_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dp = Dispatcher()

    @dp.commands.register(Job)
    async def job(cmd: Job) -> None:
        raise Boom("disk full")

    with caplog.at_level(logging.ERROR, logger="pybus"):
        async with dp:
            await dp.commands.send(Job(7))
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage() == "pybus: handling Job(n=7, key='') failed: Boom: disk full"
    assert record.exc_info is not None
    error = record.exc_info[1]
    assert isinstance(error, Boom)
    assert error.__notes__[-1].startswith("while handling command Job in the background (job (")
    assert record.pybus_message == Job(7)  # type: ignore[attr-defined]


async def test_a_failing_error_hook_is_logged_and_the_worker_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    done: list[int] = []

    def broken_hook(error: BaseException, message: object) -> None:
        raise RuntimeError("hook is broken")

    dp = Dispatcher(workers=1, on_error=broken_hook)

    @dp.commands.register(Job)
    async def job(cmd: Job) -> None:
        if cmd.n == 0:
            raise Boom("first")
        done.append(cmd.n)

    with caplog.at_level(logging.ERROR, logger="pybus"):
        async with dp:
            await dp.commands.send(Job(0))
            await dp.commands.send(Job(1))
    assert done == [1]
    assert "the on_error hook failed" in caplog.records[0].getMessage()


async def test_same_key_is_handled_in_send_order_with_four_workers() -> None:
    seen: dict[str, list[int]] = {}
    running: set[str] = set()
    overlaps: list[str] = []
    rng = random.Random(7)
    dp = Dispatcher(workers=4)

    @dp.commands.register(Job)
    async def job(cmd: Job) -> None:
        if cmd.key in running:
            overlaps.append(cmd.key)
        running.add(cmd.key)
        await asyncio.sleep(rng.random() / 1000)
        seen.setdefault(cmd.key, []).append(cmd.n)
        running.discard(cmd.key)

    async with dp:
        for n in range(400):
            key = f"order-{n % 5}"
            await dp.commands.send(Job(n, key), key=key)
    assert overlaps == []
    for key, numbers in seen.items():
        assert numbers == sorted(numbers), key
    assert sum(len(v) for v in seen.values()) == 400


async def test_different_keys_run_in_parallel() -> None:
    both = asyncio.Event()
    arrived: list[str] = []
    dp = Dispatcher(workers=2)

    @dp.commands.register(Job)
    async def job(cmd: Job) -> None:
        arrived.append(cmd.key)
        if len(arrived) == 2:
            both.set()
        await asyncio.wait_for(both.wait(), 1)

    async with dp:
        await dp.commands.send(Job(1, "a"), key="a")
        await dp.commands.send(Job(2, "b"), key="b")
    assert sorted(arrived) == ["a", "b"]


async def test_keys_are_released_when_idle() -> None:
    dp = Dispatcher(workers=4)
    dp.commands.bind(Job, lambda cmd: None)
    async with dp:
        await dp.commands.send(Job(-1))  # starts the workers
        tasks_before = len(asyncio.all_tasks())
        for n in range(10_000):
            await dp.commands.send(Job(n), key=f"customer-{n}")
        await dp.join()
        stats = dp.statistics().commands
        assert stats == EngineStatistics(queued=0, in_flight=0, handled=10_001, failed=0, active_keys=0)
        assert len(asyncio.all_tasks()) == tasks_before  # no task per key


async def test_stop_with_a_timeout_reports_what_was_not_handled(caplog: pytest.LogCaptureFixture) -> None:
    release = asyncio.Event()
    started: list[int] = []
    dp = Dispatcher(workers=2)

    @dp.commands.register(Job)
    async def job(cmd: Job) -> None:
        started.append(cmd.n)
        await release.wait()

    dp.start()
    for n in range(10):
        await dp.commands.send(Job(n))
    await asyncio.sleep(0.01)
    with caplog.at_level(logging.WARNING, logger="pybus"):
        unhandled = await dp.stop(timeout=0.05)
    assert unhandled == 10  # 2 cancelled in flight + 8 never started
    assert len(started) == 2
    assert caplog.records[-1].getMessage() == (
        "pybus: stopped with 10 message(s) not handled after a drain timeout of 0.05 s"
    )
    assert await dp.stop() == 10  # every call returns the count of the one shutdown
    stats = dp.statistics().commands
    assert (stats.queued, stats.in_flight, stats.handled, stats.failed, stats.unhandled) == (0, 0, 0, 0, 10)
    await asyncio.wait_for(dp.join(), 1)  # nothing left to wait for


async def test_cancelling_stop_itself_is_not_swallowed_while_it_waits_for_the_workers() -> None:
    cleaning = asyncio.Event()
    cleaned = asyncio.Event()
    dp = Dispatcher(workers=1)

    @dp.commands.register(Job)
    async def slow_to_cancel(cmd: Job) -> None:
        try:
            await asyncio.sleep(10)
        finally:
            cleaning.set()
            await asyncio.sleep(0.05)  # a handler that takes a moment to clean up
            cleaned.set()

    dp.start()
    await dp.commands.send(Job(1))
    await asyncio.sleep(0)  # the worker takes the job
    stopping = asyncio.create_task(dp.stop(timeout=0))
    await cleaning.wait()  # stop() is now waiting for the worker to end
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    await cleaned.wait()


async def test_stop_drains_what_was_queued_and_what_it_sends() -> None:
    handled: list[str] = []
    dp = Dispatcher(workers=1)

    @dp.commands.register(Job)
    async def job(cmd: Job) -> None:
        await asyncio.sleep(0.001)
        handled.append(f"job {cmd.n}")
        if cmd.n < 3:
            await dp.commands.send(Job(cmd.n + 10))  # accepted while draining: it is admitted work

    dp.start()
    for n in range(3):
        await dp.commands.send(Job(n))
    assert await dp.stop() == 0
    assert sorted(handled) == ["job 0", "job 1", "job 10", "job 11", "job 12", "job 2"]
    with pytest.raises(DispatcherClosed) as info:
        await dp.commands.send(Job(99))
    assert str(info.value) == (
        "Cannot take command Job: the dispatcher is stopping or stopped and takes no new messages; "
        "send before dp.stop(), or use a new Dispatcher"
    )
    with pytest.raises(DispatcherClosed):
        await dp.execute(Job(1))
    assert repr(dp) == "<Dispatcher stopped>"


async def test_contextvars_are_copied_per_message() -> None:
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")
    seen: list[tuple[str, str]] = []
    dp = Dispatcher(workers=1)

    @dp.events.register(Tick)
    async def on_tick(event: Tick) -> None:
        before = request_id.get()
        request_id.set(f"set by handler {event.n}")  # must not leak into the next message
        await asyncio.sleep(0)
        seen.append((before, request_id.get()))

    async with dp:
        request_id.set("request-A")
        await dp.events.send(Tick(1))
        request_id.set("request-B")
        await dp.events.send(Tick(2))
        await dp.events.send(Tick(3))
    assert seen == [
        ("request-A", "set by handler 1"),
        ("request-B", "set by handler 2"),
        ("request-B", "set by handler 3"),
    ]


async def test_a_handler_sending_into_its_own_full_queue_completes() -> None:
    handled: list[int] = []
    dp = Dispatcher(workers=1, queue_size=1)

    @dp.commands.register(Job)
    async def job(cmd: Job) -> None:
        handled.append(cmd.n)
        if cmd.n == 0:
            for n in range(1, 6):
                await dp.commands.send(Job(n))  # the queue holds one: the rest go past it
            await dp.execute(Job(100))  # inline, never queued

    async with dp:
        await asyncio.wait_for(dp.commands.send(Job(0)), 1)
        await asyncio.wait_for(dp.join(), 2)
    assert sorted(handled) == [0, 1, 2, 3, 4, 5, 100]


async def test_send_waits_for_room_and_send_nowait_refuses() -> None:
    release = asyncio.Event()
    dp = Dispatcher(workers=1, queue_size=2)

    @dp.commands.register(Job)
    async def job(cmd: Job) -> None:
        await release.wait()

    async with dp:
        await dp.commands.send(Job(0))
        await asyncio.sleep(0)  # the worker takes job 0 and blocks
        await dp.commands.send(Job(1))
        await dp.commands.send(Job(2))
        assert dp.statistics().commands.queued == 2
        with pytest.raises(QueueFull) as info:
            dp.commands.send_nowait(Job(3))
        assert str(info.value) == (
            "The command queue is full (it holds 2 messages at most); await dp.commands.send() to wait "
            "for room, or raise Dispatcher(queue_size=...)"
        )
        given_up = asyncio.create_task(dp.commands.send(Job(3)))
        await asyncio.sleep(0.01)
        given_up.cancel()  # a sender may stop waiting
        with pytest.raises(asyncio.CancelledError):
            await given_up
        blocked = asyncio.create_task(dp.commands.send(Job(3)))
        await asyncio.sleep(0.01)
        assert not blocked.done()
        release.set()
        await asyncio.wait_for(blocked, 1)
    assert dp.statistics().commands.handled == 4


async def test_join_waits_for_follow_ups_and_sends_from_handlers() -> None:
    log: list[str] = []
    dp = Dispatcher()

    @dp.commands.register(Job)
    async def job(cmd: Job) -> Tick:
        await dp.events.send(Tick(cmd.n * 10))
        return Tick(cmd.n)

    @dp.events.register(Tick)
    async def on_tick(event: Tick) -> None:
        await asyncio.sleep(0.01)
        log.append(f"tick {event.n}")

    async with dp:
        await dp.send(Job(1))
        await dp.join()
        assert sorted(log) == ["tick 1", "tick 10"]


async def test_dp_send_routes_by_kind() -> None:
    log: list[str] = []
    dp = Dispatcher()
    dp.commands.bind(Job, lambda cmd: log.append("command"))
    dp.queries.bind("stats", lambda: log.append("query"))
    dp.events.bind(object, lambda event: log.append(f"event {type(event).__name__}"))
    async with dp:
        await dp.send(Job(1))
        dp.send_nowait("stats")
        await dp.send(Tick(1))  # not registered itself: an event, matched along the MRO
        await dp.join()
    assert sorted(log) == ["command", "event Tick", "query"]


async def test_send_errors_reach_the_sender_at_once() -> None:
    dp = Dispatcher()
    dp.commands.bind(Job, lambda cmd: None)
    with pytest.raises(DispatcherNotStarted):
        await dp.commands.send(Job(1))
    with pytest.raises(DispatcherNotStarted):
        await dp.send(Job(1))
    async with dp:
        with pytest.raises(HandlerNotFound, match=r"^No handler registered for command Tick"):
            await dp.commands.send(Tick(1))
        with pytest.raises(HandlerNotFound, match=r"it is registered as a command: use dp.execute\(\)"):
            await dp.events.send(Job(1))
        with pytest.raises(HandlerNotFound):
            dp.queries.send_nowait(Job(1))


def test_start_outside_a_loop_starts_workers_lazily() -> None:
    handled: list[int] = []
    dp = Dispatcher()
    dp.events.bind(Tick, lambda event: handled.append(event.n))
    dp.start()  # no running loop here

    async def main() -> None:
        await dp.events.send(Tick(1))
        await dp.stop()

    asyncio.run(main())
    assert handled == [1]
    with pytest.raises(DispatcherClosed):
        dp.events.send_nowait(Tick(2))  # no loop running, and closed


async def test_handler_timeout_cancels_and_fails_with_timeout_error() -> None:
    cancelled: list[str] = []
    dp = Dispatcher()

    @dp.queries.register(Job, timeout=0.01)
    async def slow(query: Job) -> None:
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            cancelled.append("slow")
            raise

    dp.start()
    with pytest.raises(TimeoutError) as info:
        await dp.query(Job(1))
    assert cancelled == ["slow"]
    assert info.value.__notes__[-1].startswith("slow (")
    assert info.value.__notes__[-1].endswith("did not finish within its timeout of 0.01 s")
    await dp.stop()


async def test_default_timeout_and_per_call_timeout() -> None:
    errors = Errors()
    dp = Dispatcher(default_timeout=0.01, on_error=errors)

    @dp.commands.register(Job)
    async def slow(cmd: Job) -> None:
        await asyncio.sleep(1)

    @dp.queries.register("patient", timeout=5)
    async def patient() -> str:
        await asyncio.sleep(0.02)
        return "done"

    async with dp:
        with pytest.raises(TimeoutError):
            await dp.execute(Job(1))
        assert await dp.query("patient") == "done"  # its own timeout wins over the default
        with pytest.raises(TimeoutError) as info:
            await dp.query("patient", timeout=0.001)
        assert info.value.__notes__ == ["query 'patient' did not finish within 0.001 s"]
        await dp.commands.send(Job(2))
    assert [type(e) for e, _ in errors.seen] == [TimeoutError]


async def test_publish_with_a_timeout() -> None:
    dp = Dispatcher()

    @dp.events.register(Tick)
    async def slow(event: Tick) -> None:
        await asyncio.sleep(1)

    dp.start()
    await dp.publish("nobody listens", timeout=0.01)
    with pytest.raises(TimeoutError) as info:
        await dp.publish(Tick(1), timeout=0.01)
    assert info.value.__notes__ == ["event Tick did not finish within 0.01 s"]
    await dp.stop()


def test_settings_are_checked() -> None:
    settings: list[dict[str, object]] = [
        {"workers": 0},
        {"queue_size": 0},
        {"default_timeout": 0},
        {"default_timeout": "1"},
    ]
    for kwargs in settings:
        with pytest.raises(ImproperlyConfigured):
            Dispatcher(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(HandlerSignatureError, match=r"timeout=-1 is not a number of seconds > 0"):
        Dispatcher().commands.bind(Job, lambda cmd: None, timeout=-1)


async def test_statistics_before_start_are_zero() -> None:
    stats = Dispatcher().statistics()
    assert stats.events == stats.commands == stats.queries == EngineStatistics(0, 0, 0, 0, 0)


def test_serve_stops_gracefully_on_sigterm(tmp_path: object) -> None:
    script = textwrap.dedent(
        """
        import asyncio, os, signal, sys
        from pybus import Dispatcher

        handled = []
        dp = Dispatcher(workers=2)

        @dp.events.register("work")
        async def work() -> None:
            await asyncio.sleep(0.01)
            handled.append(1)

        async def main() -> None:
            async def produce() -> None:
                for _ in range(50):
                    await dp.events.send("work")
                print("queued", flush=True)
                os.kill(os.getpid(), signal.SIGTERM)

            loop_task = asyncio.ensure_future(produce())
            unhandled = await dp.serve(drain_timeout=10)
            await loop_task
            print(f"handled {len(handled)} unhandled {unhandled}", flush=True)

        asyncio.run(main())
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["queued", "handled 50 unhandled 0"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # this process was never touched


async def test_a_sender_waiting_for_room_is_told_when_the_dispatcher_stops() -> None:
    dp = Dispatcher(workers=1, queue_size=1)

    @dp.commands.register(Job)
    async def job(cmd: Job) -> None:
        await asyncio.sleep(10)

    dp.start()
    await dp.commands.send(Job(0))
    await asyncio.sleep(0)  # job 0 in flight
    await dp.commands.send(Job(1))  # queued: the queue is full now
    blocked = asyncio.create_task(dp.commands.send(Job(2)))
    await asyncio.sleep(0)
    assert await dp.stop(timeout=0.01) == 2
    with pytest.raises(DispatcherClosed):
        await blocked
    with pytest.raises(DispatcherClosed):
        dp.commands.send_nowait(Job(3))


async def test_a_handler_that_swallows_cancellation_does_not_keep_its_worker_alive() -> None:
    swallowed: list[int] = []
    dp = Dispatcher(workers=1)

    @dp.commands.register(Job)
    async def stubborn(cmd: Job) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            swallowed.append(cmd.n)  # and returns as if nothing happened

    dp.start()
    await dp.commands.send(Job(0))
    await dp.commands.send(Job(1))
    await asyncio.sleep(0)
    # Job(0) swallowed its cancellation and returned: handled. Job(1) never started.
    assert await asyncio.wait_for(dp.stop(timeout=0.01), 2) == 1
    assert swallowed == [0]
    stats = dp.statistics().commands
    assert (stats.handled, stats.unhandled) == (1, 1)


@pytest.mark.parametrize("concurrent_events", [False, True])
async def test_the_error_hook_hears_each_failing_event_handler_once_with_its_own_exception(
    concurrent_events: bool,
) -> None:
    errors = Errors()
    dp = Dispatcher(on_error=errors, concurrent_events=concurrent_events)
    raised: dict[str, BaseException] = {}

    @dp.events.register(Tick)
    async def first(event: Tick) -> None:
        raised["first"] = Boom("first failed")
        raise raised["first"]

    @dp.events.register(Tick)
    async def fine(event: Tick) -> None:
        return None

    @dp.events.register(Tick)
    async def third(event: Tick) -> None:
        # A group of its own is one failure: reported as it is, not split.
        raised["third"] = ExceptionGroup("third's own", [ValueError("a"), KeyError("b")])
        raise raised["third"]

    async with dp:
        await dp.events.send(Tick(1))
    assert [message for _, message in errors.seen] == [Tick(1), Tick(1)]
    assert [error for error, _ in errors.seen] == [raised["first"], raised["third"]]  # the same objects
    for (error, _), name in zip(errors.seen, ["first", "third"], strict=True):
        raised_by, where = error.__notes__
        assert raised_by.startswith(f"raised by {name} (")
        assert raised_by.endswith("handling event Tick")
        assert where.startswith("while handling event Tick in the background (first (")
        assert "), fine (" in where


async def test_a_command_handler_that_lets_an_inner_publish_fail_is_one_failure() -> None:
    """The HandlerFailures a handler's own `await dp.publish()` raised is that handler's
    exception: the hook gets it whole, once, as `execute` would raise it."""
    errors = Errors()
    dp = Dispatcher(on_error=errors)
    raised: list[BaseException] = []

    two_failing_handlers(dp)

    @dp.commands.register(Job)
    async def job(cmd: Job) -> None:
        try:
            await dp.publish(Tick(cmd.n))
        except HandlerFailures as exc:
            raised.append(exc)
            raise

    async with dp:
        await dp.commands.send(Job(1))
    ((error, message),) = errors.seen
    assert error is raised[0]
    assert message == Job(1)


async def test_an_error_hook_that_cancels_its_own_task_does_not_cut_its_next_call_short() -> None:
    heard: list[str] = []

    async def hook(error: BaseException, message: object) -> None:
        if str(error) == "first":
            asyncio.current_task().cancel()  # type: ignore[union-attr]  # and never awaits it
            heard.append("first")
            return
        await asyncio.sleep(0.01)  # the next call waits: the request must not land here
        heard.append(str(error))

    dp = Dispatcher(on_error=hook)

    two_failing_handlers(dp)

    async with dp:
        await dp.events.send(Tick(1))
        await dp.events.send(Tick(2))
    assert sorted(heard) == ["first", "first", "second", "second"]  # no call cut short


@pytest.mark.parametrize("concurrent_events", [False, True])
async def test_a_handler_cancelling_itself_does_not_hide_the_other_handlers_failures(
    concurrent_events: bool,
) -> None:
    """A CancelledError propagates at once, before the publish raises its failures: they
    reach the error hook named in a note on it, not nowhere."""
    errors = Errors()
    dp = Dispatcher(on_error=errors, concurrent_events=concurrent_events)

    @dp.events.register(Tick)
    async def fails(event: Tick) -> None:
        raise Boom("fails failed")

    @dp.events.register(Tick)
    async def cancels(event: Tick) -> None:
        asyncio.current_task().cancel()  # type: ignore[union-attr]
        await asyncio.sleep(0)

    async with dp:
        await dp.events.send(Tick(1))
    ((error, message),) = errors.seen
    assert isinstance(error, asyncio.CancelledError)
    assert message == Tick(1)
    assert error.__notes__[0] == (
        "1 other event handler failure(s) of this publish, not raised because of it: Boom: fails failed"
    )


async def test_a_publish_raises_the_handler_failures_as_one_group() -> None:
    dp = Dispatcher()

    two_failing_handlers(dp)

    async with dp:
        with pytest.raises(HandlerFailures) as raised:
            await dp.publish(Tick(1))
    assert isinstance(raised.value, ExceptionGroup)  # except* works as before
    assert [str(error) for error in raised.value.exceptions] == ["first", "second"]


async def test_timeout_on_a_collecting_class_handler() -> None:
    class Collecting:
        def __init__(self) -> None:
            self.events: list[object] = []

        def dump_events(self) -> list[object]:
            return self.events

        async def handle(self, cmd: Job) -> None:
            self.events.append("collected")
            await asyncio.sleep(cmd.n)

    seen: list[object] = []
    dp = Dispatcher()
    dp.commands.bind(Job, Collecting, timeout=0.05)
    dp.events.bind("collected", seen.append)
    async with dp:
        await dp.execute(Job(0))
        assert seen == ["collected"]
        with pytest.raises(TimeoutError):
            await dp.execute(Job(1))
    assert seen == ["collected"]


async def test_serve_in_process_restores_signal_handlers() -> None:
    handled: list[int] = []
    dp = Dispatcher()
    dp.events.bind(Tick, lambda event: handled.append(event.n))
    before = signal.getsignal(signal.SIGTERM)

    async def produce_then_terminate() -> None:
        await asyncio.sleep(0.01)
        for n in range(3):
            await dp.events.send(Tick(n))
        signal.raise_signal(signal.SIGTERM)  # caught by serve(), not by the process

    producer = asyncio.create_task(produce_then_terminate())
    assert await asyncio.wait_for(dp.serve(), 5) == 0
    await producer
    assert handled == [0, 1, 2]
    assert signal.getsignal(signal.SIGTERM) == before


async def test_a_timeout_error_of_the_handler_itself_gets_no_timeout_note() -> None:
    dp = Dispatcher()

    @dp.commands.register(Job)
    async def own_timeout(cmd: Job) -> None:
        raise TimeoutError("the remote service timed out")

    async with dp:
        with pytest.raises(TimeoutError) as info:
            await dp.execute(Job(1), timeout=5)
    assert str(info.value) == "the remote service timed out"
    assert not getattr(info.value, "__notes__", None)


# -- under faults: counts, hooks, fairness, sends from inside ------------------------------


async def test_a_send_to_a_kind_already_cancelled_is_refused_never_accepted_and_forgotten() -> None:
    """stop(timeout) cancels the pools one after the other; a handler of one kind that
    sends to another kind while that happens must see its message handled or counted."""
    errors = Errors()
    sent: list[str] = []
    dp = Dispatcher(workers=1, on_error=errors)

    @dp.commands.register(Job)
    async def job(cmd: Job) -> None:
        try:
            await asyncio.sleep(10)
        finally:  # runs while the shutdown cancels this handling
            try:
                await dp.events.send(Tick(cmd.n))
                sent.append("accepted")
            except DispatcherClosed:
                sent.append("refused")

    @dp.events.register(Tick)
    async def tick(event: Tick) -> None:
        pass

    @dp.queries.register(Probe)
    async def probe(query: Probe) -> None:
        try:
            await asyncio.sleep(10)
        finally:
            try:
                await dp.commands.send(Job(99))
                sent.append("accepted")
            except DispatcherClosed:
                sent.append("refused")

    dp.start()
    await dp.commands.send(Job(1))
    await dp.queries.send(Probe(2))
    await asyncio.sleep(0.01)
    unhandled = await dp.stop(timeout=0)
    assert sent == ["refused", "refused"]
    stats = dp.statistics()
    total = [
        (s.handled + s.failed + s.unhandled, s.queued, s.in_flight)
        for s in (stats.events, stats.commands, stats.queries)
    ]
    assert total == [(0, 0, 0), (1, 0, 0), (1, 0, 0)]  # sent = handled + failed + unhandled, per kind
    assert unhandled == 2


async def test_sends_made_by_handlers_during_the_drain_are_handled_and_counted() -> None:
    handled: list[str] = []
    dp = Dispatcher(workers=2)

    @dp.commands.register(Job)
    async def job(cmd: Job) -> None:
        await asyncio.sleep(0.001)
        if cmd.n < 50:
            await dp.commands.send(Job(cmd.n + 50))  # accepted: sent from inside while stopping
        await dp.events.send(Tick(cmd.n))
        handled.append(f"job {cmd.n}")

    dp.events.bind(Tick, lambda event: handled.append(f"tick {event.n}"))
    dp.start()
    for n in range(50):
        await dp.commands.send(Job(n))
    assert await dp.stop() == 0
    assert len(handled) == 200
    assert dp.statistics().commands.handled == 100
    assert dp.statistics().events.handled == 100


async def test_an_unhashable_ordering_key_is_refused_before_anything_is_counted() -> None:
    from pybus import InvalidMessage

    dp = Dispatcher()
    dp.commands.bind(Job, lambda cmd: None)
    dp.start()
    with pytest.raises(InvalidMessage, match=r"dp.commands.send\(\) got key=\['a'\], which is not hashable"):
        await dp.commands.send(Job(1), key=["a"])
    with pytest.raises(InvalidMessage):
        dp.commands.send_nowait(Job(1), key={"a": 1})
    assert dp.statistics().commands == EngineStatistics(0, 0, 0, 0, 0, 0)
    await asyncio.wait_for(dp.join(), 1)  # nothing was counted, so nothing to wait for
    assert await dp.stop() == 0


async def test_the_error_hook_runs_in_the_failing_messages_own_context() -> None:
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")
    seen: list[tuple[int, str]] = []

    def hook(error: BaseException, message: object) -> None:
        assert isinstance(message, Job)
        seen.append((message.n, request_id.get()))

    dp = Dispatcher(workers=1, on_error=hook)

    @dp.commands.register(Job)
    async def fail(cmd: Job) -> None:
        raise Boom(cmd.n)

    async with dp:
        for n in range(3):
            token = request_id.set(f"request-{n}")
            await dp.commands.send(Job(n))
            request_id.reset(token)
    assert seen == [(0, "request-0"), (1, "request-1"), (2, "request-2")]


async def test_an_async_error_hook_is_awaited_and_its_own_failure_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reported: list[int] = []

    async def hook(error: BaseException, message: object) -> None:
        await asyncio.sleep(0)
        assert isinstance(message, Job)
        if message.n == 1:
            raise RuntimeError("the hook itself failed")
        reported.append(message.n)

    dp = Dispatcher(on_error=hook)

    @dp.commands.register(Job)
    async def fail(cmd: Job) -> None:
        raise Boom(cmd.n)

    with caplog.at_level(logging.ERROR, logger="pybus"):
        async with dp:
            await dp.commands.send(Job(0))
            await dp.commands.send(Job(1))
    assert reported == [0]
    assert "pybus: the on_error hook failed while reporting Boom(1)" in caplog.text


def test_an_error_hook_that_cannot_be_called_so_is_refused() -> None:
    with pytest.raises(ImproperlyConfigured, match="on_error must be a function"):
        Dispatcher(on_error="log")  # type: ignore[arg-type]

    def one_argument(error: BaseException) -> None:
        pass

    with pytest.raises(ImproperlyConfigured, match=r"must accept two positional arguments"):
        Dispatcher(on_error=one_argument)  # type: ignore[arg-type]


async def test_senders_waiting_for_room_are_served_first_in_first_out_also_when_one_gives_up() -> None:
    order: list[int] = []
    gate = asyncio.Event()
    dp = Dispatcher(workers=1, queue_size=1)

    @dp.commands.register(Job)
    async def job(cmd: Job) -> None:
        await gate.wait()
        order.append(cmd.n)

    dp.start()
    await dp.commands.send(Job(0))  # taken by the worker
    await asyncio.sleep(0)
    await dp.commands.send(Job(1))  # fills the queue
    waiting = []
    for n in range(2, 7):
        waiting.append(asyncio.create_task(dp.commands.send(Job(n))))
        await asyncio.sleep(0)
    waiting[1].cancel()  # Job(3) gives up
    newcomer = asyncio.create_task(dp.commands.send(Job(7)))  # arrives last: must not jump the line
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*waiting, newcomer, return_exceptions=True)
    await dp.stop()
    assert order == [0, 1, 2, 4, 5, 6, 7]


async def test_senders_that_give_up_while_a_handler_hangs_leave_nothing_behind() -> None:
    """`wait_for(send(...), 1)` in a retry loop against a stuck queue must not grow the line."""
    gate = asyncio.Event()
    dp = Dispatcher(workers=1, queue_size=1)

    @dp.commands.register(Job)
    async def job(cmd: Job) -> None:
        await gate.wait()

    dp.start()
    await dp.commands.send(Job(0))
    await asyncio.sleep(0)
    await dp.commands.send(Job(1))  # the queue is full, its worker stuck
    for n in range(2, 202):
        sending = asyncio.create_task(dp.commands.send(Job(n)))
        await asyncio.sleep(0)  # in line for room
        sending.cancel()  # gives up
        with pytest.raises(asyncio.CancelledError):
            await sending
    pool = dp.commands.engine.workers  # type: ignore[union-attr]
    assert len(pool._senders) == 0  # no cancelled waiter is kept until room frees
    gate.set()
    assert await dp.stop() == 0


async def test_a_sender_handed_room_then_cancelled_passes_the_room_on() -> None:
    order: list[int] = []
    dp = Dispatcher(workers=1, queue_size=1)
    gate = asyncio.Event()

    @dp.commands.register(Job)
    async def job(cmd: Job) -> None:
        await gate.wait()
        order.append(cmd.n)

    dp.start()
    await dp.commands.send(Job(0))
    await asyncio.sleep(0)
    await dp.commands.send(Job(1))
    first = asyncio.create_task(dp.commands.send(Job(2)))
    second = asyncio.create_task(dp.commands.send(Job(3)))
    await asyncio.sleep(0)
    gate.set()
    await asyncio.sleep(0)  # Job(0) done: the room goes to Job(2)'s sender, which is cancelled
    first.cancel()
    await asyncio.gather(first, second, return_exceptions=True)
    await asyncio.wait_for(dp.stop(), 2)
    assert order == [0, 1, 3]


async def test_a_handler_sending_from_a_child_task_into_its_own_full_queue_completes() -> None:
    """ "Inside a worker" is a context variable: tasks a handler starts inherit it."""
    done: list[int] = []
    dp = Dispatcher(workers=1, queue_size=1)

    @dp.commands.register(Job)
    async def fan_out(cmd: Job) -> None:
        if cmd.n:
            done.append(cmd.n)
            return
        async with asyncio.TaskGroup() as group:
            for n in range(1, 4):
                group.create_task(dp.commands.send(Job(n)))  # the queue holds 1: never waits here

    async with dp:
        await dp.commands.send(Job(0))
        await asyncio.wait_for(dp.join(), 2)
    assert sorted(done) == [1, 2, 3]


async def test_concurrent_event_handlers_sending_into_their_own_full_queue_complete() -> None:
    done: list[int] = []
    dp = Dispatcher(workers=1, queue_size=1, concurrent_events=True)

    async def first(event: Tick) -> None:
        if event.n == 0:
            for n in range(1, 4):
                await dp.events.send(Tick(n))
        else:
            done.append(event.n)

    async def second(event: Tick) -> None:
        pass

    dp.events.bind(Tick, first)
    dp.events.bind(Tick, second)
    async with dp:
        await dp.events.send(Tick(0))
        await asyncio.wait_for(dp.join(), 2)
    assert sorted(done) == [1, 2, 3]


async def test_a_waiting_sender_cancelled_as_the_dispatcher_stops_raises_only_its_cancellation() -> None:
    dp = Dispatcher(workers=1, queue_size=1)
    gate = asyncio.Event()

    @dp.commands.register(Job)
    async def job(cmd: Job) -> None:
        await gate.wait()

    dp.start()
    await dp.commands.send(Job(0))
    await asyncio.sleep(0)
    await dp.commands.send(Job(1))
    waiting = asyncio.create_task(dp.commands.send(Job(2)))
    await asyncio.sleep(0)
    stopping = asyncio.create_task(dp.stop(timeout=0))
    await asyncio.sleep(0)  # the stop refused the waiting sender...
    waiting.cancel()  # ...which is cancelled before it could see it
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await stopping == 2


# -- found by the adversarial review ---------------------------------------------------------


async def test_a_newcomer_never_overtakes_a_sender_that_was_handed_room() -> None:
    """Room handed to a waiting sender is held for it: a sender arriving meanwhile lines up
    behind it, also for the same ordering key."""
    started: list[int] = []
    accepted: list[int] = []
    dp = Dispatcher(workers=2, queue_size=2)

    @dp.commands.register(Job)
    async def job(cmd: Job) -> None:
        started.append(cmd.n)

    dp.start()

    async def send(n: int) -> None:
        await dp.commands.send(Job(n), key="a")
        accepted.append(n)

    sends = [asyncio.create_task(send(n)) for n in (1, 2, 3)]  # 3 waits for room
    await asyncio.sleep(0)
    sends.append(asyncio.create_task(send(4)))  # arrives while 3 waits, or holds room
    await asyncio.gather(*sends)
    await dp.join()
    assert accepted == [1, 2, 3, 4]
    assert started == [1, 2, 3, 4]
    await dp.stop()


async def test_an_error_hook_that_raises_cancelled_error_is_logged_and_the_worker_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def hook(error: BaseException, message: object) -> None:
        inner = asyncio.create_task(asyncio.sleep(1))
        inner.cancel()
        await inner  # raises CancelledError out of the hook

    dp = Dispatcher(workers=1, on_error=hook)

    @dp.commands.register(Job)
    async def job(cmd: Job) -> None:
        if cmd.n == 0:
            raise Boom

    dp.start()
    for n in range(3):
        await dp.commands.send(Job(n))
    await asyncio.wait_for(dp.join(), 2)
    stats = dp.statistics().commands
    assert (stats.handled, stats.failed) == (2, 1)
    assert "pybus: the on_error hook was cancelled while reporting Boom()" in caplog.text
    assert await asyncio.wait_for(dp.stop(), 2) == 0


async def test_every_pool_stops_taking_work_before_any_is_awaited() -> None:
    """Past the deadline, a pool whose handler is slow to cancel does not let another pool
    start what it still has queued."""
    dp = Dispatcher(workers=1)

    @dp.events.register(Tick)
    async def slow_to_cancel(event: Tick) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.2)  # a graceful cleanup
            raise

    @dp.commands.register(Job)
    async def job(cmd: Job) -> None:
        await asyncio.sleep(0.01)

    dp.start()
    await dp.events.send(Tick(0))
    for n in range(50):
        await dp.commands.send(Job(n))
    await asyncio.sleep(0.03)
    before = dp.statistics().commands.handled
    unhandled = await dp.stop(timeout=0)
    after = dp.statistics().commands.handled
    assert after <= before + 1  # the one in flight may finish; nothing queued starts
    assert unhandled == 1 + 50 - after


async def test_an_unhashable_key_is_refused_at_once_also_on_a_full_queue() -> None:
    from pybus import InvalidMessage

    dp = Dispatcher(workers=1, queue_size=1)
    gate = asyncio.Event()
    dp.commands.bind(Job, lambda cmd: gate.wait())
    dp.start()
    await dp.commands.send(Job(0))
    await asyncio.sleep(0)
    await dp.commands.send(Job(1))  # full
    with pytest.raises(InvalidMessage):
        await asyncio.wait_for(dp.commands.send(Job(2), key={"a": 1}), 1)  # not after waiting
    with pytest.raises(InvalidMessage):
        dp.commands.send_nowait(Job(2), key=[1])  # not QueueFull
    gate.set()
    assert await dp.stop() == 0


async def test_dp_send_before_start_names_the_kind_the_key_is_registered_under() -> None:
    from pybus import DispatcherNotStarted

    dp = Dispatcher()
    dp.commands.bind(Job, lambda cmd: None)
    with pytest.raises(DispatcherNotStarted, match="Cannot handle command Job"):
        await dp.send(Job(1))
    await dp.stop()
    with pytest.raises(DispatcherClosed, match="Cannot take command Job"):
        await dp.send(Job(1))


async def test_the_warning_names_the_drain_timeout_a_later_stop_set(caplog: pytest.LogCaptureFixture) -> None:
    dp = Dispatcher()
    dp.commands.bind(Job, lambda cmd: asyncio.sleep(10))
    dp.start()
    await dp.commands.send(Job(0))
    await asyncio.sleep(0)
    first = asyncio.create_task(dp.stop())
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="pybus"):
        assert await dp.stop(timeout=0) == 1
    await first
    assert "not handled after a drain timeout of 0.0 s" in caplog.text


async def lane_cancelled_from_outside(dp: Dispatcher, handled: list[int]) -> asyncio.Task[None]:
    """Send Job(1), which hangs, and Job(2); cancel the worker running Job(1) from outside."""
    lanes: list[asyncio.Task[None]] = []
    started = asyncio.Event()

    @dp.commands.register(Job)
    async def job(cmd: Job) -> None:
        if cmd.n == 1:
            task = asyncio.current_task()
            assert task is not None
            lanes.append(task)
            started.set()
            await asyncio.get_running_loop().create_future()
        handled.append(cmd.n)

    dp.start()
    await dp.commands.send(Job(1))
    await dp.commands.send(Job(2))
    await started.wait()
    lanes[0].cancel()
    return lanes[0]


@pytest.mark.parametrize("turns", [0, 1, 2])
async def test_a_join_waiting_when_a_worker_is_cancelled_from_outside_starts_another(turns: int) -> None:
    handled: list[int] = []
    dp = Dispatcher(workers=1)
    await lane_cancelled_from_outside(dp, handled)
    for _ in range(turns):  # the join() comes before, as or after the lane ends
        await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await dp.join()
    assert handled == [2]
    assert await dp.stop() == 1  # Job(1), cancelled from outside


async def test_a_send_right_after_a_worker_ended_from_outside_starts_another() -> None:
    handled: list[int] = []
    dp = Dispatcher(workers=1)
    lane = await lane_cancelled_from_outside(dp, handled)
    while not lane.done():  # noqa: ASYNC110 - one turn at a time: the send comes as soon as it is done
        await asyncio.sleep(0)
    await dp.commands.send(Job(3))
    async with asyncio.timeout(5):
        await dp.join()
    assert handled == [2, 3]
    stats = dp.statistics().commands
    assert (stats.handled, stats.failed, stats.unhandled) == (2, 0, 1)
    await dp.stop()


async def test_an_error_hook_assigned_later_hears_the_failures_that_follow() -> None:
    dp = Dispatcher()
    default = dp.on_error
    first, second = Errors(), Errors()
    dp.on_error = first  # before start()

    @dp.commands.register(Job)
    async def fail(cmd: Job) -> None:
        raise Boom(f"job {cmd.n}")

    async with dp:
        await dp.commands.send(Job(1))
        await dp.join()
        dp.on_error = second  # while running
        await dp.commands.send(Job(2))
        await dp.join()
    assert [str(error) for error, _ in first.seen] == ["job 1"]
    assert [str(error) for error, _ in second.seen] == ["job 2"]
    assert dp.on_error is second
    with pytest.raises(ImproperlyConfigured, match=r"must accept two positional arguments"):
        dp.on_error = lambda error: None  # type: ignore[assignment]
    dp.on_error = None
    assert dp.on_error is default  # the default hook back


async def _yielding_hook(error: BaseException, message: object) -> AsyncIterator[None]:
    yield


def _generator_hook(error: BaseException, message: object) -> Iterator[None]:
    yield


@pytest.mark.parametrize("hook", [_yielding_hook, _generator_hook])
def test_a_generator_function_is_refused_as_error_hook(hook: Any) -> None:
    with pytest.raises(ImproperlyConfigured, match=r"is a generator function \(it yields\)"):
        Dispatcher(on_error=hook)
