"""Tracked handler calls: the handling context around a call, and its retries.

While the dispatcher tracks handlings, every handler call runs with its record
(`pybus.context`) set, and a failure carries the record of the handling it
escaped from, so that the error hook runs in it. The engines' fast paths write
the successful case out by hand and come here once a handler fails; their
general paths call `call_tracked`.
"""

from __future__ import annotations

from collections.abc import Coroutine
from inspect import isawaitable
from typing import TYPE_CHECKING, Any, Protocol

import pybus.retry as _retry
from pybus.context import Ids, Record, _current, remember_failure
from pybus.errors import Kind

if TYPE_CHECKING:
    from pybus.handlers import CallPlan


class Instrumentation(Protocol):
    """Told when each message's handling starts and ends (OpenTelemetry's message spans).

    `started` runs in the context of the code that handles the message, before its
    first handler; `finished` when its handlers are done (for a top-level call, its
    follow-ups too), with the exception that ends it, if any. Neither may raise.
    """

    def started(self, kind: Kind, message: object, ids: Ids) -> object:
        """Return a token that `finished` receives."""
        ...

    def finished(self, token: object, error: BaseException | None) -> None: ...


async def instrumented(
    instrument: Instrumentation, kind: Kind, message: object, ids: Ids, work: Coroutine[Any, Any, Any]
) -> Any:
    """Await `work`, the handling of `message`, between `instrument`'s two calls."""
    try:
        token = instrument.started(kind, message, ids)
    except BaseException:
        work.close()  # never started: closed, so that it is not reported as never awaited
        raise
    try:
        result = await work
    except BaseException as exc:
        instrument.finished(token, exc)
        raise
    instrument.finished(token, None)
    return result


async def call(plan: CallPlan, message: object, followups: list[Any]) -> Any:
    """Run one handler and return its result; collected events go to `followups`."""
    if plan.collect is not None:
        return await plan.collect(message, followups)
    result = plan.invoke(message)
    if plan.is_async or isawaitable(result):
        result = await result
    return result


async def call_tracked(plan: CallPlan, message: object, followups: list[Any], ids: Ids) -> Any:
    """`call` inside the handling context of `message` (with ids `ids`), retried by
    the plan's policy."""
    record: Record = (plan.handler, 1, ids)
    token = _current.set(record)
    try:
        result = await call(plan, message, followups)
    except Exception as exc:
        _current.reset(token)
        if plan.retry is None:
            remember_failure(exc, record)
            raise
        return await retried(plan, message, followups, record, exc)
    except BaseException as exc:
        _current.reset(token)
        remember_failure(exc, record)
        raise
    _current.reset(token)
    return result


async def retried(
    plan: CallPlan, message: object, followups: list[Any], record: Record, error: Exception
) -> Any:
    """After attempt `record` failed with `error`: try again while the plan's policy
    says so, and return the first result; else raise the last failure, noted.

    Each attempt runs with its own record (`attempt` one higher, same ids).
    """
    policy = plan.retry
    handler, attempt, ids = record
    earlier: list[Exception] = []
    while policy is not None and policy.retries(error, attempt):
        try:
            await _retry.sleep(policy.delay_for(attempt))
        except BaseException as exc:  # cancelled while waiting: the failure must not vanish
            exc.add_note(
                f"{handler} was waiting to retry after attempt {attempt} failed with "
                f"{type(error).__name__}: {error}"
            )
            raise
        earlier.append(error)
        attempt += 1
        record = (handler, attempt, ids)
        token = _current.set(record)
        try:
            result = await call(plan, message, followups)
        except Exception as exc:
            error = exc
        except BaseException as exc:
            remember_failure(exc, record)
            raise
        else:
            return result
        finally:
            _current.reset(token)
    if earlier:
        error.add_note(
            f"{handler} failed {attempt} attempts ({policy}); earlier attempts raised "
            + "; ".join(f"{type(exc).__name__}: {exc}" for exc in earlier)
        )
    remember_failure(error, record)
    raise error
