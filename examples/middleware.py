"""Middleware, one idea per function: timing, a cache that answers itself, a
normaliser that replaces the message, error translation, and the order in
which dispatcher, router and registration middleware run.

Run: `uv run python examples/middleware.py`
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from pybus import CallNext, Command, Dispatcher, Query


@dataclass(frozen=True)
class GetPrice(Query[float]):
    sku: str


@dataclass(frozen=True)
class AddToCart(Command[str]):
    sku: str
    quantity: int


class OutOfStock(Exception):
    pass


class CartError(Exception):
    """What the web layer maps to a 409."""


# --8<-- [start:middleware]
async def timed(message: Any, call_next: CallNext) -> Any:
    """Around every handler: how long it took, named by the handling context."""
    started = time.perf_counter()
    try:
        return await call_next(message)
    finally:
        took = (time.perf_counter() - started) * 1000
        print(f"[timed]  {call_next.context.kind} {call_next.context.handler} took {took:.0f} ms")


class Cache:
    """Answers a query it has seen, without calling the handler."""

    def __init__(self) -> None:
        self.answers: dict[object, Any] = {}

    async def __call__(self, message: Any, call_next: CallNext) -> Any:
        if message in self.answers:
            print(f"[cache]  {message} answered from the cache")
            return self.answers[message]
        self.answers[message] = answer = await call_next(message)
        return answer


async def normalise(message: AddToCart, call_next: CallNext) -> Any:
    """Hands the handler another message: SKUs in upper case."""
    return await call_next(AddToCart(message.sku.upper(), message.quantity))


async def domain_errors(message: Any, call_next: CallNext) -> Any:
    """Sees the handler's exception, and raises the application's instead."""
    try:
        return await call_next(message)
    except OutOfStock as exc:
        raise CartError(f"cannot add {message.sku}: {exc}") from exc


def build() -> Dispatcher:
    dp = Dispatcher(middleware=[timed])  # every handler, outermost
    dp.queries.add_middleware(Cache())  # every query, inside `timed`
    stock = {"BOOK-1": 3}

    @dp.queries.register(GetPrice)
    async def get_price(query: GetPrice) -> float:
        await asyncio.sleep(0.05)  # a slow price service
        return 12.5

    @dp.commands.register(AddToCart, middleware=[domain_errors, normalise])  # this handler only
    async def add_to_cart(cmd: AddToCart) -> str:
        if stock.get(cmd.sku, 0) < cmd.quantity:
            raise OutOfStock(f"{stock.get(cmd.sku, 0)} left")
        stock[cmd.sku] -= cmd.quantity
        return f"{cmd.quantity} x {cmd.sku} in the cart"

    return dp


# --8<-- [end:middleware]


async def main() -> None:
    async with build() as dp:
        print(f"[result] {await dp.query(GetPrice('book-1'))}")
        print(f"[result] {await dp.query(GetPrice('book-1'))}")
        print(f"[result] {await dp.execute(AddToCart('book-1', 2))}")
        try:
            await dp.execute(AddToCart("book-1", 2))
        except CartError as exc:
            print(f"[error]  {exc}")


if __name__ == "__main__":
    asyncio.run(main())
