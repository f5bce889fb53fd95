"""examples/action_runner.py: actions by name from the command line and over HTTP
(a real uvicorn process), validated by pydantic, logged by LoggingMiddleware."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx

from tests.uvicorn_server import ROOT, uvicorn_server


def action_runner(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "examples.action_runner", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_run_an_action_from_the_command_line_logs_before_and_after() -> None:
    done = action_runner(
        "run", "create_invoice", "customer=acme", "amount=12.50", "--json", '{"currency": "USD"}'
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "id": 1, "customer": "acme", "amount": "12.50", "currency": "USD", "reminders": 0,
    }  # fmt: skip
    lines = done.stderr.splitlines()
    assert lines[0] == (
        "INFO actions: command CreateInvoice -> create_invoice: handling "
        "CreateInvoice(customer='acme', amount=Decimal('12.50'), currency='USD')"
    )
    assert lines[1].startswith("INFO actions: command CreateInvoice -> create_invoice: ok in ")
    assert len(lines) == 2


def test_bad_input_from_the_command_line_is_refused_with_the_reason() -> None:
    invalid = action_runner("run", "create_invoice", "customer=acme", "amount=-1")
    assert invalid.returncode == 2
    assert "1 validation error for CreateInvoice\namount\n  Input should be greater than 0" in invalid.stderr
    assert "handling" not in invalid.stderr  # nothing reached the dispatcher
    unknown = action_runner("run", "delete_everything")
    assert (unknown.returncode, unknown.stderr) == (
        2,
        "action_runner: there is no action 'delete_everything'; the actions are: "
        "cancel_invoice, create_invoice, send_reminder\n",
    )
    malformed = action_runner("run", "create_invoice", "customer")
    assert malformed.returncode == 2
    assert "'customer' is not name=value" in malformed.stderr


def test_a_refused_action_is_logged_with_its_error_and_exits_1() -> None:
    refused = action_runner("run", "send_reminder", "invoice_id=7")
    assert refused.returncode == 1
    failed = (
        "ERROR actions: command SendReminder -> send_reminder: failed (ActionRefused: there is no invoice 7)"
    )
    assert failed in refused.stderr
    assert "Traceback" in refused.stderr
    assert refused.stderr.endswith("action_runner: refused: there is no invoice 7\n")


def test_list_shows_each_action_with_its_argument_schema() -> None:
    listed = action_runner("list")
    assert listed.returncode == 0, listed.stderr
    actions = json.loads(listed.stdout)
    assert sorted(actions) == ["cancel_invoice", "create_invoice", "send_reminder"]
    assert actions["send_reminder"]["description"] == "Remind the customer of an invoice."
    assert actions["send_reminder"]["arguments"]["required"] == ["invoice_id"]


def test_actions_over_http() -> None:
    with (
        uvicorn_server("examples.action_runner:app") as (url, output),
        httpx.Client(base_url=url, timeout=5) as client,
    ):
        assert sorted(client.get("/actions").json()) == ["cancel_invoice", "create_invoice", "send_reminder"]
        created = client.post("/actions/create_invoice", json={"customer": "acme", "amount": "99.90"})
        assert created.status_code == 200
        invoice = created.json()["result"]
        assert invoice == {"id": 1, "customer": "acme", "amount": "99.90", "currency": "EUR", "reminders": 0}
        reminded = client.post("/actions/send_reminder", json={"invoice_id": 1, "channel": "sms"})
        assert reminded.json() == {"result": "reminded acme of invoice 1 by sms"}

        refused = client.post("/actions/cancel_invoice", json={"invoice_id": 1})
        assert (refused.status_code, refused.json()) == (
            409,
            {"detail": "invoice 1 has had reminders; issue a credit note instead"},
        )
        unknown = client.post("/actions/nope", json={})
        assert unknown.status_code == 404
        assert unknown.json()["detail"].startswith("there is no action 'nope'")
        invalid = client.post("/actions/create_invoice", json={"customer": "acme", "amount": "1", "extra": 1})
        assert invalid.status_code == 422
        assert [(e["loc"], e["type"]) for e in invalid.json()["detail"]] == [(["extra"], "extra_forbidden")]
    stderr = output[0]
    asked = "SendReminder(invoice_id=1, channel='sms')"
    assert f"INFO actions: command SendReminder -> send_reminder: handling {asked}" in stderr
    assert "INFO actions: command SendReminder -> send_reminder: ok in " in stderr
    assert "ERROR actions: command CancelInvoice -> cancel_invoice: failed (ActionRefused: " in stderr
