"""A real uvicorn process serving one of the example apps, for tests over HTTP."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def uvicorn_server(app: str) -> Iterator[tuple[str, list[str]]]:
    """Serve `app` ("module:attribute") on a free port; yield its URL and a list
    that receives the server's stderr once it has shut down (on SIGTERM)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", app, "--port", str(port), "--log-level", "info"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(f"{url}/docs", timeout=1)
            break
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"uvicorn did not start: {process.communicate()}") from None
            time.sleep(0.05)
    output: list[str] = []
    try:
        yield url, output
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
        output.append(stderr)
    # uvicorn shuts down gracefully (the lifespan stops the dispatcher), then re-raises the signal.
    assert "Application shutdown complete." in stderr, stderr
    assert process.returncode in (0, -signal.SIGTERM), stderr
