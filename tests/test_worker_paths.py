"""A worker's two paths through a handling agree.

A lane finishes most handlings in their first step (`pybus.lanes.handlings`
returns DONE and the worker counts it at once); a handling that waits, fails or
asks for its own cancellation takes the general path (`rest_of`, the error hook,
`settle`). Each scenario here runs twice, once with handlers that never wait and
once with the same handlers waiting (`await asyncio.sleep(0)`) before they act,
and both runs must give the same outcome: results, order per key, errors as the
hook hears them, join, stop with messages pending, cancellation, context
propagation, tracking and the observer.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from pybus import Dispatcher, HandlingContext, current_context
from pybus.errors import Kind
from pybus.observer import Observer
from tests.cancelling import cancel_own_task
from tests.consuming import until

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
scratch: contextvars.ContextVar[str] = contextvars.ContextVar("scratch", default="clean")


@dataclass(frozen=True)
class Job:
    n: int
    key: str = ""


@dataclass(frozen=True)
class Done:
    n: int


class Boom(Exception):
    pass


Scenario = Callable[[bool], Awaitable[Any]]


async def step(waits: bool) -> None:
    """Nothing, or one wait: the handler then finishes in a later step than its first."""
    if waits:
        await asyncio.sleep(0)


async def agree(scenario: Scenario) -> Any:
    """Run `scenario` without and with waiting handlers; both outcomes must be equal."""
    first_step = await scenario(False)
    later_steps = await scenario(True)
    assert first_step == later_steps
    return first_step


def totals(dp: Dispatcher) -> tuple[int, int, int, int, int]:
    stats = dp.statistics().commands
    return stats.queued, stats.in_flight, stats.handled, stats.failed, stats.unhandled


async def test_results_order_and_statistics() -> None:
    async def scenario(waits: bool) -> Any:
        done: list[int] = []
        dp = Dispatcher(workers=1)

        @dp.commands.register(Job)
        async def job(cmd: Job) -> None:
            await step(waits)
            done.append(cmd.n)

        async with dp:
            for n in range(20):
                await dp.commands.send(Job(n))
            await dp.join()
            return done, totals(dp)

    assert await agree(scenario) == (list(range(20)), (0, 0, 20, 0, 0))


async def test_errors_reach_the_hook_with_their_notes_in_the_messages_context() -> None:
    async def scenario(waits: bool) -> Any:
        heard: list[tuple[str, str, object, list[str], str]] = []

        def hook(error: BaseException, message: object) -> None:
            notes = getattr(error, "__notes__", [])
            heard.append((type(error).__name__, str(error), message, notes, request_id.get()))

        dp = Dispatcher(workers=1, on_error=hook)

        @dp.commands.register(Job)
        async def job(cmd: Job) -> None:
            await step(waits)
            if cmd.n % 2:
                raise Boom(f"job {cmd.n}")

        async with dp:
            for n in range(4):
                token = request_id.set(f"request {n}")
                await dp.commands.send(Job(n))
                request_id.reset(token)
            await dp.join()
            return heard, totals(dp)

    heard, counts = await agree(scenario)
    assert counts == (0, 0, 2, 2, 0)
    assert [(name, text, message, value) for name, text, message, _, value in heard] == [
        ("Boom", "job 1", Job(1), "request 1"),
        ("Boom", "job 3", Job(3), "request 3"),
    ]
    assert heard[0][3][-1].startswith("while handling command Job in the background (")


async def test_each_failing_event_handler_is_heard_once() -> None:
    async def scenario(waits: bool) -> Any:
        heard: list[str] = []
        dp = Dispatcher(on_error=lambda error, message: heard.append(str(error)))
        for name in ("first", "second"):

            async def failing(event: Done, name: str = name) -> None:
                await step(waits)
                raise Boom(name)

            dp.events.bind(Done, failing)
        async with dp:
            await dp.events.send(Done(1))
            await dp.join()
            stats = dp.statistics().events
            return sorted(heard), (stats.handled, stats.failed)

    assert await agree(scenario) == (["first", "second"], (0, 1))


async def job_0_then_job_1(
    waits: bool, first: Callable[[], Awaitable[None]]
) -> tuple[list[tuple[str, object]], list[int], tuple[int, int, int, int, int]]:
    """Job(0) then Job(1) on one worker: Job(0) awaits `first` (after `step`), Job(1) one
    turn of the loop (where a cancellation left over would land); each records its n once
    done. Returns what the hook heard (error type, message), the n done, the totals."""
    heard: list[tuple[str, object]] = []
    done: list[int] = []
    dp = Dispatcher(workers=1, on_error=lambda error, msg: heard.append((type(error).__name__, msg)))

    @dp.commands.register(Job)
    async def job(cmd: Job) -> None:
        await step(waits)
        if cmd.n == 0:
            await first()
        else:
            await asyncio.sleep(0)
        done.append(cmd.n)

    async with dp:
        await dp.commands.send(Job(0))
        await dp.commands.send(Job(1))
        await dp.join()
        return heard, done, totals(dp)


async def test_a_cancelled_error_raised_by_a_handler_fails_it_and_the_lane_goes_on() -> None:
    async def first() -> None:
        raise asyncio.CancelledError  # as a cancelled inner task would

    async def scenario(waits: bool) -> Any:
        return await job_0_then_job_1(waits, first)

    assert await agree(scenario) == ([("CancelledError", Job(0))], [1], (0, 0, 1, 1, 0))


async def test_a_cancel_asked_for_and_not_awaited_is_dropped_before_the_next_message() -> None:
    async def first() -> None:
        cancel_own_task()  # and return without awaiting: handled

    async def scenario(waits: bool) -> Any:
        return await job_0_then_job_1(waits, first)

    assert await agree(scenario) == ([], [0, 1], (0, 0, 2, 0, 0))


async def test_a_handler_cancelling_its_own_task_and_awaiting_fails_alike() -> None:
    async def first() -> None:
        cancel_own_task()
        await asyncio.sleep(0)  # the cancellation arrives here

    async def scenario(waits: bool) -> Any:
        return await job_0_then_job_1(waits, first)

    assert await agree(scenario) == ([("CancelledError", Job(0))], [1], (0, 0, 1, 1, 0))


async def test_messages_with_one_key_are_handled_one_at_a_time_in_send_order() -> None:
    async def scenario(waits: bool) -> Any:
        running: set[str] = set()
        overlaps: list[str] = []
        seen: dict[str, list[int]] = {}
        dp = Dispatcher(workers=4)

        @dp.commands.register(Job)
        async def job(cmd: Job) -> None:
            if cmd.key in running:
                overlaps.append(cmd.key)
            running.add(cmd.key)
            await step(waits)
            seen.setdefault(cmd.key, []).append(cmd.n)
            running.discard(cmd.key)

        async with dp:
            for n in range(60):
                key = "abc"[n % 3]
                await dp.commands.send(Job(n, key), key=key)
            await dp.join()
            return overlaps, seen, dp.statistics().commands.active_keys

    overlaps, seen, active = await agree(scenario)
    assert overlaps == []
    assert seen == {key: list(range(i, 60, 3)) for i, key in enumerate("abc")}
    assert active == 0


async def test_join_waits_for_sends_from_handlers_and_for_an_async_hook() -> None:
    async def scenario(waits: bool) -> Any:
        log: list[str] = []

        async def hook(error: BaseException, message: object) -> None:
            await asyncio.sleep(0)
            log.append(f"hook {error}")

        dp = Dispatcher(on_error=hook)

        @dp.commands.register(Job)
        async def job(cmd: Job) -> None:
            await step(waits)
            await dp.events.send(Done(cmd.n))

        @dp.events.register(Done)
        async def done(event: Done) -> None:
            await step(waits)
            log.append(f"done {event.n}")
            if event.n == 2:
                raise Boom(event.n)

        async with dp:
            for n in range(3):
                await dp.commands.send(Job(n))
            await dp.join()
            return sorted(log)

    assert await agree(scenario) == ["done 0", "done 1", "done 2", "hook 2"]


async def test_statistics_count_a_failing_message_once_while_its_async_hook_runs() -> None:
    """Sent = queued + in flight + handled + failed + unhandled also while the hook is
    awaited: the message is in flight until the hook is done, failed after."""

    async def scenario(waits: bool) -> Any:
        during: list[tuple[int, int, int, int, int]] = []

        async def hook(error: BaseException, message: object) -> None:
            during.append(totals(dp))
            await asyncio.sleep(0)
            during.append(totals(dp))

        dp = Dispatcher(workers=1, on_error=hook)

        @dp.commands.register(Job)
        async def job(cmd: Job) -> None:
            await step(waits)
            raise Boom(cmd.n)

        async with dp:
            await dp.commands.send(Job(0))
            await dp.join()
            return during, totals(dp)

    during, after = await agree(scenario)
    assert during == [(0, 1, 0, 0, 0), (0, 1, 0, 0, 0)]
    assert after == (0, 0, 0, 1, 0)


async def test_stop_with_messages_pending_counts_them_not_handled() -> None:
    async def scenario(waits: bool) -> Any:
        done: list[int] = []
        blocked = asyncio.Event()
        dp = Dispatcher(workers=1)

        @dp.commands.register(Job)
        async def job(cmd: Job) -> None:
            if cmd.n == 5:
                blocked.set()
                await asyncio.Event().wait()  # never set: stop() cancels it
            await step(waits)
            done.append(cmd.n)

        dp.start()
        for n in range(10):
            await dp.commands.send(Job(n))
        await blocked.wait()
        unhandled = await dp.stop(timeout=0)
        return done, unhandled, totals(dp)

    assert await agree(scenario) == ([0, 1, 2, 3, 4], 5, (0, 0, 5, 0, 5))


async def test_a_worker_cancelled_from_outside_counts_its_message_and_is_replaced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario(waits: bool) -> Any:
        done: list[int] = []
        blocked = asyncio.Event()
        dp = Dispatcher(workers=1)

        @dp.commands.register(Job)
        async def job(cmd: Job) -> None:
            if cmd.n == 1:
                blocked.set()
                await asyncio.Event().wait()
            await step(waits)
            done.append(cmd.n)

        dp.start()
        await dp.commands.send(Job(0))
        await dp.commands.send(Job(1))
        await blocked.wait()
        (lane,) = [task for task in asyncio.all_tasks() if task.get_name() == "pybus-command-worker-0"]
        lane.cancel()
        await asyncio.wait([lane])
        await dp.commands.send(Job(2))  # starts a worker in its place
        await dp.join()
        counts = totals(dp)
        return done, counts, await dp.stop()

    with caplog.at_level(logging.WARNING, logger="pybus"):
        assert await agree(scenario) == ([0, 2], (0, 0, 2, 0, 1), 1)
    assert caplog.text.count("a command worker was cancelled from outside while handling Job(n=1") == 2


async def test_each_handling_sees_its_senders_context_and_leaves_nothing_behind() -> None:
    async def scenario(waits: bool) -> Any:
        seen: list[tuple[str, str, str]] = []
        dp = Dispatcher(workers=1)

        @dp.commands.register(Job)
        async def job(cmd: Job) -> None:
            before = scratch.get()
            scratch.set(f"set by {cmd.n}")
            await step(waits)
            seen.append((request_id.get(), before, scratch.get()))

        async with dp:
            for n in range(3):
                token = request_id.set(f"request {n}")
                await dp.commands.send(Job(n))
                request_id.reset(token)
            await dp.join()
        return seen, scratch.get()

    assert await agree(scenario) == (
        [(f"request {n}", "clean", f"set by {n}") for n in range(3)],
        "clean",
    )


async def test_a_handler_and_its_child_task_send_into_their_own_full_queue_without_waiting() -> None:
    async def scenario(waits: bool) -> Any:
        done: list[int] = []
        dp = Dispatcher(workers=1, queue_size=1)

        @dp.commands.register(Job)
        async def job(cmd: Job) -> None:
            await step(waits)
            if cmd.n == 0:
                for n in (1, 2):  # past the capacity of 1: accepted, from inside
                    await dp.commands.send(Job(n))
                await asyncio.create_task(dp.commands.send(Job(3)))  # inside too
            done.append(cmd.n)

        async with dp:
            await dp.commands.send(Job(0))
            await asyncio.wait_for(dp.join(), 5)
            return done

    assert await agree(scenario) == [0, 1, 2, 3]


async def test_tracked_handlings_are_caused_by_their_sender() -> None:
    async def scenario(waits: bool) -> Any:
        found: dict[str, HandlingContext] = {}
        dp = Dispatcher(context=True)

        def remember(name: str) -> None:
            context = current_context()
            assert context is not None
            found[name] = context

        @dp.commands.register(Job)
        async def job(cmd: Job) -> None:
            remember("sender")
            await dp.events.send(Done(cmd.n))

        @dp.events.register(Done)
        async def done(event: Done) -> None:
            await step(waits)
            remember("background")

        async with dp:
            await dp.execute(Job(1))
            await dp.join()
        sender, background = found["sender"], found["background"]
        return (
            background.correlation_id == sender.message_id,
            background.causation_id == sender.message_id,
            background.message_id != sender.message_id,
            background.kind,
        )

    assert await agree(scenario) == (True, True, True, "event")


class Recorder(Observer):
    """Records queued and dequeued, with the request id of the context each is told in."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Kind, object, str]] = []

    def queued(self, kind: Kind, message: object) -> None:
        self.log.append(("queued", kind, message, request_id.get()))

    def dequeued(self, kind: Kind, message: object) -> None:
        self.log.append(("dequeued", kind, message, request_id.get()))


async def test_the_observer_hears_each_message_queued_and_dequeued_in_its_context() -> None:
    async def scenario(waits: bool) -> Any:
        dp = Dispatcher(workers=1, on_error=lambda error, message: None)

        @dp.commands.register(Job)
        async def job(cmd: Job) -> None:
            await step(waits)
            if cmd.n == 1:
                raise Boom(cmd.n)

        recorder = Recorder()
        async with dp:
            dp.attach_observer(recorder)
            for n in range(3):
                token = request_id.set(f"request {n}")
                await dp.commands.send(Job(n), key="k" if n else None)
                request_id.reset(token)
            await dp.join()
        return [entry for entry in recorder.log if entry[0] in ("queued", "dequeued")]

    log = await agree(scenario)
    assert [(event, message, value) for event, _, message, value in log] == [
        ("queued", Job(0), "request 0"),
        ("queued", Job(1), "request 1"),
        ("queued", Job(2), "request 2"),
        ("dequeued", Job(0), "request 0"),
        ("dequeued", Job(1), "request 1"),
        ("dequeued", Job(2), "request 2"),
    ]


async def test_stop_tells_the_observer_of_each_message_it_drops_in_that_messages_context() -> None:
    """Messages still queued when stop() cancels, ready ones and ones waiting for their
    key's turn, are each dequeued once, in their own context, and counted."""

    async def scenario(waits: bool) -> Any:
        blocked = asyncio.Event()
        dp = Dispatcher(workers=1)

        @dp.commands.register(Job)
        async def job(cmd: Job) -> None:
            await step(waits)
            blocked.set()
            await asyncio.Event().wait()  # never set: stop() cancels it

        recorder = Recorder()
        dp.start()
        dp.attach_observer(recorder)
        for n, key in enumerate(["a", "a", None, "b", "a", "b", None]):
            token = request_id.set(f"request {n}")
            await dp.commands.send(Job(n, key or ""), key=key)
            request_id.reset(token)
        await blocked.wait()
        unhandled = await dp.stop(timeout=0)
        dequeued = sorted(
            (message.n, value)
            for event, _, message, value in recorder.log
            if event == "dequeued" and isinstance(message, Job)
        )
        return unhandled, dequeued, totals(dp)

    unhandled, dequeued, counts = await agree(scenario)
    assert unhandled == 7  # the one in flight, cancelled, and the six queued, dropped
    assert dequeued == [(n, f"request {n}") for n in range(7)]
    assert counts == (0, 0, 0, 0, 7)


async def test_a_thousand_messages_from_two_senders_are_each_handled_once() -> None:
    """Senders that wait for room (a small queue) and lanes that alternate between
    handlings done in their first step and handlings that wait."""

    async def scenario(waits: bool) -> Any:
        done: list[int] = []
        dp = Dispatcher(workers=3, queue_size=7)

        @dp.commands.register(Job)
        async def job(cmd: Job) -> None:
            if cmd.n % 3 == 0:
                await step(waits)
            done.append(cmd.n)

        async def sender(first: int) -> None:
            for n in range(first, 1000, 2):
                await dp.commands.send(Job(n), key=n % 5 or None)

        async with dp:
            await asyncio.gather(sender(0), sender(1))
            await until(lambda: len(done) == 1000)
            await dp.join()
            return sorted(done), totals(dp)

    assert await agree(scenario) == (list(range(1000)), (0, 0, 1000, 0, 0))


@pytest.mark.parametrize("fails", [False, True], ids=["returns", "raises"])
async def test_a_worker_cancelled_from_outside_at_any_turn_of_a_handling_counts_its_message_once(
    fails: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The lane is cancelled after 0, 1, 2, ... turns of the event loop: in the handler's
    waits, as it returns or raises, in the error hook's waits, between two handlings. Each
    time the message is counted once (handled, failed, or unhandled with a warning), join()
    returns, and the next message is handled by the lane started in its place."""

    async def cancelled_after(turns: int) -> tuple[int, int, int, int, int]:
        done: list[int] = []
        heard: list[object] = []

        async def hook(error: BaseException, message: object) -> None:
            for _ in range(3):
                await asyncio.sleep(0)
            heard.append(message)

        dp = Dispatcher(workers=1, on_error=hook)

        @dp.commands.register(Job)
        async def job(cmd: Job) -> None:
            if cmd.n == 0:
                for _ in range(3):
                    await asyncio.sleep(0)
                if fails:
                    raise Boom(cmd.n)
            done.append(cmd.n)

        caplog.clear()
        dp.start()
        await dp.commands.send(Job(0))
        (lane,) = [task for task in asyncio.all_tasks() if task.get_name() == "pybus-command-worker-0"]
        for _ in range(turns):
            await asyncio.sleep(0)
        lane.cancel()
        await asyncio.wait([lane])
        await dp.commands.send(Job(1))  # starts a worker in its place
        await asyncio.wait_for(dp.join(), 5)
        counts = totals(dp)
        queued, in_flight, handled, failed, unhandled = counts
        assert await dp.stop() == unhandled
        assert (queued, in_flight, handled + failed + unhandled) == (0, 0, 2)
        assert 1 in done
        assert done.count(0) == handled - 1  # Job(0) is handled at most once
        assert len(heard) <= failed  # a hook cut by the cancellation counts the failure too
        assert caplog.text.count("cancelled from outside while handling Job(n=0") == unhandled
        return counts

    with caplog.at_level(logging.WARNING, logger="pybus"):
        outcomes = {await cancelled_after(turns) for turns in range(12)}
    # Every outcome was met: cut in the handling, and left alone.
    assert outcomes == ({(0, 0, 1, 1, 0), (0, 0, 1, 0, 1)} if fails else {(0, 0, 2, 0, 0), (0, 0, 1, 0, 1)})
