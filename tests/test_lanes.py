"""A background handling runs in one task from its first step to its last.

Each asyncio path the lanes' hand-stepping touches, driven through a worker pool
and through a transport consumer: a handler's own `asyncio.timeout()`,
`asyncio.current_task().cancel()` from a handler, a cancellation from outside,
and a handler that awaits a future of another event loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

import pytest

from pybus import Dispatcher
from pybus.transport import InMemoryBroker, InMemoryTransport
from tests.cancelling import cancel_own_task
from tests.consuming import until


@dataclass(frozen=True)
class Job:
    n: int


class Errors(list[tuple[BaseException, object]]):
    def __call__(self, error: BaseException, message: object) -> None:
        self.append((error, message))


Handler = Callable[[Job], Awaitable[None]]


@asynccontextmanager
async def background(handler: Handler, errors: Errors) -> AsyncIterator[Callable[[Job], Awaitable[None]]]:
    """A dispatcher with one worker running `handler`; yields a function that sends a job."""
    dp = Dispatcher(workers=1, on_error=errors)
    dp.commands.bind(Job, handler)
    async with dp:
        yield dp.commands.send
        await asyncio.wait_for(dp.join(), 5)


@asynccontextmanager
async def consumed(handler: Handler, errors: Errors) -> AsyncIterator[Callable[[Job], Awaitable[None]]]:
    """A dispatcher consuming routed jobs with one lane; yields a function that sends a job."""
    broker = InMemoryBroker()
    sender = Dispatcher(transport=InMemoryTransport(broker))
    sender.route(Job, kind="command")
    worker = Dispatcher(transport=InMemoryTransport(broker), on_error=errors)
    worker.route(Job)
    worker.commands.bind(Job, handler)
    async with sender, worker:
        consumer = worker.consumer(concurrency=1, max_deliveries=1, wait=0.01)
        reading = asyncio.create_task(consumer.run())
        yield sender.send
        await consumer.stop(5)
        await reading


Send = Callable[[Job], Awaitable[None]]
Runner = Callable[[Handler, Errors], AbstractAsyncContextManager[Send]]


@pytest.fixture(params=["workers", "consumer"])
def runner(request: pytest.FixtureRequest) -> Runner:
    return background if request.param == "workers" else consumed


async def test_a_handler_timeout_fails_that_handling_only(runner: Runner) -> None:
    """asyncio.timeout() inside a handler cancels the handling's own task: the handling
    fails with TimeoutError and the next message is handled (under a consumer, the
    reader is never the task that gets cancelled)."""
    errors = Errors()
    done: list[int] = []

    async def handler(job: Job) -> None:
        if job.n == 0:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(10)
        done.append(job.n)

    async with runner(handler, errors) as send:
        await send(Job(0))
        await send(Job(1))
        await until(lambda: done == [1] and len(errors) == 1)
    assert [type(error) for error, _ in errors] == [TimeoutError]


async def test_a_handler_that_cancels_its_own_task_fails_and_the_lane_lives_on(
    runner: Runner,
) -> None:
    errors = Errors()
    done: list[int] = []

    async def handler(job: Job) -> None:
        if job.n == 0:
            cancel_own_task()
            await asyncio.sleep(0)  # the cancellation arrives here
        done.append(job.n)

    async with runner(handler, errors) as send:
        await send(Job(0))
        await send(Job(1))
        await until(lambda: done == [1] and len(errors) == 1)
    assert [type(error) for error, _ in errors] == [asyncio.CancelledError]
    assert errors[0][1] == Job(0)


async def test_a_cancel_requested_but_never_awaited_does_not_reach_the_next_handling(
    runner: Runner,
) -> None:
    """A handler that asks for its own cancellation and returns without awaiting: the
    request must not cancel the next message's handling."""
    errors = Errors()
    done: list[int] = []

    async def handler(job: Job) -> None:
        if job.n == 0:
            cancel_own_task()
            done.append(job.n)
            return
        await asyncio.sleep(0.001)
        done.append(job.n)

    async with runner(handler, errors) as send:
        await send(Job(0))
        await send(Job(1))
        await until(lambda: done == [0, 1])
    assert errors == []


async def test_a_handler_awaiting_a_future_of_another_loop_fails_cleanly(
    runner: Runner,
) -> None:
    errors = Errors()
    done: list[int] = []
    other = asyncio.new_event_loop()
    foreign = other.create_future()

    async def handler(job: Job) -> None:
        if job.n == 0:
            await foreign
        done.append(job.n)

    try:
        async with runner(handler, errors) as send:
            await send(Job(0))
            await send(Job(1))
            await until(lambda: done == [1] and len(errors) == 1)
    finally:
        other.close()
    assert isinstance(errors[0][0], RuntimeError)
    assert "attached to a different loop" in str(errors[0][0])


async def test_each_step_of_a_handling_runs_in_its_own_context_and_task() -> None:
    """The steps of one handling see its sender's context and one task, whatever other
    handlings the lane ran in between."""
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
    seen: list[tuple[str, str, bool]] = []
    gate = asyncio.Event()

    async def handler(job: Job) -> None:
        first = asyncio.current_task()
        value = request_id.get()
        await gate.wait()
        seen.append((value, request_id.get(), asyncio.current_task() is first))

    dp = Dispatcher(workers=2)
    dp.commands.bind(Job, handler)
    async with dp:
        for n in range(2):
            token = request_id.set(f"r{n}")
            await dp.commands.send(Job(n))
            request_id.reset(token)
        await asyncio.sleep(0.01)
        gate.set()
        await dp.join()
    assert sorted(seen) == [("r0", "r0", True), ("r1", "r1", True)]


async def test_a_worker_cancelled_from_outside_ends_and_its_message_is_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started = asyncio.Event()

    async def handler(job: Job) -> None:
        started.set()
        await asyncio.sleep(10)

    dp = Dispatcher(workers=1)
    dp.commands.bind(Job, handler)
    dp.start()
    await dp.commands.send(Job(0))
    await started.wait()
    (lane,) = [task for task in asyncio.all_tasks() if task.get_name() == "pybus-command-worker-0"]
    lane.cancel()  # as asyncio.run does to every task left when the loop ends
    await asyncio.wait([lane])
    assert "a command worker was cancelled from outside while handling Job(n=0)" in caplog.text
    stats = dp.statistics().commands
    assert (stats.in_flight, stats.unhandled) == (0, 1)
    assert await dp.stop() == 1


async def test_a_consumer_lane_cancelled_from_outside_gives_its_envelope_back() -> None:
    errors = Errors()
    started = asyncio.Event()

    async def handler(job: Job) -> None:
        started.set()
        await asyncio.sleep(10)

    async with consumed(handler, errors) as send:
        await send(Job(0))
        await started.wait()
        (lane,) = [task for task in asyncio.all_tasks() if task.get_name() == "pybus-consumer-0"]
        lane.cancel()
        await asyncio.wait([lane])
    assert errors == []


async def test_a_send_from_another_thread_is_refused() -> None:
    from pybus import ForeignEventLoop

    dp = Dispatcher()
    dp.commands.bind(Job, lambda job: None)
    async with dp:
        await dp.commands.send(Job(0))  # the lanes run in this loop
        failures: list[BaseException] = []

        def elsewhere() -> None:
            try:
                asyncio.run(dp.commands.send(Job(1)))
            except BaseException as exc:
                failures.append(exc)

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        await dp.join()
    assert len(failures) == 1
    assert isinstance(failures[0], ForeignEventLoop)
    assert "this dispatcher runs in another event loop" in str(failures[0])
    assert dp.statistics().commands.handled == 1


def test_a_dispatcher_used_in_a_second_event_loop_says_so() -> None:
    """A module-level dispatcher started in one test's loop and used in the next one's."""
    from pybus import ForeignEventLoop

    handled: list[int] = []
    dp = Dispatcher()
    dp.commands.bind(Job, lambda job: handled.append(job.n))
    dp.start()

    async def send(n: int) -> None:
        await dp.commands.send(Job(n))
        await dp.join()

    asyncio.run(send(0))  # the first loop ends without dp.stop(): its workers are gone
    with pytest.raises(ForeignEventLoop, match="Cannot send command Job: this dispatcher runs"):
        asyncio.run(send(1))
    assert handled == [0]


async def test_a_late_cancel_of_a_finished_handling_ends_one_lane_and_join_replaces_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler that leaves a timer to cancel its task after it finished (not
    asyncio.timeout()) cancels whatever its lane runs then: that handling is counted as not
    handled, and the pool does not stall: join() starts a lane again."""
    done: list[int] = []

    async def handler(job: Job) -> None:
        task = asyncio.current_task()
        assert task is not None
        if job.n == 0:
            asyncio.get_running_loop().call_later(0.05, task.cancel)  # never cleared
            return
        await asyncio.sleep(0.2 if job.n == 1 else 0)
        done.append(job.n)

    dp = Dispatcher(workers=1)
    dp.commands.bind(Job, handler)
    dp.start()
    for n in range(3):
        await dp.commands.send(Job(n))
    await asyncio.sleep(0.3)
    await asyncio.wait_for(dp.join(), 2)
    assert done == [2]
    assert "a command worker was cancelled from outside while handling Job(n=1)" in caplog.text
    assert await dp.stop() == 1


async def test_a_taskgroup_that_leaves_a_cancel_count_on_its_parent_does_not_end_the_lane() -> None:
    """On CPython 3.11 a TaskGroup whose child fails while it exits never uncancels its
    parent; the count it leaves must neither end the lane nor give the envelope back."""
    errors = Errors()
    handled: list[int] = []

    async def fail() -> None:
        raise Boom

    async def handler(job: Job) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(fail())
        except* Boom:
            pass
        handled.append(job.n)

    async with consumed(handler, errors) as send:
        for n in range(3):
            await send(Job(n))
        await until(lambda: sorted(handled) == [0, 1, 2])
    assert errors == []
    assert sorted(handled) == [0, 1, 2]  # each once: none given back and handled again


class Boom(Exception):
    pass


async def test_consumer_stop_awaited_by_a_task_its_handling_started_is_refused_not_a_hang() -> None:
    from pybus import WouldDeadlock

    refused: list[str] = []
    broker = InMemoryBroker()
    sender = Dispatcher(transport=InMemoryTransport(broker))
    sender.route(Job, kind="command")
    worker = Dispatcher(transport=InMemoryTransport(broker))
    worker.route(Job)

    @worker.commands.register(Job)
    async def job(cmd: Job) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(consumer.stop())
        except* WouldDeadlock as caught:
            refused.append(str(caught.exceptions[0]))

    async with sender, worker:
        consumer = worker.consumer(wait=0.01)
        reading = asyncio.create_task(consumer.run())
        await sender.send(Job(1))
        await until(lambda: bool(refused))
        assert await asyncio.wait_for(consumer.stop(), 2) == 0
        await reading
    assert refused[0].startswith("consumer.stop() cannot be awaited from inside a background handling")
