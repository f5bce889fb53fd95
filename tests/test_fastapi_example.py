"""examples/fastapi_app.py, served by a real uvicorn process and driven over HTTP."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "examples.fastapi_app:app",
            "--port",
            str(port),
            "--log-level",
            "info",
        ],
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
    yield url
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=20)
    # uvicorn shuts down gracefully (the lifespan stops the dispatcher), then re-raises the signal.
    assert "Application shutdown complete." in stderr, stderr
    assert process.returncode in (0, -signal.SIGTERM), stderr


def test_register_and_read_a_user(server: str) -> None:
    with httpx.Client(base_url=server, timeout=5) as client:
        created = client.post("/users", json={"name": "Ada", "email": "ada@example.com"})
        assert created.status_code == 201
        user_id = created.json()["id"]
        read = client.get(f"/users/{user_id}")
        assert read.status_code == 200
        assert read.json() == {"id": user_id, "name": "Ada", "email": "ada@example.com"}
        # the follow-up event's handler ran before POST returned
        assert client.get(f"/users/{user_id}/mails").json() == ["Welcome, Ada!"]


def test_domain_and_input_errors_map_to_status_codes(server: str) -> None:
    with httpx.Client(base_url=server, timeout=5) as client:
        client.post("/users", json={"name": "Bob", "email": "bob@example.com"})
        taken = client.post("/users", json={"name": "Bobby", "email": "bob@example.com"})
        assert (taken.status_code, taken.json()) == (409, {"detail": "bob@example.com is already registered"})
        missing = client.get("/users/999")
        assert (missing.status_code, missing.json()) == (404, {"detail": "no user 999"})
        invalid = client.post("/users", json={"name": "Eve", "email": "not-an-email"})
        assert (invalid.status_code, invalid.json()) == (
            400,
            {"detail": "'not-an-email' is not an email address"},
        )
        malformed = client.post("/users", json={"name": "Eve"})
        assert malformed.status_code == 400
        assert malformed.json()["detail"].startswith("the request does not fit")
        assert client.get("/users/999/mails").status_code == 404
