"""examples/fastapi_app.py, served by a real uvicorn process and driven over HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.uvicorn_server import uvicorn_server


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with uvicorn_server("examples.fastapi_app:app") as (url, _):
        yield url


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
