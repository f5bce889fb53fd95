"""Real redis-server processes for the tests that need a broker.

Each server runs on a free port with persistence off, in a temporary folder,
and is killed at the end. Without the binary the tests are skipped with the
reason, except under CI (CI=true), where .ci/run installs it and a missing
binary is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def require_redis_server() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail(
                "redis-server is not installed, and CI requires the Redis tests (.ci/run installs it)"
            )
        pytest.skip("redis-server is not installed: apt-get install redis-server to run the Redis tests")
    return binary


@contextmanager
def redis_server(*extra: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start a redis-server; yield its URL and process."""
    binary = require_redis_server()
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", folder, *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                        conn.sendall(b"PING\r\n")
                        if conn.recv(16).startswith(b"+PONG"):
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0", process
        finally:
            process.kill()
            process.wait()
