"""The dispatcher's lifecycle: new, started, stopping, stopped, under interruption.

Each test tries to break one promise of `stop()` and `serve()`: a stop that is
cancelled, called twice or concurrently, called from a handler, given a bad
timeout; a serve() that is cancelled, stopped from code, or loses its consumer;
and what "closed" means afterwards.
"""

from __future__ import annotations

import asyncio
import math
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest

from pybus import (
    Dispatcher,
    DispatcherClosed,
    DispatcherFrozen,
    ImproperlyConfigured,
    Singleton,
    State,
    TransportError,
    WouldDeadlock,
)
from pybus.codec import default_name
from pybus.transport import Envelope, InMemoryBroker, InMemoryTransport
from tests.consuming import until


@dataclass(frozen=True)
class Job:
    n: int


@dataclass(frozen=True)
class Ask:
    n: int


@dataclass(frozen=True)
class Happened:
    n: int


class Resource:
    """A Singleton's value whose teardown is counted."""

    closed = 0

    def __init__(self) -> None:
        self.open = True


def resource_provider(log: list[str]) -> Singleton:
    def make() -> Iterator[Resource]:
        log.append("made")
        resource = Resource()
        yield resource
        resource.open = False
        log.append("torn down")

    return Singleton(make)


class Errors(list[tuple[BaseException, object]]):
    def __call__(self, error: BaseException, message: object) -> None:
        self.append((error, message))


def slow_app(log: list[str], release: asyncio.Event, errors: Errors | None = None) -> Dispatcher:
    dp = Dispatcher(workers=2, on_error=errors)
    resource = resource_provider(log)

    @dp.commands.register(Job, resource=resource)
    async def job(cmd: Job, resource: Resource) -> None:
        assert resource.open
        await release.wait()
        log.append(f"job {cmd.n}")

    return dp


def state_of(dp: Dispatcher) -> State:
    return dp.state


# -- stop() --------------------------------------------------------------------------


async def test_a_cancelled_stop_leaves_the_shutdown_going_and_a_later_stop_returns_its_count() -> None:
    log: list[str] = []
    release = asyncio.Event()
    dp = slow_app(log, release)
    dp.start()
    for n in range(4):
        await dp.commands.send(Job(n))
    await asyncio.sleep(0.01)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(dp.stop(), 0.05)  # the caller gives up; the shutdown goes on
    assert dp.state is State.STOPPING
    with pytest.raises(DispatcherClosed):
        await dp.commands.send(Job(9))  # stopping: nothing new from outside
    release.set()
    assert await dp.stop() == 0  # the drain finished everything queued before the first stop
    assert state_of(dp) is State.STOPPED
    assert sorted(line for line in log if line.startswith("job")) == [f"job {n}" for n in range(4)]
    assert log.count("made") == 1
    assert log.count("torn down") == 1
    stats = dp.statistics().commands
    assert (stats.handled, stats.failed, stats.unhandled, stats.queued, stats.in_flight) == (4, 0, 0, 0, 0)


async def test_a_later_stop_with_a_timeout_cuts_a_drain_short() -> None:
    log: list[str] = []
    dp = slow_app(log, asyncio.Event())  # never released
    dp.start()
    for n in range(5):
        await dp.commands.send(Job(n))
    await asyncio.sleep(0.01)
    first = asyncio.create_task(dp.stop())  # no timeout: would wait forever
    await asyncio.sleep(0.01)
    assert await asyncio.wait_for(dp.stop(timeout=0), 2) == 5  # 2 in flight cancelled, 3 never started
    assert await first == 5  # the first call returns the same count
    assert log.count("torn down") == 1
    assert await dp.stop() == 5  # and so does a call after the end


async def test_two_stops_at_once_share_one_shutdown() -> None:
    log: list[str] = []
    release = asyncio.Event()
    dp = slow_app(log, release)
    dp.start()
    await dp.commands.send(Job(0))
    stops = [asyncio.create_task(dp.stop()), asyncio.create_task(dp.stop())]
    await asyncio.sleep(0.01)
    assert not any(stop.done() for stop in stops)
    release.set()
    assert await asyncio.gather(*stops) == [0, 0]
    assert log == ["made", "job 0", "torn down"]


@pytest.mark.parametrize("timeout", ["5", -1, math.nan, True, [1]])
async def test_a_bad_stop_timeout_is_refused_and_changes_nothing(timeout: object) -> None:
    handled: list[int] = []
    dp = Dispatcher()
    dp.commands.bind(Job, lambda cmd: handled.append(cmd.n))
    dp.start()
    with pytest.raises(ImproperlyConfigured, match=r"timeout must be None \(no limit\) or a number"):
        await dp.stop(timeout)  # type: ignore[arg-type]
    assert dp.state is State.STARTED
    await dp.execute(Job(1))
    await dp.commands.send(Job(2))
    assert await dp.stop() == 0
    assert handled == [1, 2]


async def test_stop_from_inside_a_background_handler_is_refused_not_a_hang() -> None:
    errors = Errors()
    dp = Dispatcher(on_error=errors)

    @dp.commands.register(Job)
    async def shut_down(cmd: Job) -> None:
        await dp.stop()

    @dp.commands.register(Ask)
    async def wait_for_all(query: Ask) -> None:
        await dp.join()

    async with dp:
        await dp.commands.send(Job(0))
        await dp.commands.send(Ask(0))
        await asyncio.wait_for(dp.join(), 2)
    assert [type(error) for error, _ in errors] == [WouldDeadlock, WouldDeadlock]
    assert str(errors[0][0]).startswith(
        "dp.stop() cannot be awaited from inside a background handling of the same dispatcher: it "
        "waits for every background handling to finish, this one included"
    )
    assert str(errors[1][0]).startswith("dp.join() cannot be awaited from inside a background handling")


async def test_stop_from_inside_a_task_started_by_a_background_handler_is_refused_too() -> None:
    errors = Errors()
    dp = Dispatcher(on_error=errors, concurrent_events=True)

    async def first(event: Happened) -> None:
        await dp.stop()  # runs in a task of the event's task group

    async def second(event: Happened) -> None:
        pass

    dp.events.bind(Happened, first)
    dp.events.bind(Happened, second)
    async with dp:
        await dp.events.send(Happened(0))
        await asyncio.wait_for(dp.join(), 2)
    ((error, _),) = errors  # the failing handler's own exception, once
    assert isinstance(error, WouldDeadlock)


async def test_stop_from_an_inline_handler_stops_cleanly() -> None:
    """execute() runs in the caller's task, which stop() does not wait for."""
    handled: list[str] = []
    dp = Dispatcher()

    @dp.commands.register(Job)
    async def shut_down(cmd: Job) -> int:
        await dp.queries.send(Ask(1))
        unhandled = await dp.stop()
        handled.append("stopped")
        return unhandled

    dp.queries.bind(Ask, lambda query: handled.append("ask"))
    dp.start()
    assert await asyncio.wait_for(dp.execute(Job(0)), 2) == 0
    assert handled == ["ask", "stopped"]
    assert dp.state is State.STOPPED


async def test_stop_before_start_closes_the_dispatcher_for_good() -> None:
    transport = Closing()
    dp = Dispatcher(transport=transport)
    dp.commands.bind(Job, lambda cmd: None)
    assert await dp.stop() == 0
    assert dp.state is State.STOPPED
    assert transport.closed == 1
    with pytest.raises(DispatcherClosed, match="Cannot start this dispatcher: it was stopped"):
        dp.start()
    with pytest.raises(DispatcherClosed, match="Cannot take command Job"):
        await dp.execute(Job(1))
    with pytest.raises(DispatcherClosed, match="Cannot take command Job"):
        await dp.commands.send(Job(1))
    with pytest.raises(DispatcherClosed, match="Cannot register"):
        dp.queries.bind(Ask, lambda query: None)
    with pytest.raises(DispatcherClosed):
        async with dp:
            pass
    assert await dp.stop() == 0


async def test_a_stopped_dispatcher_cannot_start_again() -> None:
    dp = Dispatcher()
    async with dp:
        pass
    with pytest.raises(DispatcherClosed, match="a stopped dispatcher stays closed; build a new Dispatcher"):
        dp.start()
    with pytest.raises(DispatcherFrozen):
        dp.commands.bind(Job, lambda cmd: None)


# -- closed means closed -----------------------------------------------------------------


async def test_after_stop_every_entry_point_refuses_also_through_saved_references() -> None:
    dp = Dispatcher()
    dp.commands.bind(Job, lambda cmd: "done")
    dp.queries.bind(Ask, lambda query: 42)
    dp.events.bind(Happened, lambda event: None)
    dp.start()
    run, ask, publish = dp.execute, dp.query, dp.publish
    send, send_to_commands = dp.send, dp.commands.send
    assert await run(Job(0)) == "done"
    await dp.stop()
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "dp.execute": lambda: dp.execute(Job(1)),
        "saved execute": lambda: run(Job(1)),
        "saved execute with a timeout": lambda: run(Job(1), timeout=1),
        "saved query": lambda: ask(Ask(1)),
        "saved publish": lambda: publish(Happened(1)),
        "saved send": lambda: send(Job(1)),
        "saved commands.send": lambda: send_to_commands(Job(1)),
    }
    for name, call in calls.items():
        try:
            await call()
        except DispatcherClosed:
            continue
        pytest.fail(f"{name} was accepted after stop()")
    with pytest.raises(DispatcherClosed):
        dp.commands.send_nowait(Job(1))


async def test_no_singleton_is_made_after_teardown() -> None:
    """An inline handling that outlives stop() gets DispatcherClosed, not a new instance."""
    log: list[str] = []
    resource = resource_provider(log)
    ready, go = asyncio.Event(), asyncio.Event()
    dp = Dispatcher()

    @dp.commands.register(Job)
    async def slow(cmd: Job) -> None:
        ready.set()
        await go.wait()
        await dp.query(Ask(cmd.n))  # resolves the Singleton after the teardown

    @dp.queries.register(Ask, resource=resource)
    async def use(query: Ask, resource: Resource) -> None:
        pass

    dp.start()
    await dp.query(Ask(0))  # made
    running = asyncio.create_task(dp.execute(Job(1)))
    await ready.wait()
    await dp.stop()  # does not wait for an inline handling: it tears the Singleton down
    go.set()
    with pytest.raises(DispatcherClosed):
        await running
    assert log == ["made", "torn down"]


async def test_a_singleton_whose_making_ends_after_the_teardown_is_torn_down_at_once() -> None:
    log: list[str] = []
    making = asyncio.Event()
    finish = asyncio.Event()

    async def make() -> AsyncIterator[str]:
        making.set()
        await finish.wait()
        log.append("made")
        yield "value"
        log.append("torn down")

    dp = Dispatcher()

    @dp.queries.register(Ask, value=Singleton(make))
    async def use(query: Ask, value: str) -> str:
        return value

    dp.start()
    asking = asyncio.create_task(dp.query(Ask(0)))
    await making.wait()
    await dp.stop()
    finish.set()
    with pytest.raises(DispatcherClosed, match="torn down while it was being made"):
        await asking
    assert log == ["made", "torn down"]


# -- serve() ---------------------------------------------------------------------------


class Closing(InMemoryTransport):
    """Counts aclose() calls."""

    def __init__(self, broker: InMemoryBroker | None = None) -> None:
        super().__init__(broker)
        self.closed = 0

    async def aclose(self) -> None:
        self.closed += 1


def worker_app(log: list[str], release: asyncio.Event, broker: InMemoryBroker) -> Dispatcher:
    dp = Dispatcher(transport=Closing(broker))
    dp.route(Job)
    resource = resource_provider(log)

    @dp.commands.register(Job, resource=resource)
    async def job(cmd: Job, resource: Resource) -> None:
        log.append(f"start {cmd.n}")
        await release.wait()
        log.append(f"job {cmd.n}")

    return dp


async def produce(broker: InMemoryBroker, count: int) -> None:
    producer = Dispatcher(transport=InMemoryTransport(broker))
    producer.route(Job, kind="command")
    async with producer:
        for n in range(count):
            await producer.send(Job(n))


async def test_cancelling_serve_stops_everything_once() -> None:
    log: list[str] = []
    release = asyncio.Event()
    broker = InMemoryBroker()
    await produce(broker, 3)
    dp = worker_app(log, release, broker)
    serving = asyncio.create_task(dp.serve(stop_signals=(), drain_timeout=0, wait=0.01))
    await until(lambda: log.count("made") == 1 and len([x for x in log if x.startswith("start")]) == 3)
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert dp.state is State.STOPPED
    assert log.count("torn down") == 1
    assert dp.transport is not None
    assert dp.transport.closed == 1  # type: ignore[attr-defined]
    assert [task for task in asyncio.all_tasks() if task.get_name().startswith("pybus")] == []
    group = broker.group("default", next(iter(broker.streams)))
    assert sorted(number for number, _ in group.again) == [1, 2, 3]  # given back
    assert {deliveries for _, deliveries in group.again} == {0}  # not counted as deliveries


async def test_serve_returns_when_the_dispatcher_is_stopped_from_code() -> None:
    log: list[str] = []
    release = asyncio.Event()
    broker = InMemoryBroker()
    await produce(broker, 2)
    dp = worker_app(log, release, broker)
    serving = asyncio.create_task(dp.serve(stop_signals=(signal.SIGTERM,), drain_timeout=5, wait=0.01))
    await until(lambda: len([line for line in log if line.startswith("start")]) == 2)
    stopping = asyncio.create_task(dp.stop())
    await asyncio.sleep(0.01)
    release.set()  # the drain lets both finish
    assert await asyncio.wait_for(serving, 2) == 0
    assert await stopping == 0
    assert sorted(line for line in log if line.startswith("job")) == ["job 0", "job 1"]
    assert log.count("torn down") == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


async def test_serve_notices_when_its_consumer_dies() -> None:
    class Failing(InMemoryTransport):
        async def receive(self, names: Sequence[str], *, max_count: int, wait: float) -> list[Envelope]:
            raise KeyboardInterruptLike()

    class KeyboardInterruptLike(BaseException):
        pass

    dp = Dispatcher(transport=Failing())
    dp.route(Job)
    dp.commands.bind(Job, lambda cmd: None)
    with pytest.raises(TransportError, match="The consumer stopped on its own") as info:
        await asyncio.wait_for(dp.serve(stop_signals=()), 5)
    assert isinstance(info.value.__cause__, KeyboardInterruptLike)
    assert dp.state is State.STOPPED


async def test_a_read_cancelled_by_the_transport_itself_is_a_failed_read_not_the_end() -> None:
    """A transport whose read raises CancelledError of its own (redis-py can) is reported
    and read again: the consumer is not cancelled, only its read failed."""
    errors = Errors()

    class Flaky(InMemoryTransport):
        reads = 0

        async def receive(self, names: Sequence[str], *, max_count: int, wait: float) -> list[Envelope]:
            self.reads += 1
            if self.reads == 1:
                raise asyncio.CancelledError()
            return await super().receive(names, max_count=max_count, wait=wait)

    broker = InMemoryBroker()
    await produce(broker, 1)
    handled: list[int] = []
    dp = Dispatcher(transport=Flaky(broker), on_error=errors)
    dp.route(Job)
    dp.commands.bind(Job, lambda cmd: handled.append(cmd.n))
    async with dp:
        consumer = dp.consumer(wait=0.01)
        consumer.pause_after_error = 0.01
        reading = asyncio.create_task(consumer.run())
        await until(lambda: handled == [0])
    await reading
    assert [type(error) for error, _ in errors] == [TransportError]


# -- found by the adversarial review ---------------------------------------------------------


def run_until_the_loop_ends_in_a_teardown(fail_a: bool) -> tuple[list[str], list[BaseException]]:
    """Make Singletons a then b; stop; end the loop while b's teardown waits."""
    torn: list[str] = []
    reported: list[BaseException] = []

    async def main() -> None:
        b_waits = asyncio.Event()

        async def make_a() -> AsyncIterator[str]:
            yield "a"
            torn.append("a")
            if fail_a:
                raise RuntimeError("a's teardown failed")

        async def make_b() -> AsyncIterator[str]:
            yield "b"
            torn.append("b begins")
            b_waits.set()
            await asyncio.get_running_loop().create_future()  # until the loop ends
            torn.append("b")

        dp = Dispatcher(on_error=lambda error, message: reported.append(error))

        @dp.commands.register(Job, a=Singleton(make_a), b=Singleton(make_b))
        async def job(cmd: Job, a: str, b: str) -> None:
            pass

        dp.start()
        await dp.execute(Job(0))
        stopping = asyncio.create_task(dp.stop())
        await b_waits.wait()
        stopping.cancel()
        # returns: asyncio.run cancels what is left, the shutdown task included

    asyncio.run(main())
    return torn, reported


def test_singletons_are_torn_down_even_when_the_loop_ends_during_the_teardown() -> None:
    torn, reported = run_until_the_loop_ends_in_a_teardown(fail_a=False)
    assert torn == ["b begins", "a"]
    assert reported == []


def test_a_teardown_failure_while_the_loop_ends_still_reaches_the_error_hook() -> None:
    torn, reported = run_until_the_loop_ends_in_a_teardown(fail_a=True)
    assert torn == ["b begins", "a"]
    [error] = reported
    assert isinstance(error, RuntimeError)
    assert str(error) == "a's teardown failed"
    assert "pybus: tearing down the Singletons failed while the dispatcher stopped" in error.__notes__


class FailingTeardown:
    """A Singleton whose teardown fails once `release` is set (at once if it is None)."""

    def __init__(self, release: asyncio.Event | None) -> None:
        self.release = release
        self.tearing_down = asyncio.Event()
        self.reported: list[tuple[BaseException, object]] = []
        self.hooked = asyncio.Event()

    async def provide(self) -> AsyncIterator[str]:
        yield "value"
        self.tearing_down.set()
        if self.release is not None:
            await self.release.wait()
        raise RuntimeError("teardown failed")

    def on_error(self, error: BaseException, message: object) -> None:
        self.reported.append((error, message))
        self.hooked.set()

    async def stopped_with_nobody_waiting(self, release: asyncio.Event | None = None) -> Dispatcher:
        dp = Dispatcher(on_error=self.on_error)
        dp.commands.bind(Job, lambda cmd, value: None, value=Singleton(self.provide))
        dp.start()
        await dp.execute(Job(0))
        stopping = asyncio.create_task(dp.stop())
        await self.tearing_down.wait()
        stopping.cancel()  # nobody waits for the shutdown any more
        with pytest.raises(asyncio.CancelledError):
            await stopping
        if self.release is not None:
            self.release.set()
        async with asyncio.timeout(5):
            await self.hooked.wait()
        [(error, message)] = self.reported
        assert isinstance(error, RuntimeError)
        assert str(error) == "teardown failed"
        assert message is None
        assert "pybus: tearing down the Singletons failed while the dispatcher stopped" in error.__notes__
        return dp


async def test_a_teardown_failure_after_every_stop_gave_up_goes_to_the_error_hook() -> None:
    teardown = FailingTeardown(release=asyncio.Event())  # fails after the stop() call gave up
    dp = await teardown.stopped_with_nobody_waiting()
    assert await dp.stop() == 0  # a later stop() returns the count; the failure is not raised twice
    assert len(teardown.reported) == 1


async def test_a_teardown_failure_as_the_last_stop_gives_up_goes_to_the_error_hook() -> None:
    # The shutdown ends (failing) in the step that wakes the test, which cancels the
    # stop() call before it could take the result: it must hand the failure on.
    teardown = FailingTeardown(release=None)
    dp = await teardown.stopped_with_nobody_waiting()
    assert await dp.stop() == 0
    assert len(teardown.reported) == 1


async def test_a_transport_that_fails_to_close_reaches_the_error_hook_and_stop_still_ends() -> None:
    class FailingToClose(InMemoryTransport):
        async def aclose(self) -> None:
            raise ConnectionError("broker gone")

    reported: list[tuple[BaseException, object]] = []
    torn: list[str] = []

    def resource() -> Iterator[str]:
        yield "value"
        torn.append("resource")

    dp = Dispatcher(
        transport=FailingToClose(), on_error=lambda error, message: reported.append((error, message))
    )
    dp.commands.bind(Job, lambda cmd, value: None, value=Singleton(resource))
    dp.start()
    await dp.execute(Job(0))
    assert await dp.stop() == 0
    [(error, message)] = reported
    assert isinstance(error, ConnectionError)
    assert message is None
    assert "pybus: closing the transport failed while the dispatcher stopped" in error.__notes__
    assert torn == ["resource"]  # the Singletons are still torn down after it
    assert state_of(dp) is State.STOPPED


async def test_a_teardown_failure_is_raised_to_one_stop_and_the_count_to_the_others() -> None:
    def failing() -> Iterator[str]:
        yield "value"
        raise RuntimeError("teardown failed")

    dp = Dispatcher()
    dp.commands.bind(Job, lambda cmd, value: None, value=Singleton(failing))
    dp.start()
    await dp.execute(Job(0))
    with pytest.raises(RuntimeError, match="teardown failed"):
        await dp.stop()
    assert await dp.stop() == 0


async def test_an_interrupted_stop_before_start_still_closes_everything() -> None:
    class SlowToClose(Closing):
        async def aclose(self) -> None:
            await asyncio.sleep(0.1)
            await super().aclose()

    transport = SlowToClose()
    dp = Dispatcher(transport=transport)
    dp.commands.bind(Job, lambda cmd: None)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(dp.stop(), 0.01)
    with pytest.raises(DispatcherClosed):
        await dp.execute(Job(0))  # closed at once, not only once the transport closed
    with pytest.raises(DispatcherClosed):
        dp.queries.bind(Ask, lambda query: None)
    assert await dp.stop() == 0  # waits for the same close
    assert transport.closed == 1


async def test_serve_refuses_a_bad_drain_timeout_before_it_starts_anything() -> None:
    dp = Dispatcher(transport=InMemoryTransport())
    dp.route(Job)
    dp.commands.bind(Job, lambda cmd: None)
    with pytest.raises(ImproperlyConfigured, match=r"drain_timeout must be None \(no limit\) or a number"):
        await dp.serve(stop_signals=(), drain_timeout=-1)
    assert state_of(dp) is State.NEW
    assert [task for task in asyncio.all_tasks() if task.get_name().startswith("pybus")] == []


async def test_serve_puts_back_the_signal_handler_it_replaced() -> None:
    def mine(signum: int, frame: object) -> None:
        pass

    previous = signal.signal(signal.SIGUSR1, mine)
    try:
        dp = Dispatcher()
        serving = asyncio.create_task(dp.serve(stop_signals=(signal.SIGUSR1,)))
        await asyncio.sleep(0.01)
        signal.raise_signal(signal.SIGUSR1)  # caught by serve()
        assert await asyncio.wait_for(serving, 2) == 0
        assert signal.getsignal(signal.SIGUSR1) is mine
    finally:
        signal.signal(signal.SIGUSR1, previous)


async def test_serve_refuses_to_replace_a_handler_the_loop_holds() -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR2, lambda: None)
    try:
        dp = Dispatcher()
        with pytest.raises(ImproperlyConfigured, match=r"pass serve\(stop_signals=\(\)\) and call dp.stop"):
            await dp.serve(stop_signals=(signal.SIGUSR2,))
        assert state_of(dp) is State.NEW
    finally:
        loop.remove_signal_handler(signal.SIGUSR2)


async def test_a_stopped_before_start_dispatcher_says_so_to_consumer_override_and_track() -> None:
    from pybus.testing import track

    dp = Dispatcher(transport=InMemoryTransport())
    dp.route(Job)
    dp.commands.bind(Job, lambda cmd: None)
    await dp.stop()
    with pytest.raises(
        DispatcherClosed, match="Cannot consume from the transport: the dispatcher was stopped"
    ):
        dp.consumer()
    with pytest.raises(DispatcherClosed, match="the dispatcher was stopped before it started"):
        with dp.override_handler(Job, lambda cmd: None):
            pass
    with pytest.raises(DispatcherClosed, match="the dispatcher was stopped before it started"):
        async with track(dp):
            pass


def test_a_singleton_made_in_one_loop_binds_the_dispatcher_to_it() -> None:
    from pybus import ForeignEventLoop

    def make() -> str:
        return "connection"

    dp = Dispatcher()
    dp.commands.bind(Job, lambda cmd, conn: None, conn=Singleton(make))
    dp.start()
    asyncio.run(dp.execute(Job(0)))  # the Singleton is made in this loop

    async def elsewhere() -> None:
        await dp.commands.send(Job(1))

    with pytest.raises(ForeignEventLoop):
        asyncio.run(elsewhere())


async def test_cancelling_a_consumer_twice_still_gives_back_what_it_held() -> None:
    log: list[str] = []
    release = asyncio.Event()
    broker = InMemoryBroker()
    await produce(broker, 4)
    dp = worker_app(log, release, broker)
    dp.start()
    consumer = dp.consumer(concurrency=4, wait=0.01)
    running = asyncio.create_task(consumer.run())
    await until(lambda: len([line for line in log if line.startswith("start")]) == 4)
    running.cancel()
    await asyncio.sleep(0)
    running.cancel()  # again, while it ends (a TaskGroup, then Ctrl-C)
    with pytest.raises(asyncio.CancelledError):
        await running
    assert await asyncio.wait_for(dp.stop(), 2) == 4
    assert consumer.released == 4
    group = broker.group("default", next(iter(broker.streams)))
    assert sorted(number for number, _ in group.again) == [1, 2, 3, 4]


async def test_a_second_signal_ends_the_drain_at_once_and_gives_back_what_runs() -> None:
    log: list[str] = []
    release = asyncio.Event()  # never set: the handling would drain for ever
    broker = InMemoryBroker()
    await produce(broker, 1)
    dp = worker_app(log, release, broker)
    serving = asyncio.create_task(dp.serve(stop_signals=(signal.SIGUSR1,), wait=0.01))
    await until(lambda: "start 0" in log)
    signal.raise_signal(signal.SIGUSR1)  # stop: drain without a limit
    await asyncio.sleep(0.05)
    assert not serving.done()
    signal.raise_signal(signal.SIGUSR1)  # again: no more drain
    assert await asyncio.wait_for(serving, 2) == 1
    group = broker.group("default", next(iter(broker.streams)))
    assert [(number, deliveries) for number, deliveries in group.again] == [(1, 0)]  # given back
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


async def test_a_shutdown_cancelled_mid_drain_still_gives_back_what_the_consumer_holds() -> None:
    """The loop ending cancels the shutdown task while a consumer's handling runs with no
    deadline: the shutdown stops the consumer at once, so its envelope is given back (not
    counted as an attempt) before the transport closes, and stop() still gets the count."""
    broker = InMemoryBroker()
    started = asyncio.Event()
    transport = Closing(broker)
    dp = Dispatcher(transport=transport)
    dp.route(Job)

    @dp.commands.register(Job)
    async def hangs(cmd: Job) -> None:
        started.set()
        await asyncio.get_running_loop().create_future()

    await produce(broker, 1)
    dp.start()
    consumer = dp.consumer(wait=0.01)
    reading = asyncio.create_task(consumer.run())
    await started.wait()
    stopping = asyncio.create_task(dp.stop())  # no timeout: it would wait for the handler
    await asyncio.sleep(0)
    [shutdown] = [task for task in asyncio.all_tasks() if task.get_name() == "pybus-shutdown"]
    shutdown.cancel()  # as asyncio.run does when the loop ends
    assert await stopping == 1  # the shutdown went on to its end, and returns its count
    async with asyncio.timeout(5):
        await asyncio.wait([reading])
    assert (consumer.released, consumer.unreleased) == (1, 0)
    assert transport.closed == 1
    group = broker.group("default", default_name(Job))
    assert group.pending == {}
    assert list(group.again) == [(1, 0)]  # given back: its next delivery is attempt 1 again


async def test_cancelling_every_task_as_stop_begins_still_tears_the_singletons_down() -> None:
    """A shutdown handler that calls stop() and then cancels every other task (as
    asyncio.run does at its end) reaches the shutdown task before its first step: the
    cancellation must not skip the shutdown."""
    torn: list[str] = []

    def resource() -> Iterator[str]:
        yield "value"
        torn.append("resource")

    dp = Dispatcher()
    dp.commands.bind(Job, lambda cmd, value: None, value=Singleton(resource))
    dp.start()
    await dp.execute(Job(0))
    stopping = asyncio.create_task(dp.stop())
    await asyncio.sleep(0)  # stop() ran its first step: the shutdown task exists, not begun
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    assert "pybus-shutdown" in [task.get_name() for task in others]
    for task in others:
        task.cancel()
    await asyncio.wait(others)
    assert stopping.cancelled()
    assert torn == ["resource"]
    assert state_of(dp) is State.STOPPED


async def cancelled_inner_task() -> None:
    """Await a task that gets cancelled: raises CancelledError in a task nobody cancelled."""
    inner = asyncio.ensure_future(asyncio.sleep(10))
    await asyncio.sleep(0)
    inner.cancel()
    await inner


async def test_a_transport_aclose_raising_cancelled_error_is_a_failure_not_a_cancelled_stop() -> None:
    class CancelledInside(InMemoryTransport):
        async def aclose(self) -> None:
            await cancelled_inner_task()

    torn: list[str] = []
    reported: list[tuple[BaseException, object]] = []

    def resource() -> Iterator[str]:
        yield "value"
        torn.append("resource")

    hook = lambda error, message: reported.append((error, message))  # noqa: E731
    dp = Dispatcher(transport=CancelledInside(), on_error=hook)
    dp.commands.bind(Job, lambda cmd, value: None, value=Singleton(resource))
    dp.start()
    await dp.execute(Job(0))
    assert await dp.stop() == 0
    assert await dp.stop() == 0  # and again
    [(error, message)] = reported
    assert isinstance(error, asyncio.CancelledError)
    assert message is None
    assert "pybus: closing the transport failed while the dispatcher stopped" in error.__notes__
    assert torn == ["resource"]


async def test_a_singleton_teardown_raising_cancelled_error_is_raised_once_as_a_failure() -> None:
    torn: list[str] = []

    async def first() -> AsyncIterator[str]:
        yield "first"
        torn.append("first")

    async def second() -> AsyncIterator[str]:
        yield "second"
        torn.append("second")
        await cancelled_inner_task()

    dp = Dispatcher()
    dp.commands.bind(Job, lambda cmd, a, b: None, a=Singleton(first), b=Singleton(second))
    dp.start()
    await dp.execute(Job(0))
    with pytest.raises(RuntimeError, match=r"raised CancelledError though nothing cancelled") as info:
        await dp.stop()
    assert isinstance(info.value.__cause__, asyncio.CancelledError)
    assert torn == ["second", "first"]  # the other teardown still ran
    assert await dp.stop() == 0  # raised once; later calls return the count


def test_a_teardown_failure_reaches_the_hook_when_the_loop_ends_during_the_drain() -> None:
    """The loop ends while stop() waits, without a deadline, for a handler that hangs: the
    shutdown is cancelled mid-drain, goes on, and its teardown failure reaches the hook."""
    torn: list[str] = []
    reported: list[tuple[BaseException, object]] = []

    def failing() -> Iterator[str]:
        yield "value"
        torn.append("torn")
        raise RuntimeError("teardown failed")

    async def main() -> None:
        dp = Dispatcher(workers=1, on_error=lambda error, message: reported.append((error, message)))
        started = asyncio.Event()

        @dp.commands.register(Job, value=Singleton(failing))
        async def hangs(cmd: Job, value: str) -> None:
            started.set()
            await asyncio.get_running_loop().create_future()

        dp.start()
        await dp.commands.send(Job(0))
        await started.wait()
        asyncio.create_task(dp.stop())  # noqa: RUF006 - the loop ends while it drains
        for _ in range(3):
            await asyncio.sleep(0)  # the shutdown task waits in its drain

    asyncio.run(main())
    assert torn == ["torn"]
    [(error, message)] = reported
    assert isinstance(error, RuntimeError)
    assert str(error) == "teardown failed"
    assert message is None


async def test_a_shutdown_cancelled_while_a_service_ends_still_waits_for_it_before_closing() -> None:
    """The loop ending cancels the shutdown task while it waits for a service (an outbox
    relay's last pass) to end: the shutdown goes on waiting for the same service, and closes
    the transport only after it ended."""
    broker = InMemoryBroker()

    class Service:
        def __init__(self) -> None:
            self.told = asyncio.Event()
            self.finishing = asyncio.Event()
            self.done = False

        async def run(self) -> None:
            await self.told.wait()
            self.finishing.set()
            for _ in range(20):  # a last pass that takes a few turns of the loop
                await asyncio.sleep(0)
            self.done = True

        async def stop(self) -> None:
            self.told.set()

    service = Service()

    class Checking(Closing):
        done_when_closed: list[bool] = []  # noqa: RUF012 - one per test

        async def aclose(self) -> None:
            Checking.done_when_closed.append(service.done)
            await super().aclose()

    dp = Dispatcher(transport=Checking(broker))
    dp.route(Job)
    dp.add_service(service)
    serving = asyncio.create_task(dp.serve(stop_signals=()))
    await until(lambda: dp.started)
    stopping = asyncio.create_task(dp.stop())
    await service.finishing.wait()
    [shutdown] = [task for task in asyncio.all_tasks() if task.get_name() == "pybus-shutdown"]
    shutdown.cancel()  # as asyncio.run does when the loop ends
    async with asyncio.timeout(5):
        await stopping
        await serving
    assert service.done
    assert Checking.done_when_closed == [True]
