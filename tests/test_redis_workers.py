"""Fault tests with real processes: worker processes (`pybus worker`) and a real redis-server.

Each job of examples/redis_worker.py records its effect in the Redis hash
`effects` (job number -> times handled): "none lost" means every job has an
effect, "duplicates" counts the effects past the first.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from examples.redis_worker import produce
from tests.redis_server import free_port, redis_server

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).with_name("pybus")


@pytest.fixture
def server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with redis_server() as found:
        yield found


def start_worker(
    url: str,
    consumer: str,
    *,
    concurrency: int = 8,
    prefetch: int | None = None,
    drain: float = 5,
    claim_idle: float = 1,
    claim_interval: float = 0.25,
    job_delay: float = 0,
) -> Any:
    env = {
        **os.environ,
        "REDIS_URL": url,
        "PYBUS_CONSUMER": consumer,
        "PYBUS_CLAIM_IDLE": str(claim_idle),
        "PYBUS_CLAIM_INTERVAL": str(claim_interval),
        "PYBUS_JOB_DELAY": str(job_delay),
    }
    sizes = ["--concurrency", str(concurrency)] + ([] if prefetch is None else ["--prefetch", str(prefetch)])
    return subprocess.Popen(
        [str(SCRIPT), "worker", "examples.redis_worker:create_worker", *sizes, "--drain-timeout", str(drain)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def effects(url: str) -> dict[int, int]:
    client = redis.Redis.from_url(url)
    try:
        raw: dict[bytes, bytes] = client.hgetall("effects")  # type: ignore[assignment]
        return {int(key): int(value) for key, value in raw.items()}
    finally:
        client.close()


def pending_of(url: str, consumer: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        for entry in client.xinfo_consumers("pybus:examples.jobs", "jobs"):
            if entry["name"].decode() == consumer:
                return int(entry["pending"])
        return 0
    except redis.ResponseError as exc:
        if "NOGROUP" not in str(exc):
            raise
        return 0  # no group yet: no worker has started reading
    finally:
        client.close()


def wait_for(condition: Any, timeout: float, what: str) -> float:
    """Poll a condition of another process (bounded); return when it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic()


def stop(process: Any) -> None:
    if process.poll() is None:
        process.kill()
    process.communicate(timeout=10)


def test_g9_sigterm_drains_in_flight_work_and_exits_0(server: tuple[str, Any]) -> None:
    url, _ = server
    asyncio.run(produce_with(url, 400, seconds=0.01))
    first = start_worker(url, "first", concurrency=4, drain=5)
    second = None
    try:
        wait_for(lambda: len(effects(url)) >= 40, 20, "the first worker to make progress")
        sent = time.monotonic()
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=10)
        assert first.returncode == 0, stderr
        assert time.monotonic() - sent <= 5 + 1
        second = start_worker(url, "second", concurrency=4, claim_idle=0.5)
        wait_for(lambda: len(effects(url)) == 400, 30, "every job to take effect")
        time.sleep(0.3)
        counts = effects(url)
        assert sorted(counts) == list(range(400))  # none lost
        assert set(counts.values()) == {1}  # none handled twice
    finally:
        stop(first)
        if second is not None:
            stop(second)


def test_g1_a_killed_worker_loses_nothing(server: tuple[str, Any]) -> None:
    url, _ = server
    asyncio.run(produce_with(url, 10_000, seconds=0.001))
    concurrency, claim_idle, claim_interval = 8, 1.0, 0.25
    killed = start_worker(url, "killed", concurrency=concurrency, claim_idle=claim_idle)
    survivor = start_worker(url, "survivor", concurrency=concurrency, claim_idle=claim_idle)
    try:
        wait_for(lambda: len(effects(url)) >= 3_000, 60, "both workers to make progress")
        killed.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        killed.communicate(timeout=10)
        reclaimed_at = wait_for(lambda: pending_of(url, "killed") == 0, 30, "the killed worker's entries")
        assert reclaimed_at - killed_at <= claim_idle + claim_interval + 1
        wait_for(lambda: len(effects(url)) == 10_000, 120, "every job to take effect")
        time.sleep(0.5)
        counts = effects(url)
        assert sorted(counts) == list(range(10_000))  # none lost
        duplicates = sum(count - 1 for count in counts.values())
        # Handled again: its handlings in flight, and those whose ack was not yet sent (the
        # acks of about one round trip).
        assert duplicates <= concurrency + 16
    finally:
        stop(killed)
        stop(survivor)


def test_a_worker_reading_one_at_a_time_reclaims_all_of_a_killed_workers_entries_within_the_bound(
    server: tuple[str, Any],
) -> None:
    url, _ = server
    asyncio.run(produce_with(url, 200, seconds=0))
    claim_idle, claim_interval = 1.0, 0.25
    # A slow worker: it holds 64 jobs (32 in flight, 32 read ahead) and finishes none of them.
    killed = start_worker(url, "killed", concurrency=32, prefetch=32, claim_idle=claim_idle, job_delay=60)
    survivor = None
    try:
        wait_for(lambda: pending_of(url, "killed") == 64, 30, "the slow worker to hold 64 jobs")
        survivor = start_worker(url, "survivor", concurrency=1, prefetch=1, claim_idle=claim_idle)
        wait_for(lambda: len(effects(url)) >= 20, 30, "the survivor to make progress")
        killed.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        killed.communicate(timeout=10)
        reclaimed_at = wait_for(lambda: pending_of(url, "killed") == 0, 30, "the killed worker's entries")
        took = reclaimed_at - killed_at
        print(f"64 entries reclaimed {took:.2f} s after the kill")
        assert took <= claim_idle + claim_interval + 1, took  # the documented bound
        wait_for(lambda: len(effects(url)) == 200, 60, "every job to take effect")
        assert effects(url) == dict.fromkeys(range(200), 1)  # the killed worker had finished none
    finally:
        stop(killed)
        if survivor is not None:
            stop(survivor)


def test_g5_a_stalled_redis_loses_nothing_and_work_resumes(server: tuple[str, Any]) -> None:
    url, redis_process = server
    asyncio.run(produce_with(url, 3_000, seconds=0.002))
    worker = start_worker(url, "steady", concurrency=8, claim_idle=30)
    try:
        wait_for(lambda: len(effects(url)) >= 300, 30, "the worker to make progress")
        redis_process.send_signal(signal.SIGSTOP)
        time.sleep(5)
        redis_process.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        before = len(effects(url))
        wait_for(lambda: len(effects(url)) > before + 50, 5, "work to resume")
        assert time.monotonic() - resumed <= 1.0 + 0.5
        wait_for(lambda: len(effects(url)) == 3_000, 60, "every job to take effect")
        assert sorted(effects(url)) == list(range(3_000))  # none lost
        assert worker.poll() is None  # the stall did not kill the worker
    finally:
        redis_process.send_signal(signal.SIGCONT)
        stop(worker)


async def produce_with(url: str, count: int, seconds: float) -> None:
    os.environ["REDIS_URL"] = url
    try:
        await produce(count, seconds)
    finally:
        del os.environ["REDIS_URL"]


def test_dlq_command_lists_requeues_and_purges(server: tuple[str, Any]) -> None:
    url, _ = server
    client: Any = redis.Redis.from_url(url)
    header = b'["event", "examples.jobs", "m1", "m1", null]'
    fields = {"h": header, "b": b"{broken"}  # a pybus entry whose body does not decode
    client.xadd("pybus:examples.jobs", fields)
    client.close()
    env = {**os.environ, "REDIS_URL": url}

    def pybus_dlq(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SCRIPT), "dlq", "examples.redis_worker:create_worker", *args],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    worker = start_worker(url, "dlq", concurrency=2)
    try:
        wait_for(lambda: "m1" in pybus_dlq("list").stdout, 20, "the undecodable entry to be dead-lettered")
    finally:
        stop(worker)
    listed = pybus_dlq("list")
    assert listed.returncode == 0, listed.stderr
    (line,) = listed.stdout.splitlines()
    dead_id = line.split()[0]
    assert "examples.jobs  attempts=1  id=m1  Cannot decode a message named" in line
    requeued = pybus_dlq("requeue", dead_id)
    assert requeued.returncode == 0, requeued.stderr
    assert requeued.stdout.startswith(f"{dead_id} -> ")
    assert pybus_dlq("list").stdout == ""
    assert pybus_dlq("purge").stdout == "purged 0 dead letter(s)\n"
    missing = pybus_dlq("requeue", "1-1")
    assert missing.returncode == 2
    assert "No dead letter '1-1'" in missing.stderr
    env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    for action in ("list", "purge"):
        unreachable = pybus_dlq(action)
        assert unreachable.returncode == 2, unreachable.stderr
        assert "dead letters in pybus:dead" in unreachable.stderr
        assert "Traceback" not in unreachable.stderr


def test_the_example_producer_run_as_a_script_writes_where_the_worker_reads(
    server: tuple[str, Any],
) -> None:
    """Run as a script, the producer's Job lives in __main__: without the route's explicit
    name its jobs would go to pybus:__main__.Job, which the worker never reads."""
    url, _ = server
    result = subprocess.run(
        [sys.executable, "examples/redis_worker.py", "3"],
        cwd=ROOT, env={**os.environ, "REDIS_URL": url}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    client = redis.Redis.from_url(url)
    try:
        assert client.xlen("pybus:examples.jobs") == 3
        assert client.exists("pybus:__main__.Job") == 0
    finally:
        client.close()
