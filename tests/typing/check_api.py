"""Type-checking expectations, checked by mypy (`mypy --strict ... tests`) and pyright in CI.

Never run: every line is a claim about types. `assert_type` fails the check if
a type changes (for example if `execute` lost its return type); each
`# type: ignore[...]` marks a line that must be an error, and both checkers
report an ignore that suppresses nothing (mypy's `warn_unused_ignores`,
pyright's `reportUnnecessaryTypeIgnoreComment`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, assert_type

from pybus import CallNext, Command, Dispatcher, Event, HandlingContext, Query, Singleton
from pybus.middleware import LoggingMiddleware


@dataclass(frozen=True)
class CreateUser(Command[int]):
    name: str


@dataclass(frozen=True)
class GetUser(Query[str]):
    user_id: int


@dataclass(frozen=True)
class UserCreated(Event):
    user_id: int


@dataclass(frozen=True)
class Untyped:
    value: int


class Repo:
    pass


dp = Dispatcher()


# -- results -----------------------------------------------------------------------------


async def results() -> None:
    assert_type(await dp.execute(CreateUser("ada")), int)
    assert_type(await dp.query(GetUser(1)), str)
    assert_type(await dp.execute(CreateUser("ada"), timeout=2.0), int)
    assert_type(await dp.execute(Untyped(1)), Any)
    assert_type(await dp.publish(UserCreated(1)), None)
    assert_type(await dp.query("a string key"), Any)


# -- registration: the message parameter must accept the key ------------------------------


@dp.commands.register(CreateUser)
async def create_user(cmd: CreateUser) -> int:
    return 1


@dp.commands.register(CreateUser, repo=Singleton(Repo))
async def create_user_with_repo(cmd: CreateUser, repo: Repo) -> int:
    return 2


@dp.events.register(UserCreated)
async def on_any_event(event: Event) -> None:  # a base class accepts the subclass
    return None


@dp.events.register(UserCreated)
async def takes_nothing() -> None:
    return None


@dp.events.register("on startup")
async def on_startup() -> None:
    return None


@dp.events.register(UserCreated, argname="event")
async def by_keyword(repo: Repo, *, event: UserCreated) -> None:
    return None


@dp.commands.register(CreateUser)  # type: ignore[arg-type]
async def wrong_message(query: GetUser) -> int:
    return 3


class CreateUserHandler:
    def __init__(self, repo: Repo) -> None:
        self.repo = repo

    async def handle(self, cmd: CreateUser) -> int:
        return 4


async def get_user(query: GetUser) -> str:
    return "ada"


dp.commands.bind(CreateUser, CreateUserHandler, repo=Repo())
dp.events.bind(UserCreated, on_any_event)
dp.queries.bind(GetUser, get_user)
dp.commands.bind(CreateUser, get_user)  # type: ignore[arg-type]
dp.commands.bind(CreateUser, get_user, argname="query")  # argname: the checker cannot tell, the runtime does


async def decorated_functions_stay_callable() -> None:
    assert_type(await create_user(CreateUser("ada")), int)
    assert_type(await create_user_with_repo(CreateUser("ada"), Repo()), int)


# -- middleware -----------------------------------------------------------------------


async def logged(message: object, call_next: CallNext) -> object:
    assert_type(call_next.context, HandlingContext)
    return await call_next(message)


def not_async(message: object, call_next: CallNext) -> object:
    return call_next(message)


dp.add_middleware(logged, LoggingMiddleware())
dp.commands.add_middleware(logged)
dp.add_middleware(not_async)  # type: ignore[arg-type]
dp.queries.bind(GetUser, get_user, middleware=[logged])
Dispatcher(middleware=[logged, LoggingMiddleware()])
