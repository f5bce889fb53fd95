"""Invariants of the Redis transport over a real redis-server while `pybus worker` processes
are killed with SIGKILL at random moments and restarted, under the same name or a new one.

The moments come from a seeded RNG; the seed is printed and named in every failure, and
PYBUS_KILL_SEED=<seed> replays a run's choices (the timing of the processes varies).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

import redis

from tests.test_redis_workers import effects, produce_with, start_worker, stop, wait_for

JOBS, CONCURRENCY, ACK_BATCH, KILLS = 2_000, 8, 16, 5
KEY = "pybus:examples.jobs"


def pending(url: str) -> int:
    client: Any = redis.Redis.from_url(url)
    try:
        return int(client.xpending(KEY, "jobs")["pending"])
    finally:
        client.close()


def dead_letters(url: str) -> int:
    client: Any = redis.Redis.from_url(url)
    try:
        return int(client.xlen("pybus:dead"))
    finally:
        client.close()


def test_workers_killed_at_random_moments_lose_nothing_and_fail_nothing(redis_url: str) -> None:
    seed = int(os.environ.get("PYBUS_KILL_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    print(f"PYBUS_KILL_SEED={seed}")
    url = redis_url
    asyncio.run(produce_with(url, JOBS, seconds=0.05))  # about 6 s of work for two workers
    options: dict[str, Any] = {"concurrency": CONCURRENCY, "claim_idle": 1.0, "claim_interval": 0.1}
    names = [f"w{n}" for n in range(2 + KILLS)]
    used = 2
    workers = {slot: (names[slot], start_worker(url, names[slot], **options)) for slot in (0, 1)}
    history: list[str] = []
    started = time.monotonic()
    try:
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.3, 1.5))  # a random moment: starting, reading, claiming, handling
            if len(effects(url)) == JOBS:
                break
            slot = rng.randrange(2)
            name, process = workers[slot]
            process.kill()
            process.communicate(timeout=10)
            if rng.random() < 0.5:
                name, used = names[used], used + 1  # a new consumer: the others claim what it held
            moment = f"{time.monotonic() - started:.2f}s, {len(effects(url))} done"
            history.append(f"{moment}: killed slot {slot}, restarted as {name}")
            workers[slot] = (name, start_worker(url, name, **options))
        about = f"seed {seed}; {history}"
        wait_for(lambda: len(effects(url)) == JOBS, 60, f"every job to take effect ({about})")
        wait_for(lambda: pending(url) == 0, 30, f"nothing to be left pending ({about})")
        counts = effects(url)
        duplicates = sum(count - 1 for count in counts.values())
        took = time.monotonic() - started
        print(f"{len(history)} kills, {duplicates} duplicate effects, {took:.1f} s: {history}")
        assert sorted(counts) == list(range(JOBS)), about  # none lost
        assert dead_letters(url) == 0, about  # none failed
        # Each kill can repeat what the killed worker had handled and not yet acked.
        assert duplicates <= len(history) * (CONCURRENCY + ACK_BATCH), (duplicates, about)
    finally:
        for _, process in workers.values():
            stop(process)
