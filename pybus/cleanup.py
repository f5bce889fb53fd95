"""`CleanupTask`: a task for cleanup work, whose coroutine always runs.

asyncio delivers a `cancel()` made before a task's first step by throwing
`CancelledError` into its coroutine before the coroutine's first line: none of
it runs, its `try/finally` included. `asyncio.run` does exactly that to a task
created just before the loop ends. For a shutdown, which must stop consumers,
close the transport and tear Singletons down even when it is cancelled, that
would skip everything. A `CleanupTask` holds such a cancellation back until its
coroutine has begun, then delivers it at the coroutine's first `await`, inside
its `try`. (Python 3.12's `eager_start` would give the same guarantee; pybus
supports 3.11.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class CleanupTask(asyncio.Task[T]):
    """A task whose coroutine begins whatever happens; a cancellation asked for before
    that reaches it at its first `await`."""

    def __init__(
        self, coroutine: Coroutine[Any, Any, T], *, loop: asyncio.AbstractEventLoop, name: str
    ) -> None:
        self._begun = False
        self._held: tuple[Any] | None = None  # the message of a cancel() made before the first step
        super().__init__(self._begin(coroutine), loop=loop, name=name)

    async def _begin(self, coroutine: Coroutine[Any, Any, T]) -> T:
        self._begun = True
        if self._held is not None:
            super().cancel(*self._held)  # delivered at the coroutine's first await
        return await coroutine

    def cancel(self, msg: Any | None = None) -> bool:
        if not self._begun:
            self._held = (msg,)
            return True
        return super().cancel(msg)
