"""A helper for tests of handlers that cancel themselves."""

from __future__ import annotations

import asyncio


def cancel_own_task() -> None:
    """Ask for the cancellation of the running task (it arrives at its next await)."""
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
