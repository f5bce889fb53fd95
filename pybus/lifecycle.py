"""A dispatcher's lifecycle: its four states and its one shutdown.

::

    new ──start()──▶ started ──stop()──▶ stopping ──(drain, cancel, tear down)──▶ stopped
     └──────────────────────────stop()───────────────────────────────────────────────▲

Every transition happens here. `stop()` runs the shutdown in a task of its own
and waits for it, shielded: calls made while it runs wait for the same shutdown
(a shorter timeout brings its deadline closer), and a call that is cancelled
(`asyncio.wait_for(dp.stop(), 10)` timing out) leaves it running, so a later
`stop()` still returns its result. The shutdown:

1. refuses sends from outside a background handling (`DispatcherClosed`);
2. stops every consumer: no more reads; handlings in flight may finish;
3. drains the background queues (what handlings send meanwhile is accepted);
4. past the deadline, refuses every send, cancels the consumers' and workers'
   handlings still running and drops what is still queued, counting them;
5. closes the engines (every call raises `DispatcherClosed`, also through a
   reference such as `run = dp.execute`), the transport, then tears down the
   Singletons, last created first, each exactly once.

Steps 4 and 5 run even when the shutdown task itself is cancelled (the loop
ending): a cancellation interrupts only the wait it lands in, and the shutdown
task still returns its result, so nothing is left running or open, a later
`stop()` returns the count, and a teardown failure still reaches someone.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from pybus.cleanup import CleanupTask
from pybus.errors import DispatcherClosed
from pybus.workers import Supervisor

if TYPE_CHECKING:
    from pybus.consumer import Consumer
    from pybus.engines import EventEngine, RequestEngine
    from pybus.providers import Resolver
    from pybus.transport import Transport

logger = logging.getLogger("pybus")


class State(enum.Enum):
    """Where a dispatcher is in its life (`dp.state`)."""

    NEW = "new"
    STARTED = "started"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Lifecycle:
    """The state of one dispatcher and the shutdown that ends it."""

    def __init__(self, supervisor: Supervisor, resolver: Resolver, transport: Transport | None) -> None:
        self.state = State.NEW
        self.consumers: list[Consumer] = []
        #: Awaited once the consumers and workers are done, before the transport closes.
        self.before_close: Callable[[], Awaitable[None]] | None = None
        self._supervisor = supervisor
        self._resolver = resolver
        self._transport = transport
        self._engines: Sequence[EventEngine | RequestEngine] = ()
        self._task: asyncio.Task[tuple[int, BaseException | None]] | None = None
        self._waiting = 0  # stop() calls waiting for the shutdown
        self._failure_raised = False
        self._reporting: asyncio.Task[None] | None = None  # the error hook, given an unclaimed failure
        self._timeout: float | None = None
        self._deadline: float | None = None
        self._drain: asyncio.Timeout | None = None
        self._watchers: list[asyncio.Future[None]] = []
        self._interrupted = False  # the shutdown task was cancelled (the loop ending) and went on

    def check_startable(self) -> bool:
        """True when `start()` has work to do; raises `DispatcherClosed` once stopping or stopped."""
        if self.state is State.NEW:
            return True
        if self.state is State.STARTED:
            return False
        raise DispatcherClosed(
            None,
            text="Cannot start this dispatcher: it was stopped, and a stopped dispatcher stays closed; "
            "build a new Dispatcher",
        )

    def started(self, engines: Sequence[EventEngine | RequestEngine]) -> None:
        """new -> started."""
        self._engines = engines
        self.state = State.STARTED

    def watch(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A future resolved when the shutdown begins (for `serve()`); `unwatch` it after."""
        watcher = loop.create_future()
        if self.state is not State.STARTED:
            watcher.set_result(None)
        self._watchers.append(watcher)
        return watcher

    def unwatch(self, watcher: asyncio.Future[None]) -> None:
        self._watchers.remove(watcher)

    async def stop(self, seconds: float | None) -> int:
        """Begin the shutdown, or join the one under way; return its count of unhandled messages.

        `seconds` was checked by `drain_seconds`. A Singleton teardown failure is raised
        to one caller (and goes to the error hook if none is waiting).
        """
        if self.state is State.NEW:
            self.state = State.STOPPED  # stopped before it started: closed for good
            loop = self._supervisor.bind("stop the dispatcher")
            self._task = CleanupTask(self._close_unstarted(), loop=loop, name="pybus-shutdown")
        elif self._task is None:
            loop = self._supervisor.bind("stop the dispatcher")
            self.state = State.STOPPING
            self._timeout = seconds
            self._deadline = None if seconds is None else loop.time() + seconds
            self._supervisor.close_to_outside()
            for watcher in self._watchers:
                if not watcher.done():
                    watcher.set_result(None)
            self._task = CleanupTask(self._shut_down(), loop=loop, name="pybus-shutdown")
        elif seconds is not None:
            self._shorten(self._supervisor.bind("stop the dispatcher").time() + seconds, seconds)
        task = self._task
        self._waiting += 1
        try:
            unhandled, failure = await asyncio.shield(task)
        except asyncio.CancelledError:
            # The shutdown may have ended as this, its last waiter, gave up: nobody else
            # raises its failure. The hook runs in a task (kept: the loop holds tasks weakly).
            if self._waiting == 1 and task.done() and not task.cancelled() and task.exception() is None:
                failure = task.result()[1]
                if failure is not None and self._claim(failure):
                    self._reporting = task.get_loop().create_task(self._report(failure), name="pybus-report")
            raise
        finally:
            self._waiting -= 1
        if failure is not None and not self._failure_raised:
            self._failure_raised = True
            raise failure
        return unhandled

    def hurry(self) -> None:
        """End the drain now (a second stop signal): what still runs is cancelled and given back."""
        if self.state is State.STOPPING:
            self._shorten(asyncio.get_running_loop().time(), 0.0)

    def _shorten(self, deadline: float, seconds: float) -> None:
        if self._deadline is not None and deadline >= self._deadline:
            return
        self._deadline = deadline
        self._timeout = seconds
        if self._drain is not None:
            self._drain.reschedule(deadline)
        for consumer in self.consumers:
            consumer.begin_stop(deadline)

    async def _close_unstarted(self) -> tuple[int, BaseException | None]:
        await self._close_transport()
        return 0, None

    async def _shut_down(self) -> tuple[int, BaseException | None]:
        try:
            for consumer in self.consumers:
                consumer.begin_stop(self._deadline)
            for consumer in self.consumers:
                await consumer.stopped()
            async with asyncio.timeout_at(self._deadline) as drain:
                self._drain = drain
                await self._supervisor.join()
        except TimeoutError:
            pass  # past the deadline: what still runs is cancelled below
        except asyncio.CancelledError:
            if not self._absorb():  # pragma: no cover - only a cancellation of this task lands here
                raise
        finally:
            self._drain = None
        unhandled, failure = await self._finish()
        if failure is not None and not self._waiting and self._claim(failure):
            await self._report(failure)  # nobody to raise it to: the error hook gets it
        return unhandled, failure

    def _claim(self, failure: BaseException) -> bool:
        """True, once, for a teardown failure that no stop() call raised: it goes to the error hook."""
        if self._failure_raised:
            return False
        self._failure_raised = True
        failure.add_note("pybus: tearing down the Singletons failed while the dispatcher stopped")
        return True

    async def _finish(self) -> tuple[int, BaseException | None]:
        """Steps 4 and 5. A cancellation of this task (the loop ending) interrupts only the
        wait it lands in: every step still runs, and the task returns its result."""
        supervisor = self._supervisor
        supervisor.closed = True  # from here on every send is refused
        now = asyncio.get_running_loop().time()
        for consumer in self.consumers:
            consumer.begin_stop(now)
        for consumer in self.consumers:
            await self._to_the_end(consumer.stopped)
        for engine in self._engines:  # every pool stops taking work before any is awaited
            engine.workers.begin_cancel()
        for engine in self._engines:
            await self._to_the_end(engine.workers.cancelled)
        for engine in self._engines:
            engine.close()
        if self.before_close is not None:  # services (an outbox relay) end while the transport is open
            await self._to_the_end(self.before_close)
        await self._close_transport()
        unhandled = sum(engine.workers.unhandled for engine in self._engines) + sum(
            consumer.released + consumer.unreleased for consumer in self.consumers
        )
        if unhandled:
            logger.warning("pybus: stopped with %d message(s) not handled %s", unhandled, self._why())
        failure: BaseException | None = None
        try:
            await self._resolver.aclose()  # each teardown runs, even if one is cancelled
        except Exception as exc:
            failure = exc
        except asyncio.CancelledError:
            if not self._absorb():  # pragma: no cover - the scope turns a teardown's own into a failure
                raise
        finally:
            self.state = State.STOPPED
        return unhandled, failure

    async def _to_the_end(self, wait: Callable[[], Awaitable[object]]) -> None:
        """`await wait()` until it returns, however often this task is cancelled meanwhile."""
        while True:
            try:
                await wait()
                return
            except asyncio.CancelledError:
                if not self._absorb():
                    raise

    def _absorb(self) -> bool:
        """True when the running (shutdown) task was cancelled, the loop ending: the request is
        forgotten, and the shutdown goes on. False for a `CancelledError` raised by the code
        it awaited (a transport's, a teardown's), which is a failure of that code."""
        task = asyncio.current_task()
        if task is None or not task.cancelling():
            return False
        task.uncancel()
        self._interrupted = True
        return True

    def _why(self) -> str:
        """How the drain ended, for the warning."""
        loop = asyncio.get_running_loop()
        if self._deadline is not None and loop.time() >= self._deadline:
            return f"after a drain timeout of {self._timeout} s"
        if self._interrupted:
            return "(the shutdown was cancelled before its drain ended: the loop is ending)"
        return "(cancelled from outside before the shutdown, or given back by a consumer)"

    async def _close_transport(self) -> None:
        transport, self._transport = self._transport, None
        if transport is None:
            return
        try:
            await transport.aclose()
        except asyncio.CancelledError as exc:
            if not self._absorb():  # raised by aclose() itself: a failure (if absorbed: not closed again)
                await self._closing_failed(exc)
        except Exception as exc:
            await self._closing_failed(exc)

    async def _closing_failed(self, exc: BaseException) -> None:
        exc.add_note("pybus: closing the transport failed while the dispatcher stopped")
        await self._report(exc)

    async def _report(self, failure: BaseException) -> None:
        await self._supervisor.report(failure, None, contextvars.copy_context())
