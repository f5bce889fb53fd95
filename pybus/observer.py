"""Observer: what the engines report while one is attached (for test tools).

`dp.attach_observer(observer)` makes every engine report each handling to
`observer`; `dp.detach_observer()` stops it. While attached, the engines take
their general paths (the fast paths have no hooks), so observing costs nothing
when nobody observes. `pybus.testing.track` is built on this.

Every method is called in the context of the handling it reports (so a
`ContextVar` set by whoever started the work is visible), must not raise, and
does nothing here.
"""

from __future__ import annotations

from typing import Any

from pybus.errors import Kind
from pybus.handlers import Handler


class Observer:
    """Base class: override the reports you need."""

    def started(self, kind: Kind, message: object) -> None:
        """A top-level handling (execute, query, publish, or one taken by a worker) began."""

    def finished(self, kind: Kind, message: object) -> None:
        """That handling ended, follow-ups included, whatever the outcome."""

    def handled(self, kind: Kind, message: object, handler: Handler, result: Any) -> None:
        """One handler returned `result` for `message`."""

    def failed(self, kind: Kind, message: object, handler: Handler, error: BaseException) -> None:
        """One handler raised `error` for `message`."""

    def no_handler(self, message: object) -> None:
        """An event (published or a follow-up) had no handler."""

    def queued(self, kind: Kind, message: object) -> None:
        """`send` queued `message` (reported in the sender's context)."""

    def dequeued(self, kind: Kind, message: object) -> None:
        """A worker is done with a queued `message` (reported in the message's context)."""
