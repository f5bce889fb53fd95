"""Retry policies: run a failing handler again, after a delay, inside the same handling.

A `Retry` is given per registration (`register(Key, retry=...)`), per router
(`dp.events.retry = ...`) or per dispatcher (`Dispatcher(retry=...)`); the
closest one wins. The engines apply it (see `pybus.tracking.retried`): a
handler that raises an exception the policy retries is called again, with the
same message and the same message id, `attempt` one higher, after
`delay_for(attempt)` seconds of `asyncio.sleep`. Only that handler runs again:
for an event, the handlers that succeeded are not repeated.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from pybus.errors import ImproperlyConfigured

#: What the engines await between attempts (tests replace it to record delays).
sleep = asyncio.sleep


def _exception_types(
    name: str, given: type[BaseException] | Iterable[type[BaseException]]
) -> tuple[type[Exception], ...]:
    types = (given,) if isinstance(given, type) else tuple(given)
    for item in types:
        if not isinstance(item, type) or not issubclass(item, BaseException):
            raise ImproperlyConfigured(f"Retry({name}=...) takes exception classes, not {item!r}")
        if not issubclass(item, Exception):
            raise ImproperlyConfigured(
                f"Retry({name}=...) cannot name {item.__name__}: only Exception subclasses are retried; "
                "a cancellation (asyncio.CancelledError), KeyboardInterrupt and SystemExit always end "
                "the handling at once"
            )
    return types  # type: ignore[return-value]


@dataclass(frozen=True, slots=True, init=False, repr=False, eq=False)
class Retry:
    """Call a failing handler again, up to `attempts` calls in all.

    The delay before attempt `n + 1` is `delay * multiplier ** (n - 1)`, at most
    `max_delay`, then lengthened by a random share of itself up to `jitter`
    (0.2: up to 20% longer; jitter never shortens a delay). An exception is
    retried when it is an instance of one of `on` and of none of `never`;
    cancellations never are, nor is a `RecursionError` (handlers that publish or
    execute each other in a cycle: retrying each level would multiply the calls).

    Timeouts: a registration's `timeout` bounds each attempt, and its
    `TimeoutError` is a failure like any other (retried unless `never` names
    `TimeoutError`). A `timeout=` given to `execute`/`query`/`publish` bounds
    the whole call, retries and delays included: when it expires the handling is
    cancelled, and a cancellation is not retried.
    """

    # A frozen dataclass (`dataclasses.replace`, `fields` and `asdict` work on a policy),
    # whose __init__, __repr__, __eq__ and __hash__ are written out below: `@dataclass`
    # compiles each method it makes, a cost every `import pybus` paid (docs/benchmarks.md).
    # They do what the generated ones did (tests/test_import_cost.py compares them).

    attempts: int = 3
    delay: float = 0.1
    multiplier: float = 2.0
    max_delay: float = 30.0
    jitter: float = 0.0
    on: tuple[type[Exception], ...] = (Exception,)
    never: tuple[type[Exception], ...] = ()

    def __init__(
        self,
        attempts: int = 3,
        delay: float = 0.1,
        multiplier: float = 2.0,
        max_delay: float = 30.0,
        jitter: float = 0.0,
        on: tuple[type[Exception], ...] = (Exception,),
        never: tuple[type[Exception], ...] = (),
    ) -> None:
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ImproperlyConfigured(
                f"Retry(attempts={attempts!r}): attempts counts every call, the first included: "
                "a whole number >= 1 (1: never retry)"
            )
        for name, value, minimum in (
            ("delay", delay, 0.0),
            ("multiplier", multiplier, 1.0),
            ("max_delay", max_delay, 0.0),
            ("jitter", jitter, 0.0),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= minimum:
                raise ImproperlyConfigured(f"Retry({name}={value!r}): a number >= {minimum:g}")
        set_field = object.__setattr__  # the frozen class's own __setattr__ refuses
        set_field(self, "attempts", attempts)
        set_field(self, "delay", delay)
        set_field(self, "multiplier", multiplier)
        set_field(self, "max_delay", max_delay)
        set_field(self, "jitter", jitter)
        set_field(self, "on", _exception_types("on", on))
        set_field(self, "never", _exception_types("never", never))

    def _fields(self) -> tuple[object, ...]:
        return (self.attempts, self.delay, self.multiplier, self.max_delay, self.jitter, self.on, self.never)

    def __repr__(self) -> str:
        return (
            f"{type(self).__qualname__}(attempts={self.attempts!r}, delay={self.delay!r}, "
            f"multiplier={self.multiplier!r}, max_delay={self.max_delay!r}, jitter={self.jitter!r}, "
            f"on={self.on!r}, never={self.never!r})"
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Retry) and other.__class__ is self.__class__:
            return self._fields() == other._fields()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._fields())

    def delay_for(self, attempt: int) -> float:
        """Seconds to wait after failed attempt `attempt` (from 1), before the next; no sleeping."""
        try:
            grown = self.delay * self.multiplier ** (attempt - 1)
        except OverflowError:  # past any max_delay long before
            grown = self.max_delay
        base = min(grown, self.max_delay)
        if self.jitter:
            import random  # only policies with jitter need it: not loaded by `import pybus`

            base += base * self.jitter * random.random()
        return base

    def retries(self, error: BaseException, attempt: int) -> bool:
        """True when failed attempt `attempt` (from 1) with `error` is to be tried again."""
        return (
            attempt < self.attempts
            and isinstance(error, self.on)
            and not isinstance(error, self.never)
            and not isinstance(error, RecursionError)
        )

    def __str__(self) -> str:
        text = f"Retry(attempts={self.attempts}, delay={self.delay:g}"
        if self.multiplier != 1:
            text += f", multiplier={self.multiplier:g}, max_delay={self.max_delay:g}"
        if self.jitter:
            text += f", jitter={self.jitter:g}"
        if self.on != (Exception,):
            text += f", on=({', '.join(t.__name__ for t in self.on)})"
        if self.never:
            text += f", never=({', '.join(t.__name__ for t in self.never)})"
        return text + ")"


def checked_retry(value: object, where: str) -> Retry | None:
    """`value` if it is a `Retry` or None; else `ImproperlyConfigured` naming `where`."""
    if value is None or isinstance(value, Retry):
        return value
    raise ImproperlyConfigured(
        f"retry= for {where} takes a pybus.Retry policy (e.g. Retry(attempts=3, delay=0.1)) or None, "
        f"not {value!r}"
    )
