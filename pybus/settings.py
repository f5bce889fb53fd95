"""The dispatcher's settings, frozen at `start()` and handed to the routers and engines."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from pybus.middleware import Middleware
    from pybus.retry import Retry
    from pybus.tracking import Instrumentation


class Settings:
    """What `Dispatcher(...)` was given, as it was when the dispatcher started.

    `middleware` is the dispatcher-wide middleware, outermost first; `retry` the
    dispatcher-wide retry policy; `tracked` says whether handlings run inside their
    handling context (see `pybus.context`), decided by `start()`. Nothing changes a
    `Settings` once made (its attributes are `Final` to the type checkers).
    """

    # A plain class rather than a dataclass: `@dataclass` compiles each method it makes
    # at import, a cost every `import pybus` paid (docs/benchmarks.md).
    __slots__ = (
        "concurrent_events",
        "default_timeout",
        "handler_factory",
        "instrument",
        "max_cascade_depth",
        "middleware",
        "queue_size",
        "retry",
        "tracked",
        "workers",
    )

    concurrent_events: Final[bool]
    max_cascade_depth: Final[int]
    handler_factory: Final[Callable[..., Any] | None]
    queue_size: Final[int]
    workers: Final[int]
    default_timeout: Final[float | None]
    middleware: Final[tuple[Middleware, ...]]
    retry: Final[Retry | None]
    tracked: Final[bool]
    instrument: Final[Instrumentation | None]

    def __init__(
        self,
        *,
        concurrent_events: bool = False,
        max_cascade_depth: int = 64,
        handler_factory: Callable[..., Any] | None = None,
        queue_size: int = 10_000,
        workers: int = 4,
        default_timeout: float | None = None,
        middleware: tuple[Middleware, ...] = (),
        retry: Retry | None = None,
        tracked: bool = False,
        instrument: Instrumentation | None = None,
    ) -> None:
        self.concurrent_events = concurrent_events
        self.max_cascade_depth = max_cascade_depth
        self.handler_factory = handler_factory
        self.queue_size = queue_size
        self.workers = workers
        self.default_timeout = default_timeout
        self.middleware = middleware
        self.retry = retry
        self.tracked = tracked
        self.instrument = instrument
