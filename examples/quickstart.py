"""pybus in one file: a command, its follow-up event fanned out, and a query.

Run it with `uv run python examples/quickstart.py`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from pybus import Command, Dispatcher, Event, Query


@dataclass(frozen=True)
class RegisterUser(Command[int]):
    name: str
    email: str


@dataclass(frozen=True)
class UserRegistered(Event):
    user_id: int
    email: str


@dataclass(frozen=True)
class GetUserName(Query[str]):
    user_id: int


class Users:
    """A stand-in for a real repository."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}

    def add(self, name: str) -> int:
        user_id = len(self.names) + 1
        self.names[user_id] = name
        return user_id


def build() -> Dispatcher:
    dp = Dispatcher()
    users = Users()

    class RegisterUserHandler:
        """A class handler: built for each command, it collects follow-up events."""

        def __init__(self, users: Users) -> None:
            self.users = users
            self.events: list[object] = []

        def add_event(self, event: object) -> None:
            self.events.append(event)

        def dump_events(self) -> list[object]:
            return self.events

        async def handle(self, cmd: RegisterUser) -> int:
            user_id = self.users.add(cmd.name)
            print(f"[command] RegisterUser({cmd.name!r}) -> stored as user {user_id}")
            self.add_event(UserRegistered(user_id, cmd.email))
            return user_id

    dp.commands.bind(RegisterUser, RegisterUserHandler, users=users)

    @dp.events.register(UserRegistered)
    async def send_welcome(event: UserRegistered) -> None:
        print(f"[event]   UserRegistered -> welcome mail to {event.email}")

    @dp.events.register(UserRegistered)
    def count_signup(event: UserRegistered) -> None:
        print(f"[event]   UserRegistered -> signups metric +1 (user {event.user_id})")

    @dp.queries.register(GetUserName, users=users)
    async def get_user_name(query: GetUserName, users: Users) -> str:
        return users.names[query.user_id]

    return dp


async def main() -> None:
    dp = build()
    dp.start()
    user_id = await dp.execute(RegisterUser("Ada", "ada@example.com"))
    print(f"[result]  execute returned user id {user_id}")
    name = await dp.query(GetUserName(user_id))
    print(f"[query]   GetUserName({user_id}) -> {name!r}")


if __name__ == "__main__":
    asyncio.run(main())
