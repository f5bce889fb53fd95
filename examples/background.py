"""Background engines: send, ordering keys, backpressure, the error hook, join and stop.

Run: `uv run python examples/background.py`
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from pybus import Dispatcher, QueueFull


@dataclass(frozen=True)
class ReindexUser:
    user_id: int


@dataclass(frozen=True)
class UserSeen:
    user_id: int
    page: str


@dataclass(frozen=True)
class ChargeCard:
    amount: int


# --8<-- [start:engines]
def report(error: BaseException, message: object) -> None:
    """The error hook: a failure in a worker comes here (default: an ERROR log record)."""
    print(f"[on_error] {message!r} failed: {error}")


def build() -> Dispatcher:
    dp = Dispatcher(workers=4, queue_size=100, on_error=report, default_timeout=30)
    seen: dict[int, list[str]] = {}

    @dp.commands.register(ReindexUser)
    async def reindex(cmd: ReindexUser) -> None:
        await asyncio.sleep(0.01)
        print(f"[command] reindexed user {cmd.user_id}")

    @dp.events.register(UserSeen)
    async def remember(event: UserSeen) -> None:
        await asyncio.sleep(0.001 * len(event.page))  # pages take different times...
        seen.setdefault(event.user_id, []).append(event.page)  # ...but order per key holds

    @dp.commands.register(ChargeCard)
    async def charge(cmd: ChargeCard) -> None:
        if cmd.amount < 0:
            raise ValueError("a charge is positive")

    @dp.queries.register("pages seen")
    async def pages_seen() -> dict[int, list[str]]:
        return seen

    return dp


async def main() -> None:
    dp = build()
    async with dp:  # start; on exit: drain the queues, stop, tear down
        await dp.commands.send(ReindexUser(7))  # fire and forget: returns once queued
        for page in ("home", "a-long-article", "cart", "checkout"):
            await dp.events.send(UserSeen(7, page), key="user-7")  # one at a time, in order
        await dp.send(ChargeCard(-5))  # routed by the kind ChargeCard is registered under
        await dp.join()  # everything sent so far, and what it sent, is done
        print(f"[query]   pages seen: {await dp.query('pages seen')}")
        print(f"[stats]   {dp.statistics().commands}")

    small = Dispatcher(workers=1, queue_size=1)
    small.commands.bind(ReindexUser, lambda cmd: None)
    async with small:
        small.commands.send_nowait(ReindexUser(1))
        try:
            small.commands.send_nowait(ReindexUser(2))  # the queue is full
        except QueueFull as exc:
            print(f"[full]    {exc}")


# --8<-- [end:engines]


if __name__ == "__main__":
    asyncio.run(main())
