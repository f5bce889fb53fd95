"""Class handlers built by a DI container (dishka), through `handler_factory`.

The container owns the object graph (a mailer shared by the whole app, a new
handler for every message); pybus asks it for each handler it runs. Run it with
`uv run python examples/di_container.py` (dishka is a dev dependency of this
repository, not a dependency of pybus).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from dishka import AsyncContainer, Provider, Scope, make_async_container, provide

from pybus import Command, Dispatcher


@dataclass(frozen=True)
class SendInvoice(Command[str]):
    customer: str
    amount: int


class Mailer:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, to: str, text: str) -> str:
        self.sent.append(to)
        return f"mail #{len(self.sent)} to {to}: {text}"


class SendInvoiceHandler:
    """Its constructor belongs to the container: pybus does not check or call it."""

    def __init__(self, mailer: Mailer) -> None:
        self.mailer = mailer

    async def handle(self, cmd: SendInvoice) -> str:
        return await self.mailer.send(cmd.customer, f"please pay {cmd.amount} EUR")


class AppProvider(Provider):
    @provide(scope=Scope.APP)
    async def mailer(self) -> AsyncIterator[Mailer]:
        print("[container] mailer connected")
        yield Mailer()
        print("[container] mailer disconnected")

    # cache=False: a new handler for every message, as pybus does for classes itself.
    handler = provide(SendInvoiceHandler, scope=Scope.APP, cache=False)


def build(container: AsyncContainer) -> Dispatcher:
    async def from_container(cls: type[Any]) -> Any:
        return await container.get(cls)

    dp = Dispatcher(handler_factory=from_container)
    dp.commands.bind(SendInvoice, SendInvoiceHandler)
    return dp


async def main() -> None:
    container = make_async_container(AppProvider())
    try:
        async with build(container) as dp:
            print("[result]", await dp.execute(SendInvoice("ada@example.com", 120)))
            print("[result]", await dp.execute(SendInvoice("bob@example.com", 80)))
    finally:
        await container.close()


if __name__ == "__main__":
    asyncio.run(main())
