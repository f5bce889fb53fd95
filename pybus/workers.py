"""Background handling: bounded queues, worker lanes, ordering keys, join and stop.

Each engine has a `WorkerPool`: `send` puts a message on its queue and returns;
worker lanes (see `pybus.lanes`) take messages off and run them with exactly
the semantics of `execute`/`query`/`publish` (follow-up events included). The
pools of one dispatcher share a `Supervisor`: the error hook, `join()` (which
waits until no pool has a message queued or in flight), the phase of the
shutdown, and the event loop the dispatcher serves.

Each message runs in a copy of the `contextvars` context taken at `send`, from
its first step to its last in the one lane that took it.

Every message a pool accepts ends in exactly one of its counters: `handled`,
`failed` (the error hook was called, and returned or was cut short by a
cancellation of its worker) or `unhandled` (still queued, or cancelled
mid-handling, when the pool was stopped).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from contextvars import copy_context
from dataclasses import FrozenInstanceError
from threading import get_ident
from typing import TYPE_CHECKING, Any, NoReturn

from pybus.context import _current, failure_record
from pybus.errors import (
    ROUTERS,
    DispatcherClosed,
    ForeignEventLoop,
    ImproperlyConfigured,
    InvalidMessage,
    Kind,
    QueueFull,
    WouldDeadlock,
    each_failure,
    key_name,
    message_key,
)
from pybus.lanes import DONE, Failed, LaneTask, current_lane, handlings, rest_of, running_in, start_in

if TYPE_CHECKING:
    from pybus.observer import Observer

logger = logging.getLogger("pybus")

#: `on_error(error, message)`; may return an awaitable, which is awaited.
ErrorHook = Callable[[BaseException, object], object]


class _Snapshot:
    """What the statistics classes share: frozen (assigning raises
    `dataclasses.FrozenInstanceError`), equal when their fields are, hashable, and
    printed as `Class(field=value, ...)`, the behaviour of the frozen dataclasses they
    were. Plain classes because `@dataclass` compiles each method it makes at import,
    a cost every `import pybus` paid (docs/benchmarks.md)."""

    __slots__: tuple[str, ...] = ()

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _Snapshot) and other.__class__ is self.__class__:
            return self._fields() == other._fields()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__qualname__}({fields})"

    def __reduce__(self) -> tuple[type[_Snapshot], tuple[object, ...]]:
        # copy and pickle would restore the fields with setattr, which refuses.
        return type(self), self._fields()

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        raise FrozenInstanceError(f"cannot delete field {name!r}")


class EngineStatistics(_Snapshot):
    """A snapshot of one engine's background work.

    `queued`: sent and not yet started (ordering-key backlogs included);
    `in_flight`: being handled (a failing message until its error hook ended);
    `handled` and `failed`: finished since start;
    `active_keys`: ordering keys with a message queued or in flight;
    `unhandled`: dropped or cancelled by `stop()` (or by the loop ending).
    Every message sent is in exactly one of queued, in_flight, handled, failed
    and unhandled.
    """

    __slots__ = (  # noqa: RUF023 - the order __repr__ prints them in
        "queued",
        "in_flight",
        "handled",
        "failed",
        "active_keys",
        "unhandled",
    )

    queued: int
    in_flight: int
    handled: int
    failed: int
    active_keys: int
    unhandled: int

    def __init__(
        self, queued: int, in_flight: int, handled: int, failed: int, active_keys: int = 0, unhandled: int = 0
    ) -> None:
        set_field = object.__setattr__  # the class's own __setattr__ refuses
        set_field(self, "queued", queued)
        set_field(self, "in_flight", in_flight)
        set_field(self, "handled", handled)
        set_field(self, "failed", failed)
        set_field(self, "active_keys", active_keys)
        set_field(self, "unhandled", unhandled)


class Statistics(_Snapshot):
    """`dp.statistics()`: one `EngineStatistics` per engine."""

    __slots__ = ("events", "commands", "queries")  # noqa: RUF023 - the order __repr__ prints them in

    events: EngineStatistics
    commands: EngineStatistics
    queries: EngineStatistics

    def __init__(
        self, events: EngineStatistics, commands: EngineStatistics, queries: EngineStatistics
    ) -> None:
        set_field = object.__setattr__  # the class's own __setattr__ refuses
        set_field(self, "events", events)
        set_field(self, "commands", commands)
        set_field(self, "queries", queries)


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


def checked_hook(on_error: object) -> ErrorHook:
    """`on_error` if it can be called as `on_error(error, message)`; else `ImproperlyConfigured`."""
    if on_error is None:
        return log_error
    if not callable(on_error):
        raise ImproperlyConfigured(
            f"on_error must be a function called as on_error(error, message), not {on_error!r}"
        )
    try:
        inspect.signature(on_error).bind(None, None)
    except TypeError:
        raise ImproperlyConfigured(
            f"on_error={on_error!r} must accept two positional arguments, (error, message)"
        ) from None
    except ValueError:  # no signature to inspect: the call will tell
        pass
    if inspect.isgeneratorfunction(on_error) or inspect.isasyncgenfunction(on_error):
        raise ImproperlyConfigured(
            f"on_error={on_error!r} is a generator function (it yields): calling it runs none of its "
            "code, so every failure would vanish; write it as a def or async def that does not yield"
        )
    return on_error


class Supervisor:
    """What the worker pools, consumers and transport routes of one dispatcher share.

    `closing`: sends from outside a background handling are refused (the
    dispatcher is stopping); `closed`: every send is refused.
    """

    def __init__(self, on_error: object = None) -> None:
        self.on_error: ErrorHook = checked_hook(on_error)
        self.closing = False
        self.closed = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pools: list[WorkerPool] = []
        self._idle: asyncio.Event | None = None

    def inside(self) -> bool:
        """True when the calling code is part of a background handling of this dispatcher
        (run by one of its worker pools, or by one of its consumers)."""
        owner = running_in.get()
        return owner is self or (owner is not None and getattr(owner, "supervisor", None) is self)

    def check_open(self, kind: Kind, message: object) -> None:
        """Raise `DispatcherClosed` if `message` may not be accepted now."""
        if self.closed or (self.closing and not self.inside()):
            raise DispatcherClosed(kind, message)

    def bind(self, action: str) -> asyncio.AbstractEventLoop:
        """The running loop, which must be the dispatcher's (the first one seen becomes it)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise ForeignEventLoop(action) from None
        if self.loop is None:
            self.loop = loop
        elif loop is not self.loop:
            raise ForeignEventLoop(action)
        return loop

    def close_to_outside(self) -> None:
        """Stopping: refuse sends from outside, and the senders waiting for room."""
        self.closing = True
        for pool in self.pools:
            pool.refuse_waiting()

    def unfinished(self) -> int:
        """Messages sent and not done yet, over every pool: what `join()` waits for."""
        return sum(pool.unfinished() for pool in self.pools)

    def pool_settled(self) -> None:
        """A pool has nothing queued or in flight: wake the joins waiting if no pool has."""
        idle = self._idle
        if idle is not None and not idle.is_set() and not self.unfinished():
            idle.set()

    def wake_joins(self) -> None:
        """Wake the `join()` calls waiting: to return (all done), or to replace a lost lane."""
        if self._idle is not None:
            self._idle.set()

    async def join(self) -> None:
        """Return once every sent message, and everything it sent in turn, is done."""
        if self.inside():
            raise WouldDeadlock("dp.join()")
        if self.unfinished():
            self.bind("join the dispatcher")
        while self.unfinished():
            for pool in self.pools:  # also when a lane ends while this waits
                pool.replace_lost_lanes()
            if self._idle is None or self._idle.is_set():
                self._idle = asyncio.Event()
            await self._idle.wait()

    async def report(self, error: BaseException, message: object, context: contextvars.Context) -> None:
        """Hand a failure to the error hook, in `context` (the failing message's own).

        When the failure escaped from a tracked handling, the hook runs in that
        handling's context (`pybus.current_context()` returns it). An async hook is
        awaited. A hook that fails, also with `CancelledError` (a cancelled inner
        task, its own task cancelled), is logged, never raised; only a cancellation
        of the worker from outside, or the shutdown's, propagates.
        """
        record = failure_record(error)
        if record is not None:
            context = context.copy()
            context.run(_current.set, record)
        try:
            result = context.run(self.on_error, error, message)
            if inspect.isawaitable(result):
                rest = start_in(context, _awaited(result))
                if rest is not None:
                    await rest
        except asyncio.CancelledError:
            lane = current_lane()
            if self.closed or lane is None or lane.cancelled_from_outside():
                raise
            logger.exception("pybus: the on_error hook was cancelled while reporting %r", error)
        except Exception:
            logger.exception("pybus: the on_error hook failed while reporting %r", error)


async def _awaited(awaitable: Any) -> None:
    await awaitable


def wake_first(waiters: deque[asyncio.Future[None]]) -> None:
    """Wake the first waiter still waiting (an idle lane), dropping those that gave up."""
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return


class WorkerPool:
    """The queue and worker lanes of one engine.

    Messages sent with the same `key` are handled one at a time, in send order;
    a key's backlog is dropped as soon as the key goes idle. The capacity counts
    every message not yet started. Senders that find it full wait in line, first
    come first served. A handler that sends from inside a background handling of
    the same dispatcher is never made to wait (that could deadlock the pool on
    itself): its messages are accepted past the capacity.
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
        # Each message is queued with the copy of its sender's context, flat, without a tuple
        # per message: with a full queue, tuples would be a third of what the garbage
        # collector traverses. Ready to start: message, context, key, message, ...; waiting
        # for its key's turn, in the key's backlog: message, context, message, ...
        self._ready: deque[object] = deque()
        self._backlogs: dict[object, deque[object]] = {}
        self._queued = 0
        # Room handed to a waiting sender that has not put its message yet.
        self._reserved = 0
        # While `_queued` is below it, a send needs no check: 0 while senders wait in
        # line or the dispatcher is stopping, so that every send takes the slow path.
        self._limit = capacity
        self._idle_lanes: deque[asyncio.Future[None]] = deque()
        self._senders: deque[asyncio.Future[bool]] = deque()
        self._lanes: set[asyncio.Task[None]] = set()
        self._live = 0  # lanes running; a send (or join) replaces those that ended
        self._loop: asyncio.AbstractEventLoop | None = None  # where the lanes run
        # The thread of that loop; -1 while a lane is missing, so that one comparison on
        # every send finds both a foreign thread and lanes to start.
        self._thread = -1
        self._stopping = False
        self.observer: Observer | None = None
        # Counted once per message on its way: `_queued` up when it is queued and down when a
        # lane takes it, `_started` up then, and one of `handled`, `failed` and `_cancelled`
        # up when it ends; in flight is what started and has not ended.
        self._started = 0
        self.handled = 0
        self.failed = 0
        self._cancelled = 0  # cancelled mid-handling (counted in `unhandled` too)
        self.unhandled = 0
        supervisor.pools.append(self)

    def in_flight(self) -> int:
        return self._started - self.handled - self.failed - self._cancelled

    def unfinished(self) -> int:
        """Messages queued or in flight."""
        return self._queued + self.in_flight()

    def statistics(self) -> EngineStatistics:
        return EngineStatistics(
            self._queued, self.in_flight(), self.handled, self.failed, len(self._backlogs), self.unhandled
        )

    # -- sending -----------------------------------------------------------------

    async def send(self, message: object, key: object = None) -> None:
        """Queue `message`, waiting in line for room while the queue is full."""
        supervisor = self._supervisor
        if supervisor.closing:
            supervisor.check_open(self.kind, message)
        if (not self._senders and not self._reserved and self._queued < self.capacity) or supervisor.inside():
            self._put(message, key, False)
            return
        self._check_key(key)  # before waiting: the key will not be better after
        if get_ident() != self._thread:
            self._start_lanes(message)  # checks the loop (a full queue whose lanes ended: restarts them)
        loop = self._loop
        assert loop is not None  # lanes run in it
        waiter: asyncio.Future[bool] = loop.create_future()
        self._senders.append(waiter)
        self._limit = 0
        try:
            room = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                if waiter.result():
                    self._reserved -= 1  # room was handed to this sender: pass it on
                    self._make_room()
            elif waiter in self._senders:  # still in line (a lane may have dropped it already)
                self._senders.remove(waiter)
            self._update_limit()
            raise
        self._reserved -= 1
        try:
            if not room:
                raise DispatcherClosed(self.kind, message)
            supervisor.check_open(self.kind, message)  # the dispatcher may have begun to stop since
            self._put(message, key, False)
        finally:
            self._make_room()  # free room goes to the next sender in line, never to a newcomer

    def send_nowait(self, message: object, key: object = None) -> None:
        """Queue `message` or raise `QueueFull` at once."""
        if self._queued < self._limit:
            self._put(message, key, False)
            return
        supervisor = self._supervisor
        supervisor.check_open(self.kind, message)
        self._check_key(key)
        if not supervisor.inside() and (self._senders or self._reserved or self._queued >= self.capacity):
            raise QueueFull(self.kind, self.capacity)  # room that senders wait for is theirs
        self._put(message, key, False)

    def _check_key(self, key: object) -> None:
        if key is not None:
            try:
                hash(key)
            except TypeError:
                raise self._unhashable(key) from None

    def _unhashable(self, key: object) -> InvalidMessage:
        return InvalidMessage(f"dp.{ROUTERS[self.kind]}.send()", key, key=True)

    def put_if_room(self, message: object, key: object = None, only_if_room: bool = True) -> bool:
        """Queue `message` if that needs no waiting and no checks; False otherwise.

        The fast path of `send`, callable without a coroutine of its own. With
        `only_if_room=False` (the pool's own calls, checks done), queue it anyway.
        One function for both: a frame less on every send.
        """
        if only_if_room and self._queued >= self._limit:
            return False
        # The dispatcher serves one loop, in one thread. asyncio.get_running_loop()
        # costs a system call (getpid) on CPython 3.11, so a send compares the thread
        # (one loop runs in a thread at a time: in the lanes' thread, the lanes' loop is
        # the running one if it runs at all), and asks whether that loop runs only to
        # wake an idle lane (a loop left without dp.stop() holds lanes that never run).
        if get_ident() != self._thread:  # also while a lane is missing
            self._start_lanes(message)
        elif self._idle_lanes and not self._loop.is_running():  # type: ignore[union-attr]
            raise ForeignEventLoop(f"send {self.kind} {key_name(message_key(message))}")
        backlog = None
        if key is not None:
            try:
                backlog = self._backlogs.get(key)
            except TypeError:
                raise self._unhashable(key) from None
        context = copy_context()
        self._queued += 1
        if self.observer is not None:
            self.observer.queued(self.kind, message)
        if key is not None:
            if backlog is not None:
                backlog.append(message)
                backlog.append(context)
                return True  # runs when the message before it with this key is done
            self._backlogs[key] = deque()
        ready = self._ready
        ready.append(message)
        ready.append(context)
        ready.append(key)
        if self._idle_lanes:
            wake_first(self._idle_lanes)
        return True

    _put = put_if_room

    def _start_lanes(self, message: object) -> None:
        """Start the lanes (at the first send), or replace lanes that ended (cancelled from outside)."""
        what = f"send {self.kind} {key_name(message_key(message))}"
        loop = self._supervisor.bind(what)
        if self._stopping:
            raise DispatcherClosed(self.kind, message)
        if not loop.is_running():  # pragma: no cover - bind() found it running
            raise ForeignEventLoop(what)
        self._loop = loop
        self._thread = get_ident()
        self._add_lanes(loop)

    def replace_lost_lanes(self) -> None:
        """Start lanes again where some ended while messages wait (for `join()`)."""
        if self._queued and self._live < self._workers and not self._stopping and self._loop is not None:
            self._add_lanes(self._loop)

    def _add_lanes(self, loop: asyncio.AbstractEventLoop) -> None:
        for number in range(self._live, self._workers):
            lane = LaneTask(self._work(), loop=loop, name=f"pybus-{self.kind}-worker-{number}")
            self._lanes.add(lane)
            lane.add_done_callback(self._lane_ended)
        self._live = self._workers

    def _lane_ended(self, lane: asyncio.Task[None]) -> None:
        """Count `lane` out, once: from its last step (so that a send right after starts
        another), or from its done callback (a lane cancelled before its first step)."""
        if lane not in self._lanes:
            return
        self._lanes.remove(lane)
        self._live -= 1
        self._thread = -1  # the next send starts one in its place
        if self._queued and not self._stopping:
            self._supervisor.wake_joins()  # a join() waiting starts a lane in its place

    # -- room for waiting senders ---------------------------------------------------------

    def _make_room(self) -> None:
        """Hand free room to the senders waiting in line, first come first served."""
        senders = self._senders
        while senders and self._queued + self._reserved < self.capacity:
            waiter = senders.popleft()
            if not waiter.done():
                self._reserved += 1
                waiter.set_result(True)
        self._update_limit()

    def _update_limit(self) -> None:
        # While anyone waits for room or holds room handed to it, every send takes the
        # slow path and lines up: a newcomer never overtakes them.
        if self._senders or self._reserved or self._supervisor.closing or self._stopping:
            self._limit = 0
        else:
            self._limit = self.capacity

    def refuse_waiting(self) -> None:
        """Tell the senders waiting for room that the dispatcher takes nothing more from them."""
        while self._senders:
            waiter = self._senders.popleft()
            if not waiter.done():
                waiter.set_result(False)
        self._limit = 0

    # -- working -----------------------------------------------------------------

    async def _work(self) -> None:
        lane = current_lane()
        assert lane is not None  # started as a LaneTask by _start_lanes
        ready = self._ready
        take = ready.popleft
        supervisor = self._supervisor
        stepper = handlings(self._handle, supervisor)  # runs this lane's handlings, in turn
        first_step = stepper.send
        loop = lane.get_loop()
        try:
            while True:
                while not ready:
                    if self._stopping:
                        return
                    waiter = loop.create_future()
                    self._idle_lanes.append(waiter)
                    await waiter  # a cancellation here ends the lane: nothing is in hand
                if self._stopping:
                    return
                message = take()
                context: contextvars.Context = take()  # type: ignore[assignment]
                key = take()
                self._queued -= 1
                if self._senders:
                    self._make_room()
                self._started += 1
                step: Any = context.run(first_step, message)
                if step is DONE and not lane.dirty:
                    # Done in its first step, and no cancellation asked for: every background
                    # handling's common path, _done() written out.
                    self.handled += 1
                    if key is not None:
                        self._release(key)
                    if self.observer is not None:
                        context.run(self.observer.dequeued, self.kind, message)
                    if not self._queued and not self.in_flight():
                        supervisor.pool_settled()
                    continue
                if step is not DONE and step.__class__ is not Failed:
                    step = await rest_of(stepper, context, step)  # it waits: run the rest
                error: BaseException | None = None
                if step is not DONE:
                    error = step.error
                    if isinstance(error, asyncio.CancelledError) and (
                        self._stopping or lane.cancelled_from_outside()
                    ):
                        self._ended_by_cancellation(message, context, key)
                        raise error
                    # Else the handling cancelled itself, raised CancelledError, or failed.
                # A cancellation the handling asked for on its own task must not reach what
                # follows (its error report, the next message); one from outside ends the lane.
                alive = not lane.dirty or await lane.settle()
                if error is None:
                    self.handled += 1
                    self._done(message, context, key)
                else:
                    try:
                        where = (
                            f"while handling {self.kind} {key_name(message_key(message))} in the background "
                            f"({self._handlers_of(message)})"
                        )
                        for failure in each_failure(error, message):  # each failing handler's own
                            failure.add_note(where)
                            await supervisor.report(failure, message, context)
                            # The hook's own cancel() must not reach its next call.
                            alive = (not lane.dirty or await lane.settle()) and alive
                    finally:
                        self.failed += 1  # after the hook: join() waits for it
                        self._done(message, context, key)
                if not alive:
                    return  # cancelled from outside as the handling ended
        finally:
            self._lane_ended(lane)  # at once: the next send or join() sees it

    def _handlers_of(self, message: object) -> str:
        try:
            return self._describe(message)
        except Exception:  # the handler map changed meanwhile (dp.override_handler ended)
            return "handler unknown"

    def _ended_by_cancellation(self, message: object, context: contextvars.Context, key: object) -> None:
        self._cancelled += 1
        self.unhandled += 1
        if not self._stopping:
            logger.warning(
                "pybus: a %s worker was cancelled from outside while handling %r; the message is "
                "counted as not handled (stop the dispatcher with dp.stop() before its event loop ends)",
                self.kind,
                message,
            )
        self._done(message, context, key)

    def _done(self, message: object, context: contextvars.Context, key: object) -> None:
        """After the message's counter went up: free its key, tell the observer and `join()`."""
        if key is not None:
            self._release(key)
        if self.observer is not None:
            context.run(self.observer.dequeued, self.kind, message)
        if not self._queued and not self.in_flight():
            self._supervisor.pool_settled()

    def _release(self, key: object) -> None:
        backlog = self._backlogs.get(key)
        if backlog is None:
            return  # the pool was stopped and its backlogs dropped
        if backlog:
            ready = self._ready
            ready.append(backlog.popleft())  # the message
            ready.append(backlog.popleft())  # its context
            ready.append(key)
            if self._idle_lanes:
                wake_first(self._idle_lanes)
        else:
            del self._backlogs[key]

    def begin_cancel(self) -> None:
        """Stop: drop what is queued and cancel the handlings in flight, now.

        What is dropped or cancelled is counted in `unhandled`. A handler that
        swallows its cancellation still ends its lane: the lane takes no other
        message. `cancelled()` waits for the lanes to end.
        """
        self._stopping = True
        self.refuse_waiting()
        ready = list(self._ready)
        dropped = list(zip(ready[0::3], ready[1::3], strict=True))  # (message, context)
        for backlog in self._backlogs.values():
            waiting = list(backlog)
            dropped.extend(zip(waiting[0::2], waiting[1::2], strict=True))
        self._ready.clear()
        self._backlogs.clear()
        self._queued = 0
        self.unhandled += len(dropped)
        if self.observer is not None:
            for message, context in dropped:
                context.run(self.observer.dequeued, self.kind, message)  # type: ignore[attr-defined]
        if not self.in_flight():
            self._supervisor.pool_settled()
        for lane in self._lanes:
            lane.cancel()

    async def cancelled(self) -> None:
        """Wait until every lane has ended (after `begin_cancel`)."""
        if self._lanes:
            # wait(), not `await lane`: a cancellation of the caller itself still propagates.
            await asyncio.wait(list(self._lanes))
