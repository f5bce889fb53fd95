"""Follow-up events: a class handler that collects events, return values that
are published, and the breadth-first order of a cascade.

Run: `uv run python examples/follow_up.py`
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from pybus import Command, Dispatcher, Event


@dataclass(frozen=True)
class OrderPlaced(Event):
    order_id: int


@dataclass(frozen=True)
class StockReserved(Event):
    order_id: int


@dataclass(frozen=True)
class InvoiceSent(Event):
    order_id: int


@dataclass(frozen=True)
class PlaceOrder(Command[OrderPlaced]):
    order_id: int


# --8<-- [start:collecting]
class PlaceOrderHandler:
    """A new instance per handling: what one handling collects never leaks into another."""

    def __init__(self) -> None:
        self.events: list[object] = []

    def add_event(self, event: object) -> None:
        self.events.append(event)

    def dump_events(self) -> list[object]:
        return self.events

    async def handle(self, cmd: PlaceOrder) -> OrderPlaced:
        self.add_event(StockReserved(cmd.order_id))  # published first, if handle succeeds
        return OrderPlaced(cmd.order_id)  # the caller's result, then published too


# --8<-- [end:collecting]


def build() -> Dispatcher:
    dp = Dispatcher()
    dp.commands.bind(PlaceOrder, PlaceOrderHandler)

    @dp.events.register(StockReserved)
    async def on_stock(event: StockReserved) -> None:
        print(f"[event]  StockReserved({event.order_id})")

    @dp.events.register(OrderPlaced)
    async def on_order(event: OrderPlaced) -> InvoiceSent:
        print(f"[event]  OrderPlaced({event.order_id}) -> returns InvoiceSent")
        return InvoiceSent(event.order_id)  # one level deeper in the cascade

    @dp.events.register(InvoiceSent)
    async def on_invoice(event: InvoiceSent) -> None:
        print(f"[event]  InvoiceSent({event.order_id})")

    return dp


async def main() -> None:
    async with build() as dp:
        placed = await dp.execute(PlaceOrder(7))
        print(f"[result] execute returned {placed} after every follow-up ran")


if __name__ == "__main__":
    asyncio.run(main())
