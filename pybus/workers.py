"""Background handling: bounded queues, worker tasks, ordering keys, join and stop.

Each engine has a `WorkerPool`: `send` puts a message on its queue and returns;
worker tasks take messages off and run them with exactly the semantics of
`execute`/`query`/`publish` (follow-up events included). The pools of one
dispatcher share a `Supervisor`: the error hook, the count of unfinished
messages that `join()` waits on, the closing flag and the worker tasks.

Each message runs in a copy of the `contextvars` context taken at `send`. The
worker steps the handling's coroutine inside that context itself (instead of
wrapping every message in a task of its own, which costs ten times more), so
nothing a handler sets in a context variable leaks into the next message.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import Any

from pybus.errors import DispatcherClosed, Kind, QueueFull, key_name, message_key
from pybus.observer import Observer

logger = logging.getLogger("pybus")

ErrorHook = Callable[[BaseException, object], object]
_Item = tuple[object, contextvars.Context, object]


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    """A snapshot of one engine's background work.

    `queued`: sent and not yet started (ordering-key backlogs included);
    `in_flight`: being handled; `handled` and `failed`: finished since start;
    `active_keys`: ordering keys with a message queued or in flight.
    """

    queued: int
    in_flight: int
    handled: int
    failed: int
    active_keys: int = 0


@dataclass(frozen=True, slots=True)
class Statistics:
    """`dp.statistics()`: one `EngineStatistics` per engine."""

    events: EngineStatistics
    commands: EngineStatistics
    queries: EngineStatistics


def log_error(error: BaseException, message: object) -> None:
    """The default error hook: one ERROR record on the `pybus` logger, with the traceback.

    The handlers involved are named in the exception's notes (see `Supervisor.report`).
    """
    logger.error(
        "pybus: handling %r failed: %s: %s",
        message,
        type(error).__name__,
        error,
        exc_info=(type(error), error, error.__traceback__),
        extra={"pybus_message": message},
    )


class Supervisor:
    """What the worker pools of one dispatcher share."""

    def __init__(self, on_error: ErrorHook | None) -> None:
        self.on_error: ErrorHook = on_error or log_error
        self.unfinished = 0
        self.closing = False
        self.tasks: set[asyncio.Task[None]] = set()
        self._idle: asyncio.Event | None = None

    def inside_worker(self) -> bool:
        """True when called from one of this dispatcher's worker tasks."""
        try:
            return asyncio.current_task() in self.tasks
        except RuntimeError:  # no running loop
            return False

    def finished(self) -> None:
        self.unfinished -= 1
        if self.unfinished == 0 and self._idle is not None:
            self._idle.set()

    def forget_unfinished(self) -> None:
        """After the pools were cancelled: nothing is left to wait for."""
        self.unfinished = 0
        if self._idle is not None:
            self._idle.set()

    async def join(self) -> None:
        """Return once every sent message, and everything it sent in turn, is done."""
        while self.unfinished:
            if self._idle is None or self._idle.is_set():
                self._idle = asyncio.Event()
            await self._idle.wait()

    def report(self, error: BaseException, message: object, kind: Kind, handlers: str) -> None:
        """Hand a failure of a queued message to the error hook, noting what was handled."""
        error.add_note(
            f"while handling {kind} {key_name(message_key(message))} in the background ({handlers})"
        )
        self.hand_over(error, message)

    def hand_over(self, error: BaseException, message: object) -> None:
        """Call the error hook; a failing hook is logged, never raised."""
        try:
            self.on_error(error, message)
        except Exception:
            logger.exception("pybus: the on_error hook failed while reporting %r", error)


class WorkerPool:
    """The queue and worker tasks of one engine.

    Messages sent with the same `key` are handled one at a time, in send order;
    a key's backlog is dropped as soon as the key goes idle. The capacity counts
    every message not yet started. A handler that sends from inside a worker is
    never made to wait (that could deadlock the pool on itself): its messages
    are accepted past the capacity.
    """

    def __init__(
        self,
        kind: Kind,
        handle: Callable[[Any], Coroutine[Any, Any, Any]],
        supervisor: Supervisor,
        *,
        workers: int,
        capacity: int,
        describe: Callable[[object], str],
    ) -> None:
        self.kind: Kind = kind
        self._handle = handle
        self._supervisor = supervisor
        self._workers = workers
        self.capacity = capacity
        self._describe = describe
        self._ready: deque[_Item] = deque()
        self._backlogs: dict[object, deque[_Item]] = {}
        self._queued = 0
        self._waiting_workers: deque[asyncio.Future[None]] = deque()
        self._waiting_senders: deque[asyncio.Future[None]] = deque()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.observer: Observer | None = None
        self.in_flight = 0
        self.handled = 0
        self.failed = 0

    def statistics(self) -> EngineStatistics:
        return EngineStatistics(self._queued, self.in_flight, self.handled, self.failed, len(self._backlogs))

    # -- sending -----------------------------------------------------------------

    async def send(self, message: object, key: object = None) -> None:
        """Queue `message`, waiting for room while the queue is full."""
        supervisor = self._supervisor
        if supervisor.closing or self._queued >= self.capacity:
            inside = supervisor.inside_worker()
            if supervisor.closing and not inside:
                raise DispatcherClosed(self.kind, message)
            while self._queued >= self.capacity and not inside:
                waiter = asyncio.get_running_loop().create_future()
                self._waiting_senders.append(waiter)
                try:
                    await waiter
                except asyncio.CancelledError:
                    # This sender may have been woken for a free slot: pass the turn on
                    # (a spurious wake-up is harmless, the loop checks again).
                    self._wake(self._waiting_senders)
                    raise
                if supervisor.closing:
                    raise DispatcherClosed(self.kind, message)
        self._put(message, key)

    def put_if_room(self, message: object, key: object = None) -> bool:
        """Queue `message` if that needs no waiting and no checks; False otherwise.

        The fast path of `send`, callable without a coroutine of its own.
        """
        if self._supervisor.closing or self._queued >= self.capacity:
            return False
        self._put(message, key)
        return True

    def send_nowait(self, message: object, key: object = None) -> None:
        """Queue `message` or raise `QueueFull` at once."""
        supervisor = self._supervisor
        if supervisor.closing or self._queued >= self.capacity:
            inside = supervisor.inside_worker()
            if supervisor.closing and not inside:
                raise DispatcherClosed(self.kind, message)
            if not inside:
                raise QueueFull(self.kind, self.capacity)
        self._put(message, key)

    def _put(self, message: object, key: object) -> None:
        if not self._tasks:
            self._start_workers()
        item = (message, contextvars.copy_context(), key)
        self._queued += 1
        self._supervisor.unfinished += 1
        if self.observer is not None:
            self.observer.queued(self.kind, message)
        if key is None:
            self._ready.append(item)
        else:
            backlog = self._backlogs.get(key)
            if backlog is None:
                self._backlogs[key] = deque()
                self._ready.append(item)
            else:
                backlog.append(item)
                return  # runs when the message before it with this key is done
        self._wake(self._waiting_workers)

    @staticmethod
    def _wake(waiters: deque[asyncio.Future[None]]) -> None:
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _start_workers(self) -> None:
        loop = asyncio.get_running_loop()
        for number in range(self._workers):
            task = loop.create_task(self._work(), name=f"pybus-{self.kind}-worker-{number}")
            self._tasks.append(task)
            self._supervisor.tasks.add(task)

    # -- working -----------------------------------------------------------------

    async def _work(self) -> None:
        ready = self._ready
        supervisor = self._supervisor
        handle = self._handle
        while not self._stopping:
            while not ready:
                waiter = asyncio.get_running_loop().create_future()
                self._waiting_workers.append(waiter)
                await waiter
            message, context, key = ready.popleft()
            self._queued -= 1
            if self._waiting_senders:
                self._wake(self._waiting_senders)
            self.in_flight += 1
            try:
                rest = start_in(context, handle(message))
                if rest is not None:  # None: done without ever waiting, the common case
                    await rest
            except (Exception, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise  # the worker itself is being stopped
                # A handler that failed, or was cancelled: a failure, not the end of the worker.
                self.failed += 1
                supervisor.report(exc, message, self.kind, self._describe(message))
            else:
                self.handled += 1
            finally:
                self.in_flight -= 1
                if key is not None:
                    self._release(key)
                if self.observer is not None:
                    context.run(self.observer.dequeued, self.kind, message)
                supervisor.finished()

    def _release(self, key: object) -> None:
        backlog = self._backlogs[key]
        if backlog:
            self._ready.append(backlog.popleft())
            self._wake(self._waiting_workers)
        else:
            del self._backlogs[key]

    async def cancel(self) -> None:
        """Cancel the workers, wait for them, and forget what was still queued.

        A handler that swallows its cancellation still ends its worker: the
        worker checks `_stopping` before taking another message.
        """
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # wait(), not `await task`: a cancellation of the caller itself still propagates.
            await asyncio.wait(self._tasks)
        self._supervisor.tasks.difference_update(self._tasks)
        self._tasks.clear()
        self._ready.clear()
        self._backlogs.clear()
        self._queued = 0
        for waiter in self._waiting_senders:
            if not waiter.done():
                waiter.set_result(None)  # let blocked senders see the dispatcher is closed


def start_in(context: contextvars.Context, coroutine: Coroutine[Any, Any, Any]) -> InContext | None:
    """Run the first step of `coroutine` inside `context`.

    Returns None when that step finished it (no task, no second frame needed),
    else an awaitable that runs the rest of it inside the same context.
    """
    try:
        step = context.run(coroutine.send, None)
    except StopIteration:
        return None
    return InContext(coroutine, context, step)


class InContext:
    """Drives a coroutine to the end, running each of its steps in `context`.

    The worker task awaits this object; whatever the coroutine waits on is
    passed up to the task and its result (or cancellation) passed back down,
    exactly as `await coroutine` would, but inside the message's context.
    """

    __slots__ = ("context", "coroutine", "step")

    def __init__(
        self, coroutine: Coroutine[Any, Any, Any], context: contextvars.Context, step: object
    ) -> None:
        self.coroutine = coroutine
        self.context = context
        self.step = step

    def __await__(self) -> Generator[Any, Any, None]:
        coroutine, run, step = self.coroutine, self.context.run, self.step
        while True:
            try:
                value = yield step
            except GeneratorExit:  # pragma: no cover - only when a pending worker is garbage-collected
                coroutine.close()
                raise
            except BaseException as exc:
                try:
                    step = run(coroutine.throw, exc)
                except StopIteration:
                    return
                continue
            try:
                step = run(coroutine.send, value)
            except StopIteration:
                return
