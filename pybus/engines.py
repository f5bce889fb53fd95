"""Engines: run the compiled handlers of one kind.

`RequestEngine.handle` runs the one handler of a command or query and returns
its result; `EventEngine.publish` runs every handler of an event. Both hand
follow-up events (return values and collected events) to the event engine,
which publishes them breadth-first, level by level, in the order they were
emitted, before the original call returns.

The hot paths are written out by hand: a dict lookup on the message's class,
a call, an await. Everything that can be decided once is decided at `start()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
from inspect import isawaitable
from itertools import chain
from typing import TYPE_CHECKING, Any

from pybus.context import (
    Delivery,
    Ids,
    Record,
    _current,
    _numbers,
    child_ids,
    child_of,
    delivered_ids,
    remember_failure,
)
from pybus.errors import (
    CALLS,
    CascadeDepthExceeded,
    DispatcherClosed,
    HandlerNotFound,
    ImproperlyConfigured,
    InvalidMessage,
    Kind,
    handler_failures,
    key_name,
    message_key,
)
from pybus.handlers import CallPlan, positive_seconds, within
from pybus.settings import Settings
from pybus.tracking import call, call_tracked, instrumented, retried
from pybus.workers import Supervisor, WorkerPool

if TYPE_CHECKING:
    from pybus.observer import Observer
    from pybus.transport_routes import Forwarder

_NO_PLANS: tuple[CallPlan, ...] = ()


class Quiet(tuple[Any, ...]):
    """The fast table's entry for several handlers that all return None (`CallPlan.direct`):
    publish runs them without looking at their results."""

    __slots__ = ()


class _Engine:
    """What both engines share: the observer switch and the closing of the fast paths.

    `tracked` (decided at start) and `tracking` (also while an observer is attached)
    say whether handler calls run inside their handling context (`pybus.context`).
    """

    observer: Observer | None
    closed: bool
    workers: WorkerPool
    tracked: bool
    tracking: bool
    _fast: dict[object, Any]
    _fast_all: dict[object, Any]

    def observe(self, observer: Observer | None) -> None:
        """Report to `observer` from now on (None: stop), taking the general paths meanwhile."""
        self.observer = observer
        self.workers.observer = observer
        self.tracking = self.tracked or observer is not None
        self._fast = self._fast_all if observer is None and not self.closed else {}

    def close(self) -> None:
        """Refuse every call from now on with `DispatcherClosed` (the dispatcher stopped).

        The fast path's table is emptied, so the check costs the fast path nothing.
        """
        self.closed = True
        self._fast = {}


class EventEngine(_Engine):
    """Runs every handler of an event and the cascade of follow-up events.

    Handlers of one event run one after the other in registration order
    (handlers of base classes after, in MRO order), or all at once in a task
    group when `concurrent`. A failing handler never stops the others; the
    failures are raised together as an `ExceptionGroup` once all have run.
    """

    kind: Kind = "event"

    def __init__(
        self,
        plans: Mapping[object, tuple[CallPlan, ...]],
        *,
        settings: Settings,
        supervisor: Supervisor,
        foreign: Mapping[object, Kind],
        forwarder: Forwarder | None = None,
    ) -> None:
        self._exact = dict(plans)
        # Routed events go to the transport instead of the local handlers
        # (which `deliver` runs, for messages that came from the transport).
        self._routed = forwarder.keys if forwarder is not None else frozenset()
        self._local: dict[type, tuple[CallPlan, ...]] = {}  # local_plans, by class
        self._forwards: dict[object, tuple[CallPlan, ...]] = {}
        if forwarder is not None:
            self._forwards = {
                key: (CallPlan(handler, forwarder.forward, True, None),)
                for key, handler in forwarder.handlers.items()
            }
        self._foreign = foreign
        self.tracked = self.tracking = settings.tracked
        self._instrument = settings.instrument
        self._concurrent = settings.concurrent_events
        self._max_depth = settings.max_cascade_depth
        #: Refuses every call once the dispatcher has stopped (see `close`).
        self.closed = False
        # Resolved along the MRO once; classes first seen later are added by _resolve.
        self._plans: dict[object, tuple[CallPlan, ...]] = {}
        # Every plan ever in a fast table, by its invoke: the failures of the fast loops are
        # noted from it (it only grows: override_handler adds the overrides' plans).
        self._plan_by_invoke: dict[Callable[[Any], Any], CallPlan] = {}
        # Keys whose handlers are all plain async callables, run by publish's fast loop.
        # `_fast` is what publish reads: the same table, or empty while observed.
        # The entry is the handler's invoke when there is one handler, else a tuple of them.
        self._fast_all: dict[object, Any] = {}
        self._fast = self._fast_all
        self.observer: Observer | None = None
        #: Per class, filled on first sight: what a handler's return value of that class
        #: asks for. False: nothing (no handler, and no error to raise); its one handler,
        #: a plain async one (`_fast_all`'s entry), which `execute` runs itself as the
        #: cascade's first level; True: the general `cascade`.
        self.wanted: dict[type, Any] = {}
        self._resolve_registered()
        #: The background queue and worker lanes of events.
        self.workers = WorkerPool(
            "event",
            self.publish,
            supervisor,
            workers=settings.workers,
            capacity=settings.queue_size,
            describe=self.describe,
        )

    def _resolve_registered(self) -> None:
        for key in [*self._exact, *self._routed]:
            if isinstance(key, type):
                self._resolve_class(key)
            else:
                self._remember(key, self._forwards[key] if key in self._routed else self._exact[key])

    def replace(self, key: object, plans: tuple[CallPlan, ...]) -> tuple[CallPlan, ...]:
        """Run `plans` for events of exactly `key` from now on; return what ran before.

        For `dp.override_handler`; an empty tuple removes the key.
        """
        previous = self._exact.pop(key, ())
        if plans:
            self._exact[key] = plans
        self._plans.clear()
        self._local.clear()
        self._fast_all.clear()
        self.wanted.clear()
        self._resolve_registered()
        return previous

    def _remember(self, key: object, plans: tuple[CallPlan, ...]) -> tuple[CallPlan, ...]:
        self._plans[key] = plans
        for plan in plans:
            self._plan_by_invoke[plan.invoke] = plan
        if (
            plans
            and not self._concurrent
            and not self.tracked
            and key not in self._routed
            and all(p.is_async and p.collect is None for p in plans)
        ):
            if len(plans) == 1:
                self._fast_all[key] = plans[0].invoke
            elif all(p.direct for p in plans):
                self._fast_all[key] = Quiet(p.invoke for p in plans)
            else:
                self._fast_all[key] = tuple(p.invoke for p in plans)
        return plans

    def _resolve_class(self, cls: type) -> tuple[CallPlan, ...]:
        if cls is type(None) or issubclass(cls, type):
            return self._remember(cls, _NO_PLANS)  # None, or a class: not a message (InvalidMessage)
        if cls in self._routed:
            return self._remember(cls, self._forwards[cls])
        return self._remember(cls, self.local_plans(cls))

    def local_plans(self, key: object) -> tuple[CallPlan, ...]:
        """The handlers of this process for `key` (a class or string), routed or not."""
        if not isinstance(key, type):
            return self._exact.get(key, _NO_PLANS)
        found = self._local.get(key)
        if found is None:
            found = tuple(chain.from_iterable(self._exact.get(base, _NO_PLANS) for base in key.__mro__))
            self._local[key] = found
        return found

    def _resolve(self, message: object) -> tuple[CallPlan, ...]:
        if isinstance(message, str):
            return self._plans.get(message, _NO_PLANS)
        return self._resolve_class(type(message))

    def handlers_for(self, message: object) -> tuple[CallPlan, ...]:
        """The call plans that `publish(message)` runs, in order."""
        plans = self._plans.get(message.__class__)
        return self._resolve(message) if plans is None else plans

    def describe(self, event: object) -> str:
        """The handlers `publish(event)` runs, for error reports."""
        return ", ".join(str(plan.handler) for plan in self.handlers_for(event)) or "no handler"

    def check(self, event: object, call: str = "dp.events.send()") -> None:
        """Raise `HandlerNotFound` now for an event whose key is a command or query,
        `InvalidMessage` for a class or None."""
        if not self.handlers_for(event):
            _check_message(call, event)
            self._check_foreign(event)

    async def publish(self, event: object, timeout: float | None = None) -> None:
        """Run every handler of `event`, then its follow-ups.

        Raises `HandlerNotFound` when the event has no handler and its key is
        registered as a command or query, and an `ExceptionGroup` of every
        handler failure (follow-ups included) after all ran. Past `timeout`
        seconds the handling is cancelled and `TimeoutError` raised.
        """
        if timeout is not None:
            _check_timeout("dp.publish()", timeout)
            await within(timeout, self.publish(event), _late("event", event, timeout))
            return
        invokes = self._fast.get(event.__class__)
        if invokes is None:
            await self._publish(event)
            return
        if invokes.__class__ is not tuple:
            if invokes.__class__ is Quiet:
                # Handlers proven to return None (`CallPlan.direct`): no result to look at.
                failed = None
                for invoke in invokes:
                    try:
                        await invoke(event)
                    except Exception as exc:
                        if failed is None:
                            failed = []
                        failed.append(self.annotate(exc, invoke, event))
                    except BaseException as exc:  # a cancellation: it propagates at once
                        if failed is not None:
                            _failed_before(exc, failed)
                        raise
                if failed is None:
                    return
                raise _grouped(event, _publishing(event, failed), failed)
            # One handler: no loop.
            try:
                result = await invokes(event)
            except Exception as exc:
                failed = [self.annotate(exc, invokes, event)]
            else:
                if result is None:
                    return
                failed = []
                await self.cascade([result], failed)
                if not failed:
                    return
            raise _grouped(event, _publishing(event, failed), failed)
        # The common case, written out: no per-handler branching, no lists allocated
        # unless a handler returns a follow-up or fails (and no comprehension: it
        # would make `self` and `event` cells, which every call pays for).
        failures: list[Exception] | None = None
        followups: list[Any] | None = None
        for invoke in invokes:
            try:
                result = await invoke(event)
            except Exception as exc:
                if failures is None:
                    failures = []
                failures.append(self.annotate(exc, invoke, event))
            except BaseException as exc:  # a cancellation: it propagates at once
                if failures is not None:
                    _failed_before(exc, failures)
                raise
            else:
                if result is not None:
                    if followups is None:
                        followups = []
                    followups.append(result)
        if followups is not None:
            if failures is None:
                failures = []
            await self.cascade(followups, failures)
        if failures:
            raise _grouped(event, _publishing(event, failures), failures)

    async def _publish(self, event: object) -> None:
        if self.closed:
            raise DispatcherClosed("event", event)
        if self._routed and message_key(event) in self._routed:
            await self._write(event)
            return
        await self._run(event, self.handlers_for(event))

    async def _write(self, event: object) -> None:
        """Publish a routed event: write it to the transport; its failure is raised as it is."""
        (plan,) = self._forwards[message_key(event)]
        observer = self.observer
        if observer is None:
            await plan.invoke(event)
            return
        observer.started("event", event)
        try:
            await plan.invoke(event)
        except Exception as exc:
            observer.failed("event", event, plan.handler, exc)
            raise
        else:
            observer.handled("event", event, plan.handler, None)
        finally:
            observer.finished("event", event)

    async def deliver(self, event: object, delivery: Delivery) -> None:
        """Run this process's handlers of an event that came from the transport, then its
        follow-ups (routed follow-ups go to the transport). Raises like `publish`.

        The handlings carry the delivery's ids, attempt and headers."""
        await self._run(event, self.local_plans(message_key(event)), delivered_ids(delivery))

    async def _run(self, event: object, plans: tuple[CallPlan, ...], ids: Ids | None = None) -> None:
        if ids is None and self.tracking:
            ids = child_ids(_current.get())
        if self._instrument is not None and ids is not None and plans:
            await instrumented(self._instrument, "event", event, ids, self._observed(event, plans, ids))
        else:
            await self._observed(event, plans, ids)

    async def _observed(self, event: object, plans: tuple[CallPlan, ...], ids: Ids | None) -> None:
        observer = self.observer
        if observer is None:
            await self._publish_observed(event, plans, None, ids)
            return
        observer.started("event", event)
        try:
            await self._publish_observed(event, plans, observer, ids)
        finally:
            observer.finished("event", event)

    async def _publish_observed(
        self, event: object, plans: tuple[CallPlan, ...], observer: Observer | None, ids: Ids | None
    ) -> None:
        if not plans:
            _check_message("dp.publish()", event)
            if observer is not None:
                observer.no_handler(event)
            self._check_foreign(event)
            return
        followups: list[Any] = []
        failures: list[Exception] = []
        await self._fan_out(event, plans, followups, failures, ids)
        if followups:
            await self.cascade(followups, failures, None if ids is None else [ids] * len(followups))
        if failures:
            raise _grouped(event, _publishing(event, failures), failures)

    def wants(self, event: object) -> bool:
        """False when publishing `event` would certainly do nothing (no handler, no error)."""
        if self.observer is not None:
            return True  # an observer hears of events nobody handles
        return self.follow_up(event) is not False

    def follow_up(self, event: object) -> Any:
        """`wanted`'s entry for `event`'s class, made on first sight (see `wanted`)."""
        wanted = self.wanted.get(event.__class__)
        if wanted is None:
            if not self.handlers_for(event) and message_key(event) not in self._foreign:
                wanted = False
            else:
                fast = self._fast_all.get(event.__class__) if self._max_depth >= 1 else None
                one = fast is not None and fast.__class__ is not tuple and fast.__class__ is not Quiet
                wanted = fast if one else True
            if not isinstance(event, str):
                self.wanted[event.__class__] = wanted
        return wanted

    async def cascade(
        self,
        events: list[Any],
        failures: list[Exception],
        parents: list[Ids] | None = None,
        depth: int = 1,
    ) -> None:
        """Publish follow-up events breadth-first, appending handler failures to `failures`.

        While tracking, `parents[i]` are the ids of the message whose handling produced
        `events[i]`: each follow-up is a child of it (same correlation, caused by it).
        `depth` is the cascade level of `events` (1: follow-ups of the original call).
        """
        while events:
            produced: list[Any] = []
            produced_by: list[Ids] | None = None if parents is None else []
            for index, event in enumerate(events):
                plans = self._plans.get(event.__class__)
                if plans is None:
                    plans = self._resolve(event)
                if plans:
                    if depth > self._max_depth:
                        cause = (
                            ExceptionGroup("handler failures before the limit", failures)
                            if failures
                            else None
                        )
                        raise CascadeDepthExceeded(self._max_depth, message_key(event)) from cause
                    if produced_by is None:  # not tracking: no parents either
                        await self._fan_out(event, plans, produced, failures)
                        continue
                    assert parents is not None
                    ids = child_of(parents[index])
                    before = len(produced)
                    if self._instrument is None:
                        await self._fan_out(event, plans, produced, failures, ids)
                    else:
                        await self._fan_out_instrumented(event, plans, produced, failures, ids)
                    produced_by.extend([ids] * (len(produced) - before))
                elif (kind := self._foreign.get(message_key(event))) is not None:
                    error = HandlerNotFound("event", message_key(event), registered_as=kind)
                    error.add_note("it was returned or collected by a handler as a follow-up event")
                    failures.append(error)
                elif self.observer is not None:
                    self.observer.no_handler(event)
            events, parents = produced, produced_by
            depth += 1

    def annotate(self, exc: Exception, invoke: Callable[[Any], Any], event: object) -> Exception:
        """`exc`, raised by the handler whose fast-table entry is `invoke`, with its note. The
        plan is the one the fast table held when the handling began (`_plan_by_invoke`:
        `override_handler` may have rebuilt `_plans` since)."""
        return _annotate(exc, self._plan_by_invoke[invoke], event)

    async def _fan_out_instrumented(
        self,
        event: object,
        plans: tuple[CallPlan, ...],
        produced: list[Any],
        failures: list[Exception],
        ids: Ids,
    ) -> None:
        """`_fan_out` of a follow-up, between the instrumentation's two calls; its handlers'
        failures (which the cascade collects rather than raises) end it as a group."""
        assert self._instrument is not None
        token = self._instrument.started("event", event, ids)
        before = len(failures)
        try:
            await self._fan_out(event, plans, produced, failures, ids)
        except BaseException as exc:
            self._instrument.finished(token, exc)
            raise
        own = failures[before:]
        self._instrument.finished(
            token, handler_failures(event, _publishing(event, own), own) if own else None
        )

    def _check_foreign(self, event: object) -> None:
        kind = self._foreign.get(message_key(event))
        if kind is not None:
            raise HandlerNotFound("event", message_key(event), registered_as=kind)

    async def _fan_out(
        self,
        event: object,
        plans: tuple[CallPlan, ...],
        followups: list[Any],
        failures: list[Exception],
        ids: Ids | None = None,
    ) -> None:
        if self._concurrent and len(plans) > 1:
            await self._fan_out_concurrently(event, plans, followups, failures, ids)
            return
        observer = self.observer
        for plan in plans:
            try:
                if ids is not None:
                    result = await call_tracked(plan, event, followups, ids)
                elif plan.collect is None:
                    result = plan.invoke(event)
                    if plan.is_async or isawaitable(result):
                        result = await result
                else:
                    result = await plan.collect(event, followups)
            except Exception as exc:
                failures.append(_annotate(exc, plan, event))
                if observer is not None:
                    observer.failed("event", event, plan.handler, exc)
            except BaseException as exc:  # a cancellation: it propagates at once
                if observer is not None and isinstance(exc, asyncio.CancelledError):
                    observer.failed("event", event, plan.handler, exc)
                _failed_before(exc, failures)
                raise
            else:
                if observer is not None:
                    observer.handled("event", event, plan.handler, result)
                if result is not None:
                    followups.append(result)

    async def _fan_out_concurrently(
        self,
        event: object,
        plans: tuple[CallPlan, ...],
        followups: list[Any],
        failures: list[Exception],
        ids: Ids | None,
    ) -> None:
        # Each handler gets its own list so follow-ups keep registration order,
        # whatever order the handlers finish in.
        outputs: list[list[Any]] = [[] for _ in plans]
        errors: list[Exception | None] = [None] * len(plans)
        cancelled: list[asyncio.CancelledError] = []

        observer = self.observer
        # The group cancels its tasks only when the task running it is cancelled (run()
        # lets no exception out): any other CancelledError is a handler's own, raised or
        # asked for with asyncio.current_task().cancel().
        parent = asyncio.current_task()

        async def run(index: int, plan: CallPlan) -> None:
            try:
                if ids is None:
                    result = await call(plan, event, outputs[index])
                else:
                    result = await call_tracked(plan, event, outputs[index], ids)
            except asyncio.CancelledError as exc:
                if parent is not None and parent.cancelling():
                    # The group is being cancelled: the group raises the cancellation of the
                    # task running it, which must still say what this one's notes say.
                    cut_off.extend(getattr(exc, "__notes__", ()))
                    raise
                # It propagates after the group, as it does when handlers run one after the other.
                cancelled.append(exc)
                if observer is not None:
                    observer.failed("event", event, plan.handler, exc)
            except Exception as exc:
                errors[index] = _annotate(exc, plan, event)
                if observer is not None:
                    observer.failed("event", event, plan.handler, exc)
            else:
                if observer is not None:
                    observer.handled("event", event, plan.handler, result)
                if result is not None:
                    outputs[index].append(result)

        cut_off: list[str] = []
        try:
            async with asyncio.TaskGroup() as group:
                for index, plan in enumerate(plans):
                    group.create_task(run(index, plan))
        except asyncio.CancelledError as exc:
            for note in cut_off:
                exc.add_note(note)
            _failed_before(exc, [*failures, *(error for error in errors if error is not None)])
            raise
        if cancelled:
            _failed_before(cancelled[0], [*failures, *(error for error in errors if error is not None)])
            raise cancelled[0]
        for output, error in zip(outputs, errors, strict=True):
            if error is None:
                followups.extend(output)
            else:
                failures.append(error)


class RequestEngine(_Engine):
    """Runs the one handler of a command or query and returns its result.

    The handler's exception reaches the caller unchanged. Follow-up events are
    published after the handler returned and before `handle` returns.
    """

    def __init__(
        self,
        kind: Kind,
        plans: Mapping[object, CallPlan],
        *,
        events: EventEngine,
        settings: Settings,
        supervisor: Supervisor,
        foreign: Mapping[object, Kind],
    ) -> None:
        self.kind: Kind = kind
        #: Refuses every call once the dispatcher has stopped (see `close`).
        self.closed = False
        self._plans = dict(plans)
        self.tracked = self.tracking = settings.tracked
        self._instrument = settings.instrument
        # Plain async handlers, called by handle's fast path without looking at the plan
        # (their plans, when tracked); `_fast` is empty while an observer is attached.
        self._fast_all = {key: self._fast_entry(p) for key, p in plans.items() if self._fast_ok(p)}
        self._fast = self._fast_all
        # Of those, the handlers proven to return None (`CallPlan.direct`): handle returns
        # their own coroutine. Emptied with `_fast`.
        self._direct_all: dict[object, Callable[[Any], Coroutine[Any, Any, Any]]] = {
            key: p.invoke for key, p in plans.items() if self._direct_ok(p)
        }
        self._direct = self._direct_all
        # Handlers that collect events (and nothing else: no middleware, no tracking): their
        # `collect`, called by handle's second fast path. Emptied with `_fast`.
        self._collecting_all = {key: p.collect for key, p in plans.items() if self._collecting_ok(p)}
        self._collecting = self._collecting_all
        self.observer: Observer | None = None
        # Decided once: what execute/query, the workers and the consumer call.
        if self.tracked:
            setattr(self, "handle", self._handle_tracked)  # noqa: B010 - shadows the method
        elif not self._direct_all:
            # No handler to hand over: one coroutine, no plain call in front of it.
            setattr(self, "handle", self._handle_async)  # noqa: B010 - shadows the method
        self._events = events
        self._wanted = events.wanted
        self._foreign = foreign
        #: The background queue and worker lanes of this kind.
        self.workers = WorkerPool(
            kind,
            self.handle,
            supervisor,
            workers=settings.workers,
            capacity=settings.queue_size,
            describe=self.describe,
        )

    def replace(self, key: object, plan: CallPlan | None) -> CallPlan | None:
        """Run `plan` for `key` from now on (None: no handler); return what ran before.

        For `dp.override_handler`.
        """
        previous = self._plans.pop(key, None)
        self._fast_all.pop(key, None)
        self._direct_all.pop(key, None)
        self._collecting_all.pop(key, None)
        if plan is not None:
            self._plans[key] = plan
            if self._fast_ok(plan):
                self._fast_all[key] = self._fast_entry(plan)
            if self._direct_ok(plan):
                self._direct_all[key] = plan.invoke
            if self._collecting_ok(plan):
                self._collecting_all[key] = plan.collect
        return previous

    def observe(self, observer: Observer | None) -> None:
        super().observe(observer)
        fast = observer is None and not self.closed
        self._direct = self._direct_all if fast else {}
        self._collecting = self._collecting_all if fast else {}

    def close(self) -> None:
        super().close()
        self._direct = {}
        self._collecting = {}

    def _fast_ok(self, plan: CallPlan) -> bool:
        # An instrumented dispatcher takes the general path, which tells the instrumentation.
        return plan.is_async and plan.collect is None and self._instrument is None

    def _collecting_ok(self, plan: CallPlan) -> bool:
        return plan.is_async and plan.collect is not None and not self.tracked and self._instrument is None

    def _direct_ok(self, plan: CallPlan) -> bool:
        # Tracked handlings run inside their context, which a bare coroutine cannot set.
        return plan.direct and not self.tracked and self._fast_ok(plan)

    def _fast_entry(self, plan: CallPlan) -> Any:
        return plan if self.tracked else plan.invoke

    def handles(self, message: object) -> bool:
        """True when a handler is registered for `message`'s key."""
        return self.has_handler(message_key(message))

    def has_handler(self, key: object) -> bool:
        """True when a handler is registered for `key`."""
        return key in self._plans

    def plan_for(self, message: object, call: str = "") -> CallPlan:
        """The call plan for `message`; raises `HandlerNotFound` when there is none
        (`InvalidMessage` for a class or None, naming `call`)."""
        plan = self._plans.get(message.__class__)
        if plan is None:
            plan = self._plans.get(message) if isinstance(message, str) else None
            if plan is None:
                _check_message(call or CALLS[self.kind], message)
                key = message_key(message)
                raise HandlerNotFound(self.kind, key, registered_as=self._foreign.get(key))
        return plan

    def describe(self, message: object) -> str:
        """The handler of `message`, for error reports."""
        return str(self.plan_for(message).handler)

    def check(self, message: object, call: str = "") -> None:
        """Raise `HandlerNotFound` now, not in a worker, for a message without a handler
        (`InvalidMessage` for a class or None, naming `call`)."""
        self.plan_for(message, call)

    def handle(self, message: object, timeout: float | None = None) -> Coroutine[Any, Any, Any]:
        """Run the handler of `message` and its follow-ups; awaiting gives the handler's result.

        Past `timeout` seconds (follow-ups included) the handling is cancelled
        and `TimeoutError` raised. Nothing runs, and nothing is raised, until the
        returned coroutine is awaited; for a handler handed over (`CallPlan.direct`),
        the coroutine is the handler's own, taken from the table as it is now.
        """
        if timeout is None:
            invoke = self._direct.get(message.__class__)
            if invoke is not None:
                # The handler's own coroutine: it returns None, so there is no follow-up
                # to publish and nothing to wrap (`CallPlan.direct`).
                return invoke(message)
        return self._handle_async(message, timeout)

    async def _handle_async(self, message: object, timeout: float | None = None) -> Any:
        """`handle`, as one coroutine: for handlers that may return something."""
        if timeout is not None:
            _check_timeout(CALLS[self.kind], timeout)
            return await within(timeout, self._handle_async(message), _late(self.kind, message, timeout))
        invoke = self._fast.get(message.__class__)
        if invoke is not None:
            result = await invoke(message)
            if result is None:
                return None
            event = result
        else:
            collect = self._collecting.get(message.__class__)
            if collect is None:
                return await self._handle(message)
            # A handler that collects events: `_run`'s steps, without observer or tracking.
            collected: list[Any] = []
            result = await collect(message, collected)
            if result is not None and self._events.wants(result):
                collected.append(result)
            if not collected:
                return result
            if len(collected) > 1:
                await self._follow_up(collected, message)
                return result
            event = collected[0]
        invokes = self._wanted.get(event.__class__)
        if invokes is None:
            invokes = self._events.follow_up(event)
        if invokes is False:
            return result
        if invokes is True:
            await self._follow_up([event], message)
            return result
        # One follow-up event with one plain async handler: the first level of the cascade,
        # written out (`EventEngine.cascade` runs every other case and the levels below;
        # tests/test_fast_paths.py holds the two to the same outcome).
        try:
            produced = await invokes(event)
        except Exception as exc:
            failed = [self._events.annotate(exc, invokes, event)]
        else:
            if produced is None:
                return result
            failed = []
            await self._events.cascade([produced], failed, depth=2)
            if not failed:
                return result
        raise self._followups_failed(message, failed)

    async def _handle_tracked(self, message: object, timeout: float | None = None) -> Any:
        """`handle`, for a tracked dispatcher: the handler runs inside its handling context.

        The plain async handler's case is written out (a record, a context variable
        set and reset); a failure goes to the handler's retry policy, if any.
        """
        if timeout is not None:
            _check_timeout(CALLS[self.kind], timeout)
            return await within(timeout, self._handle_tracked(message), _late(self.kind, message, timeout))
        plan = self._fast.get(message.__class__)
        if plan is None:
            return await self._handle(message)
        parent = _current.get()
        number = next(_numbers)
        if parent is None:
            ids: Ids = (number, number, None, None)
        else:
            above = parent[2]
            ids = (number, above[1], above[0], above[3])
        record: Record = (plan.handler, 1, ids)
        token = _current.set(record)
        try:
            result = await plan.invoke(message)
        except Exception as exc:
            _current.reset(token)
            if plan.retry is None:
                remember_failure(exc, record)
                raise
            result = await retried(plan, message, [], record, exc)
        except BaseException as exc:
            _current.reset(token)
            remember_failure(exc, record)
            raise
        else:
            _current.reset(token)
        if result is not None:
            wanted = self._wanted.get(result.__class__)
            if wanted or (wanted is None and self._events.wants(result)):
                await self._follow_up([result], message, ids)
        return result

    async def deliver(self, message: object, delivery: Delivery) -> Any:
        """Run the handler of a message that came from the transport (with the delivery's
        ids, attempt and headers in its context), then its follow-ups."""
        return await self._handle(message, delivered_ids(delivery))

    async def _handle(self, message: object, ids: Ids | None = None) -> Any:
        if self.closed:
            raise DispatcherClosed(self.kind, message)
        plan = self.plan_for(message)
        if ids is None and self.tracking:
            ids = child_ids(_current.get())
        if self._instrument is not None and ids is not None:
            handling = self._observed(plan, message, ids)
            return await instrumented(self._instrument, self.kind, message, ids, handling)
        return await self._observed(plan, message, ids)

    async def _observed(self, plan: CallPlan, message: object, ids: Ids | None) -> Any:
        observer = self.observer
        if observer is None:
            return await self._run(plan, message, None, ids)
        observer.started(self.kind, message)
        try:
            return await self._run(plan, message, observer, ids)
        finally:
            observer.finished(self.kind, message)

    async def _run(self, plan: CallPlan, message: object, observer: Observer | None, ids: Ids | None) -> Any:
        followups: list[Any] = []
        try:
            if ids is None:
                result = await call(plan, message, followups)
            else:
                result = await call_tracked(plan, message, followups, ids)
        except (Exception, asyncio.CancelledError) as exc:
            if observer is not None:
                observer.failed(self.kind, message, plan.handler, exc)
            raise
        if observer is not None:
            observer.handled(self.kind, message, plan.handler, result)
        if result is not None and self._events.wants(result):
            followups.append(result)
        if followups:
            await self._follow_up(followups, message, ids)
        return result

    async def _follow_up(self, events: list[Any], message: object, ids: Ids | None = None) -> None:
        failures: list[Exception] = []
        await self._events.cascade(events, failures, None if ids is None else [ids] * len(events))
        if failures:
            raise self._followups_failed(message, failures)

    def _followups_failed(self, message: object, failures: list[Exception]) -> Exception:
        return _grouped(
            message,
            f"{self.kind} {key_name(message_key(message))} succeeded, but "
            f"{len(failures)} follow-up event handler(s) failed",
            failures,
        )


def _late(kind: Kind, message: object, seconds: float) -> str:
    return f"{kind} {key_name(message_key(message))} did not finish within {seconds} s"


def _check_timeout(call: str, timeout: object) -> None:
    if not positive_seconds(timeout):
        raise ImproperlyConfigured(
            f"{call.removesuffix('()')}(..., timeout={timeout!r}): timeout is None (no limit) or a "
            "number of seconds > 0"
        )


def _check_message(call: str, message: object) -> None:
    """Refuse what cannot be a message (checked only where no handler was found)."""
    if message is None or isinstance(message, type):
        raise InvalidMessage(call, message)


def _publishing(event: object, failures: list[Exception]) -> str:
    return f"publishing {key_name(message_key(event))}: {len(failures)} event handler(s) failed"


def _grouped(message: object, summary: str, failures: list[Exception]) -> Exception:
    """The failures as one `ExceptionGroup`, except for a recursion error, which passes up alone.

    A cycle of handlers that publish or execute inside each other ends in a
    RecursionError (or CascadeDepthExceeded) hundreds of calls deep; wrapping it
    at every level would nest groups as deep. The other failures of a level are
    named in a note on it.
    """
    for failure in failures:
        if isinstance(failure, RecursionError):
            others = [other for other in failures if other is not failure]
            if others:
                failure.add_note(
                    f"{len(others)} other handler(s) failed at the same level: "
                    + "; ".join(f"{type(other).__name__}: {other}" for other in others)
                )
            return failure
    return handler_failures(message, summary, failures)


def _failed_before(cancellation: BaseException, failures: list[Exception]) -> None:
    """A cancellation ends a publish at once, before its failures are raised: they would be
    lost, so they are named in a note on it (which reaches the caller or the error hook)."""
    if failures:
        cancellation.add_note(
            f"{len(failures)} other event handler failure(s) of this publish, not raised because of it: "
            + "; ".join(f"{type(failure).__name__}: {failure}" for failure in failures)
        )


def _annotate(exc: Exception, plan: CallPlan, event: object) -> Exception:
    if isinstance(exc, RecursionError) and getattr(exc, "__notes__", None):
        return exc  # noted once, where it happened: a cycle would add a note per level
    exc.add_note(f"raised by {plan.handler} handling event {key_name(message_key(event))}")
    if isinstance(exc, RecursionError) and not isinstance(exc, CascadeDepthExceeded):
        exc.add_note(
            "calls to dp.publish()/dp.execute() nested inside handlers went deeper than Python's "
            "recursion limit: handlers probably publish or execute each other in a cycle; break the "
            "cycle (follow-up events returned by handlers are bounded by max_cascade_depth instead)"
        )
    return exc
