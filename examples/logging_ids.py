"""Correlation ids in every log record written while a message is handled.

Run: `uv run python -m examples.logging_ids`

Two ways, both reading `pybus.current_context()`:
- stdlib `logging`: a filter adds the ids to every record, the handlers' own included;
- structlog: a middleware binds them in structlog's context variables for the
  duration of each handling (and `LoggingMiddleware` logs each handling).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from pybus import CallNext, Dispatcher, current_context
from pybus.middleware import LoggingMiddleware

log = logging.getLogger("shop")


@dataclass(frozen=True)
class PlaceOrder:
    order_id: int


@dataclass(frozen=True)
class OrderPlaced:
    order_id: int


# --8<-- [start:stdlib]
class HandlingIds(logging.Filter):
    """Adds `correlation_id`, `causation_id` and `message_id` to every record (`-` outside a handling)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = current_context()
        record.correlation_id = context.correlation_id if context else "-"
        record.causation_id = (context.causation_id or "-") if context else "-"
        record.message_id = context.message_id if context else "-"
        return True


def stdlib_logging(stream: Any = None) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.addFilter(HandlingIds())
    handler.setFormatter(
        logging.Formatter("%(levelname)s %(name)s [%(correlation_id)s <- %(causation_id)s] %(message)s")
    )
    return handler


# --8<-- [end:stdlib]


# --8<-- [start:structlog]
async def bind_ids(message: Any, call_next: CallNext) -> Any:
    """Middleware: the handling's ids in structlog's context variables while it runs."""
    import structlog

    context = call_next.context
    with structlog.contextvars.bound_contextvars(
        correlation_id=context.correlation_id,
        causation_id=context.causation_id,
        message_id=context.message_id,
        handler=context.handler,
    ):
        return await call_next(message)


# --8<-- [end:structlog]


def create_app(*, middleware: list[Any] | None = None) -> Dispatcher:
    # A HandlingContext is tracked because middleware is present (LoggingMiddleware).
    dp = Dispatcher(middleware=middleware or [LoggingMiddleware(logger="pybus")])

    @dp.commands.register(PlaceOrder)
    async def place_order(cmd: PlaceOrder) -> OrderPlaced:
        log.info("placing order %s", cmd.order_id)
        return OrderPlaced(cmd.order_id)

    @dp.events.register(OrderPlaced)
    async def send_receipt(event: OrderPlaced) -> None:
        log.info("sending the receipt of order %s", event.order_id)

    return dp


async def main() -> None:
    logging.basicConfig(level=logging.INFO, handlers=[stdlib_logging()])
    async with create_app() as dp:
        await dp.execute(PlaceOrder(1))


if __name__ == "__main__":
    asyncio.run(main())
