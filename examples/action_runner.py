"""An action runner: actions invoked by name with a dict of arguments, over HTTP
and from the command line, validated by pydantic, logged by middleware.

Each action is a pydantic model that is also a pybus command; its handler is a
plain command handler. `ActionRunner.run(name, arguments)` finds the model by
name, validates the arguments into a message and executes it; the dispatcher's
`LoggingMiddleware` writes one record before each handling (the action and its
validated arguments) and one after (outcome and duration).

Command line (run from the repository root)::

    uv run python -m examples.action_runner list
    uv run python -m examples.action_runner run create_invoice customer=acme amount=12.50
    uv run python -m examples.action_runner run send_reminder --json '{"invoice_id": 1}'
    uv run python -m examples.action_runner serve --port 8000

HTTP (`serve`, or `uv run uvicorn examples.action_runner:app`)::

    GET  /actions          -> the actions and the JSON schema of their arguments
    POST /actions/{name}   -> 200 {"result": ...}; 404 for an unknown action;
                              422 for arguments that do not validate; 409 for a
                              refused action (a domain error)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pybus import Command, Dispatcher, Singleton
from pybus.middleware import LoggingMiddleware

logger = logging.getLogger("actions")

# -- actions: pydantic models that are pybus commands ------------------------------------


class Action(BaseModel):
    """The arguments of an action; unknown arguments are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Invoice(BaseModel):
    id: int
    customer: str
    amount: Decimal
    currency: str
    reminders: int = 0


class CreateInvoice(Action, Command[Invoice]):
    """Create an invoice for a customer."""

    customer: str = Field(min_length=1)
    amount: Decimal = Field(gt=0, decimal_places=2)
    currency: Literal["EUR", "USD"] = "EUR"


class SendReminder(Action, Command[str]):
    """Remind the customer of an invoice."""

    invoice_id: int
    channel: Literal["email", "sms"] = "email"


class CancelInvoice(Action, Command[Invoice]):
    """Cancel an invoice no reminder was sent for."""

    invoice_id: int


class ActionRefused(Exception):
    """The action is valid but the current state does not allow it."""


class Ledger:
    """A stand-in for a real store."""

    def __init__(self) -> None:
        self.invoices: dict[int, Invoice] = {}

    def get(self, invoice_id: int) -> Invoice:
        try:
            return self.invoices[invoice_id]
        except KeyError:
            raise ActionRefused(f"there is no invoice {invoice_id}") from None


# --8<-- [start:dispatcher]
def create_dispatcher() -> Dispatcher:
    dp = Dispatcher(middleware=[LoggingMiddleware(logger=logger)])
    ledger = Singleton(Ledger)

    @dp.commands.register(CreateInvoice, ledger=ledger)
    async def create_invoice(action: CreateInvoice, ledger: Ledger) -> Invoice:
        invoice = Invoice(
            id=len(ledger.invoices) + 1,
            customer=action.customer,
            amount=action.amount,
            currency=action.currency,
        )
        ledger.invoices[invoice.id] = invoice
        return invoice

    @dp.commands.register(SendReminder, ledger=ledger)
    async def send_reminder(action: SendReminder, ledger: Ledger) -> str:
        invoice = ledger.get(action.invoice_id)
        ledger.invoices[invoice.id] = invoice.model_copy(update={"reminders": invoice.reminders + 1})
        return f"reminded {invoice.customer} of invoice {invoice.id} by {action.channel}"

    @dp.commands.register(CancelInvoice, ledger=ledger)
    async def cancel_invoice(action: CancelInvoice, ledger: Ledger) -> Invoice:
        invoice = ledger.get(action.invoice_id)
        if invoice.reminders:
            raise ActionRefused(f"invoice {invoice.id} has had reminders; issue a credit note instead")
        return ledger.invoices.pop(invoice.id)

    return dp


# --8<-- [end:dispatcher]


# -- the runner -------------------------------------------------------------------------


class UnknownAction(LookupError):
    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(f"there is no action {name!r}; the actions are: {', '.join(known)}")


def action_name(cls: type) -> str:
    """CreateInvoice -> create_invoice."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()


# --8<-- [start:runner]
class ActionRunner:
    """Runs the actions registered on a dispatcher by name."""

    def __init__(self, dp: Dispatcher) -> None:
        self.dp = dp
        self.actions: dict[str, type[Action]] = {
            action_name(key): key
            for key in dp.commands.handlers
            if isinstance(key, type) and issubclass(key, Action)
        }

    def describe(self) -> dict[str, dict[str, Any]]:
        """Each action's description and the JSON schema of its arguments."""
        return {
            name: {"description": (cls.__doc__ or "").strip(), "arguments": cls.model_json_schema()}
            for name, cls in sorted(self.actions.items())
        }

    async def run(self, name: str, arguments: Mapping[str, object]) -> Any:
        """Validate `arguments` for action `name`, execute it and return its result
        as JSON-ready data. Raises `UnknownAction`, pydantic's `ValidationError`,
        or what the handler raises."""
        cls = self.actions.get(name)
        if cls is None:
            raise UnknownAction(name, sorted(self.actions))
        result = await self.dp.execute(cls.model_validate(arguments))
        return result.model_dump(mode="json") if isinstance(result, BaseModel) else result


# --8<-- [end:runner]


# -- HTTP -------------------------------------------------------------------------------

runner = ActionRunner(create_dispatcher())


def configure_logging() -> None:
    """Show INFO records (the middleware's) on stderr, unless logging is configured already."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    configure_logging()
    async with runner.dp:
        yield


app = FastAPI(title="actions", lifespan=lifespan)


@app.get("/actions")
async def list_actions() -> dict[str, dict[str, Any]]:
    return runner.describe()


@app.post("/actions/{name}", response_model=None)
async def run_action(name: str, arguments: Annotated[dict[str, Any], Body(default_factory=dict)]) -> Any:
    try:
        return {"result": await runner.run(name, arguments)}
    except UnknownAction as exc:
        return JSONResponse({"detail": str(exc)}, status_code=404)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False)
        return JSONResponse({"detail": json.loads(json.dumps(errors, default=str))}, status_code=422)
    except ActionRefused as exc:
        return JSONResponse({"detail": str(exc)}, status_code=409)


# -- command line -------------------------------------------------------------------------


def parse_pairs(pairs: Sequence[str]) -> dict[str, object]:
    """name=value pairs; values stay strings and pydantic converts them."""
    arguments: dict[str, object] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"{pair!r} is not name=value")
        arguments[name] = value
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="action_runner", description="Run actions by name.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the actions and their arguments")
    run = commands.add_parser("run", help="run one action")
    run.add_argument("name")
    run.add_argument("pairs", nargs="*", metavar="name=value", help="arguments, converted by pydantic")
    run.add_argument("--json", help="arguments as a JSON object (merged under the name=value pairs)")
    serve = commands.add_parser("serve", help="serve the HTTP API with uvicorn")
    serve.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    configure_logging()
    if args.command == "list":
        print(json.dumps(runner.describe(), indent=2))
        return 0
    if args.command == "serve":
        import uvicorn

        uvicorn.run(app, port=args.port)
        return 0
    try:
        arguments = {**(json.loads(args.json) if args.json else {}), **parse_pairs(args.pairs)}
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        parser.error(str(exc))
    try:
        result = asyncio.run(run_once(args.name, arguments))
    except (UnknownAction, ValidationError) as exc:
        print(f"action_runner: {exc}", file=sys.stderr)
        return 2
    except ActionRefused as exc:
        print(f"action_runner: refused: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


async def run_once(name: str, arguments: Mapping[str, object]) -> Any:
    async with runner.dp:
        return await runner.run(name, arguments)


if __name__ == "__main__":
    sys.exit(main())
