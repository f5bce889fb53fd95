"""The worked example of docs/testing.md (the page shows this file)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from examples.orders import Mailer, OrderPlaced, PlaceOrder, ReserveStock, StockReserved, build
from pybus import Dispatcher
from pybus.testing import TrackedSession, track

MAILER = Mailer()


@pytest.fixture
def pybus_dispatcher_factory() -> Callable[[], Dispatcher]:
    MAILER.sent.clear()
    return lambda: build(MAILER)


async def test_placing_an_order_reserves_stock_and_mails_the_customer(
    pybus_dispatcher: Dispatcher, pybus_track: Callable[..., TrackedSession]
) -> None:
    async with pybus_track() as session:
        placed = await pybus_dispatcher.execute(PlaceOrder("ada", "book-1"))
    # The block ended only when the background ReserveStock and its cascade were done.
    assert session.handled.single(OrderPlaced) == placed
    assert session.handled.single(ReserveStock).sku == "book-1"
    assert session.handled.single(StockReserved).order_id == placed.order_id
    assert MAILER.sent == [f"order {placed.order_id} confirmed"]


async def test_the_mail_can_be_stubbed_for_one_test(pybus_dispatcher: Dispatcher) -> None:
    confirmed: list[int] = []
    with pybus_dispatcher.override_handler(StockReserved, lambda event: confirmed.append(event.order_id)):
        session = await track(pybus_dispatcher).execute(PlaceOrder("bob", "pen"))
    assert confirmed == [session.result.order_id]
    assert MAILER.sent == []


def test_the_guide_includes_this_file() -> None:
    guide = (Path(__file__).resolve().parent.parent / "docs" / "testing.md").read_text()
    assert '--8<-- "tests/test_orders_example.py"' in guide
