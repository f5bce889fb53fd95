"""examples/fastapi_outbox.py: a FastAPI service (a real uvicorn process, over HTTP) writes
orders through a unit of work; the outbox relay sends the event to a real redis-server; a
`pybus worker` process ships the order through an idempotent unit of work."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.redis_server import redis_server
from tests.uvicorn_server import uvicorn_server

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).with_name("pybus")


def test_an_order_posted_over_http_is_shipped_by_the_worker_through_the_outbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = tmp_path / "orders.db"
    with redis_server() as (redis_url, _):
        monkeypatch.setenv("REDIS_URL", redis_url)
        monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{database}")
        with uvicorn_server("examples.fastapi_outbox:app") as (url, _):
            worker = subprocess.Popen(
                [str(SCRIPT), "worker", "examples.fastapi_outbox:create_worker", "--drain-timeout", "5"],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            try:
                with httpx.Client(base_url=url, timeout=5) as client:
                    ids = [client.post("/orders", json={"item": f"book {n}"}).json()["id"] for n in range(5)]
                    deadline = time.monotonic() + 20
                    while not all(client.get(f"/orders/{order}").json()["shipped"] for order in ids):
                        assert time.monotonic() < deadline, "the worker did not ship every order in time"
                        assert worker.poll() is None, "the worker died"
                        time.sleep(0.05)
                    assert client.get(f"/orders/{ids[0]}").json() == {
                        "id": ids[0],
                        "item": "book 0",
                        "shipped": True,
                    }
                    assert client.get("/orders/999").status_code == 404
            finally:
                worker.send_signal(signal.SIGTERM)
                _, errors = worker.communicate(timeout=20)
            assert worker.returncode == 0, errors
    with sqlite3.connect(database) as connection:
        unsent = connection.execute("select count(*) from pybus_outbox where sent_at is null").fetchone()
        inbox = connection.execute("select count(*) from pybus_inbox").fetchone()
    assert unsent == (0,)
    assert inbox == (5,)
