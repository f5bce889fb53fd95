"""Helpers for tests that run a consumer in the background."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from pybus import Dispatcher
from pybus.consumer import Consumer


@asynccontextmanager
async def consuming(dp: Dispatcher, *, wait: float = 0.01, **options: int) -> AsyncIterator[Consumer]:
    """Start `dp`, run its consumer in the background; stop both (and close the transport) at the end."""
    async with dp:
        consumer = dp.consumer(wait=wait, **options)
        reading = asyncio.create_task(consumer.run())
        try:
            yield consumer
        finally:
            await consumer.stop(5)
            await reading
            assert dp.transport is not None
            await dp.transport.aclose()


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for an effect of a consumer running in another task (bounded)."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - the effect has no event to wait on
            await asyncio.sleep(0.005)
