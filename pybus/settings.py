"""The dispatcher's settings, frozen at `start()` and handed to the routers and engines."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pybus.middleware import Middleware
    from pybus.retry import Retry
    from pybus.tracking import Instrumentation


@dataclass(frozen=True, slots=True)
class Settings:
    """What `Dispatcher(...)` was given, as it was when the dispatcher started.

    `middleware` is the dispatcher-wide middleware, outermost first; `retry` the
    dispatcher-wide retry policy; `tracked` says whether handlings run inside their
    handling context (see `pybus.context`), decided by `start()`.
    """

    concurrent_events: bool = False
    max_cascade_depth: int = 64
    handler_factory: Callable[..., Any] | None = None
    queue_size: int = 10_000
    workers: int = 4
    default_timeout: float | None = None
    middleware: tuple[Middleware, ...] = ()
    retry: Retry | None = None
    tracked: bool = False
    instrument: Instrumentation | None = None
