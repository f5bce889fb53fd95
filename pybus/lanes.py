"""Lanes: the long-lived tasks where background handlings run, one after another.

A worker pool (`pybus.workers`) and a transport consumer (`pybus.consumer`) each
run a fixed set of lane tasks. A handling runs from its first step to its last
inside the one lane that took it, in a `contextvars` context of its own. Two
ways of stepping it, with the same outcome (`tests/test_lanes.py` drives both,
through a worker pool and through a consumer):

- `start_in(context, coroutine)` runs the handling's first step in `context`;
  most handlings finish there, without a second step or a task of their own;
  `InContext`, awaited by the same lane, runs the remaining steps in `context`,
  passing whatever the coroutine waits on up to the lane and the outcome back
  down, exactly as `await coroutine` does. A consumer steps each handling so.
- `handlings(handle, owner)` is one generator per lane that runs every handling
  of the lane in turn: `context.run(stepper.send, message)` runs the first step
  of `handle(message)` in `context`, and `rest_of(stepper, context, step)` the
  remaining ones. The handling's coroutine is awaited (`yield from`) inside a
  generator that lives as long as the lane, so a handling that returns raises no
  `StopIteration` through Python code and makes no frame of its own for the
  stepping: a worker pool, whose every send goes through this, steps handlings so.

This is the one place where pybus steps coroutines by hand. The standard way, a
task per message (`asyncio.create_task(coro, context=ctx)`), makes a background
send more than three times as slow on CPython 3.11: 0.2x of a bare asyncio.Queue,
against 0.75x (see docs/benchmarks.md). Since a handling never leaves its lane,
`asyncio.current_task()`, `asyncio.timeout()` and `cancel()` inside a handler act
on the task that runs it, as they would in a task of its own.

`LaneTask` tells two kinds of cancellation apart. `cancel()` called by the
running handling on its own task (`asyncio.current_task().cancel()`) belongs to
that handling: it fails with `CancelledError`, and the lane lives on. A
cancellation from anywhere else (the owner stopping, `asyncio.run` ending the
loop, another task) ends the lane.

`running_in` says which dispatcher's background handling the calling code is
part of. Lanes set it for every handling, and the tasks a handling starts
inherit it. A send from inside a handling is never made to wait for room (its
own pool could be what it waits for), and `stop()`/`join()` refuse to wait for
themselves.
"""

from __future__ import annotations

import asyncio
import contextvars
import types
from collections.abc import Callable, Coroutine, Generator, Iterable
from typing import Any, Final, NoReturn, cast

#: The owner of the background handling running in this context: a dispatcher's
#: supervisor (its worker pools), or a consumer (whose `supervisor` is the dispatcher's).
running_in: contextvars.ContextVar[object | None] = contextvars.ContextVar("pybus_running_in", default=None)


def start_in(context: contextvars.Context, coroutine: Coroutine[Any, Any, Any]) -> InContext | None:
    """Run the first step of `coroutine` inside `context`, in the calling task.

    Returns None when that step finished it, else an `InContext` that the same
    task must await to run the rest. An exception of the first step propagates.
    """
    try:
        step = context.run(coroutine.send, None)
    except StopIteration:
        return None
    return InContext(coroutine, context, step)


class InContext:
    """The rest of a coroutine started by `start_in`, each step run in its context.

    Only the task that called `start_in` may await it: every step then runs in
    that task, so the coroutine sees one task from its first step to its last.
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
            except GeneratorExit:  # pragma: no cover - a pending lane garbage-collected with its loop
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


class Failed:
    """What a `handlings` stepper hands back for a handling that raised: the exception."""

    __slots__ = ("error",)

    def __init__(self, error: Exception | asyncio.CancelledError) -> None:
        self.error = error


#: What a `handlings` stepper hands back for a handling that returned.
DONE: Final = object()

#: A lane's stepper (see `handlings`); what it yields: DONE, a `Failed`, or what the
#: handling waits on (a future, or None for a bare yield).
Stepper = Generator[Any, Any, NoReturn]


def _handlings(handle: Callable[[Any], Iterable[Any]], owner: object) -> Stepper:
    # `handle` returns a coroutine, which types.coroutine (below) lets it `yield from`.
    set_owner = running_in.set
    message = yield None  # primed by handlings(): waits for the first message
    while True:
        set_owner(owner)
        try:
            yield from handle(message)
        except (Exception, asyncio.CancelledError) as exc:
            outcome: object = Failed(exc)
        else:
            outcome = DONE
        message = yield outcome


Handle = Callable[[Any], Coroutine[Any, Any, Any]]

# types.coroutine lets a generator `yield from` a coroutine (PEP 492), which is how the
# stepper awaits each handling: the return of a handling then raises no StopIteration.
_stepping = cast(Callable[[Handle, object], Stepper], types.coroutine(_handlings))


def handlings(handle: Handle, owner: object) -> Stepper:
    """A stepper that runs `handle(message)` for every message a lane sends it, in turn.

    `context.run(stepper.send, message)` sets `running_in` to `owner` in `context`
    and runs the first step of `handle(message)` there, in the calling task. It
    returns `DONE` when the handling returned, a `Failed` when it raised an
    `Exception` or `CancelledError`, else what the handling waits on: the same task
    must then run the rest with `await rest_of(stepper, context, step)` before it
    sends the stepper another message. Any other exception (`KeyboardInterrupt`)
    propagates and ends the stepper.
    """
    stepper = _stepping(handle, owner)
    next(stepper)
    return stepper


@types.coroutine
def rest_of(stepper: Stepper, context: contextvars.Context, step: object) -> Generator[Any, Any, object]:
    """Run the remaining steps of the handling `stepper` is in, each in `context`;
    return its outcome (`DONE` or a `Failed`).

    What the handling waits on goes up to the awaiting task, and the result (or
    the exception, a cancellation included) back down to the handling, exactly
    as `await coroutine` does.
    """
    run = context.run
    while True:
        try:
            value = yield step
        except GeneratorExit:  # pragma: no cover - a pending lane garbage-collected with its loop
            stepper.close()
            raise
        except BaseException as exc:
            step = run(stepper.throw, exc)
        else:
            step = run(stepper.send, value)
        if step is DONE or step.__class__ is Failed:
            return step


class LaneTask(asyncio.Task[None]):
    """A lane: a task that knows whether a cancellation came from the handling it runs.

    `own_cancels` counts `cancel()` calls made by the task on itself (from code
    running in it) since the last `settle()`; `dirty` is set by every `cancel()`.
    """

    def __init__(
        self, coroutine: Coroutine[Any, Any, None], *, loop: asyncio.AbstractEventLoop, name: str
    ) -> None:
        self.own_cancels = 0
        self.dirty = False
        super().__init__(coroutine, loop=loop, name=name)

    def cancel(self, msg: Any | None = None) -> bool:
        self.dirty = True
        if asyncio.current_task(self.get_loop()) is self:
            self.own_cancels += 1
        return super().cancel(msg)

    def cancelled_from_outside(self) -> bool:
        """True when a cancellation not asked for by the running handling is pending."""
        return self.cancelling() > self.own_cancels

    async def settle(self) -> bool:
        """Between two handlings: let every cancellation asked for during the last one
        arrive, here where nothing runs, and forget it, so that none reaches the next one.

        Returns False when one that arrived came from outside: the caller records the
        last handling's outcome, then ends the lane. A count of cancellation requests
        with nothing left to arrive (CPython 3.11's TaskGroup leaves one on its parent
        task when a child fails while it exits) is forgotten too.
        """
        outside = False
        while True:
            self.dirty = False
            pending, own = self.cancelling(), self.own_cancels
            self.own_cancels = 0
            if not pending:
                return not outside
            try:
                await asyncio.sleep(0)  # a requested cancellation not yet delivered arrives here
            except asyncio.CancelledError:
                if pending > own:
                    outside = True
            for _ in range(self.cancelling()):
                self.uncancel()
            if not self.dirty:
                return not outside


def current_lane() -> LaneTask | None:
    """The lane running the calling code, or None outside of one."""
    task = asyncio.current_task()
    return task if isinstance(task, LaneTask) else None
