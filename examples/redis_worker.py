"""A producer and a worker process over Redis Streams.

Start a worker (as many as you like; each needs its own PYBUS_CONSUMER name):

    REDIS_URL=redis://localhost:6379/0 uv run pybus worker examples.redis_worker:create_worker

then produce jobs:

    REDIS_URL=redis://localhost:6379/0 uv run python examples/redis_worker.py 1000

Each job records its effect in the Redis hash `effects` (job number -> times
handled), so you can see that every job took effect once. A job with negative
`seconds` fails (see it with `pybus dlq examples.redis_worker:create_worker list`).
PYBUS_JOB_DELAY makes every job of that worker take that many seconds more, to try
out a worker that dies with work in hand. Needs pybus-cqrs[redis].
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from pybus import Dispatcher, Event, Singleton
from pybus.redis_streams import RedisTransport


@dataclass(frozen=True)
class Job(Event):
    n: int
    seconds: float = 0.0


#: The name jobs travel under. Without it the name would be `module.QualifiedName`,
#: which is `__main__.Job` when this file runs as a script and
#: `examples.redis_worker.Job` in the worker that imports it: they would never meet.
ROUTE = "examples.jobs"


def redis_url() -> str:
    return os.environ.get("REDIS_URL", "redis://localhost:6379/0")


async def effects_client() -> AsyncIterator[Any]:
    """The worker's own connection for recording effects, closed when the worker stops."""
    client = aioredis.Redis.from_url(redis_url())
    yield client
    await client.aclose()


def create_worker() -> Dispatcher:
    transport = RedisTransport(
        redis_url(),
        group="jobs",
        consumer=os.environ.get("PYBUS_CONSUMER"),
        claim_idle=float(os.environ.get("PYBUS_CLAIM_IDLE", "30")),
        claim_interval=float(os.environ.get("PYBUS_CLAIM_INTERVAL", "1")),
    )
    dp = Dispatcher(transport=transport)
    dp.route(Job, name=ROUTE)

    delay = float(os.environ.get("PYBUS_JOB_DELAY", "0"))

    @dp.events.register(Job, effects=Singleton(effects_client))
    async def do_job(job: Job, effects: Any) -> None:
        if job.seconds < 0:
            raise ValueError(f"job {job.n} cannot take {job.seconds} seconds")
        if job.seconds + delay:
            await asyncio.sleep(job.seconds + delay)
        await effects.hincrby("effects", str(job.n), 1)

    return dp


async def produce(count: int, seconds: float = 0.0) -> None:
    dp = Dispatcher(transport=RedisTransport(redis_url(), group="producer"))
    dp.route(Job, name=ROUTE)
    async with dp:
        for n in range(count):
            await dp.publish(Job(n, seconds))
    assert dp.transport is not None
    await dp.transport.aclose()
    print(f"sent {count} jobs")


if __name__ == "__main__":
    asyncio.run(produce(int(sys.argv[1]) if len(sys.argv) > 1 else 100))
