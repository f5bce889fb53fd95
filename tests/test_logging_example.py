"""examples/logging_ids.py: the handling's ids reach stdlib logging records and structlog's
context variables."""

from __future__ import annotations

import io
import logging

import structlog

from examples.logging_ids import OrderPlaced, PlaceOrder, bind_ids, create_app, stdlib_logging
from pybus import Dispatcher


async def test_every_record_written_while_handling_carries_the_ids() -> None:
    stream = io.StringIO()
    handler = stdlib_logging(stream)
    shop = logging.getLogger("shop")
    shop.addHandler(handler)
    shop.setLevel(logging.INFO)
    try:
        async with create_app() as dp:
            await dp.execute(PlaceOrder(7))
        logging.getLogger("shop").info("outside")
    finally:
        shop.removeHandler(handler)
    placing, receipt, outside = stream.getvalue().splitlines()
    root = placing.split("[")[1].split(" <- ")[0]
    assert placing == f"INFO shop [{root} <- -] placing order 7"
    assert receipt.startswith("INFO shop [")
    correlation, cause = receipt.split("[")[1].split("]")[0].split(" <- ")
    assert correlation == cause == root  # the receipt event was caused by the order
    assert outside == "INFO shop [- <- -] outside"


async def test_the_structlog_middleware_binds_the_ids_while_each_handling_runs() -> None:
    seen: dict[str, dict[str, object]] = {}
    dp = Dispatcher(middleware=[bind_ids])

    @dp.commands.register(PlaceOrder)
    async def place_order(cmd: PlaceOrder) -> OrderPlaced:
        seen["command"] = structlog.contextvars.get_contextvars()
        return OrderPlaced(cmd.order_id)

    @dp.events.register(OrderPlaced)
    async def send_receipt(event: OrderPlaced) -> None:
        seen["event"] = structlog.contextvars.get_contextvars()

    async with dp:
        await dp.execute(PlaceOrder(7))
    assert structlog.contextvars.get_contextvars() == {}  # unbound once each handling ended
    command, event = seen["command"], seen["event"]
    assert command["handler"] == "place_order"
    assert command["correlation_id"] == command["message_id"]
    assert command["causation_id"] is None
    assert event["handler"] == "send_receipt"
    assert event["correlation_id"] == event["causation_id"] == command["message_id"]
