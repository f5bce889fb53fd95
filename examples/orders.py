"""A small order flow for the testing guide: a command, a cascade and a background send.

PlaceOrder -> OrderPlaced (follow-up event) -> ReserveStock (sent to the workers)
-> StockReserved (follow-up event) -> a confirmation mail.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from pybus import Command, Dispatcher, Event, Query
from pybus.middleware import LoggingMiddleware
from pybus.retry import Retry


@dataclass(frozen=True)
class OrderPlaced(Event):
    order_id: int
    sku: str


@dataclass(frozen=True)
class PlaceOrder(Command[OrderPlaced]):
    """Its handler's result is the OrderPlaced event, also published as a follow-up."""

    customer: str
    sku: str


@dataclass(frozen=True)
class ReserveStock(Command[None]):
    order_id: int
    sku: str


@dataclass(frozen=True)
class StockReserved(Event):
    order_id: int


@dataclass(frozen=True)
class CountOrders(Query[int]):
    customer: str


class Mailer:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, text: str) -> None:
        await asyncio.sleep(0.01)  # a slow external service
        self.sent.append(text)


def build(mailer: Mailer) -> Dispatcher:
    dp = Dispatcher()
    orders: list[str] = []

    @dp.commands.register(PlaceOrder)
    async def place_order(cmd: PlaceOrder) -> OrderPlaced:
        if not cmd.sku:
            raise ValueError("an order needs a sku")
        orders.append(cmd.customer)
        return OrderPlaced(order_id=len(orders), sku=cmd.sku)

    @dp.events.register(OrderPlaced, emits=[ReserveStock])
    async def reserve_later(event: OrderPlaced) -> None:
        await dp.commands.send(ReserveStock(event.order_id, event.sku), key=event.sku)

    # The warehouse times out now and then: up to 3 attempts, 50 ms apart, then 100 ms.
    @dp.commands.register(ReserveStock, retry=Retry(attempts=3, delay=0.05), timeout=2)
    async def reserve_stock(cmd: ReserveStock) -> StockReserved:
        await asyncio.sleep(0.05)  # the warehouse is slow
        return StockReserved(cmd.order_id)

    @dp.queries.register(CountOrders)
    async def count_orders(query: CountOrders) -> int:
        return orders.count(query.customer)

    @dp.events.register(StockReserved, mailer=mailer)
    async def confirm(event: StockReserved, mailer: Mailer) -> None:
        await mailer.send(f"order {event.order_id} confirmed")

    # Every command is logged before and after (INFO records of the "pybus" logger).
    dp.commands.add_middleware(LoggingMiddleware())
    return dp


def create_app() -> Dispatcher:
    """For the command line: `pybus routes examples.orders:create_app`."""
    return build(Mailer())


async def main() -> None:
    mailer = Mailer()
    async with build(mailer) as dp:
        placed = await dp.execute(PlaceOrder("ada", "book-1"))
        print(f"placed order {placed.order_id}; the stock is reserved in the background")
    print(f"mails sent: {mailer.sent}")


if __name__ == "__main__":
    asyncio.run(main())
