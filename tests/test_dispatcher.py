"""execute / query / publish: results, lookups, errors, start."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import pybus
from pybus import (
    Command,
    Dispatcher,
    DispatcherNotStarted,
    HandlerNotFound,
    ImproperlyConfigured,
    Query,
)


@dataclass(frozen=True)
class CreateUser(Command[int]):
    name: str


@dataclass(frozen=True)
class GetUser(Query[str]):
    user_id: int


@dataclass(frozen=True)
class UserCreated:
    user_id: int


class Boom(Exception):
    pass


def build() -> Dispatcher:
    dp = Dispatcher()

    @dp.commands.register(CreateUser)
    async def create(cmd: CreateUser) -> int:
        if cmd.name == "boom":
            raise Boom("no users named boom")
        return 7

    @dp.queries.register(GetUser)
    async def get(query: GetUser) -> str:
        return f"user {query.user_id}"

    @dp.events.register(UserCreated)
    async def created(event: UserCreated) -> None:
        return None

    return dp


async def test_execute_and_query_return_the_handler_result() -> None:
    dp = build()
    dp.start()
    assert await dp.execute(CreateUser("ada")) == 7
    assert await dp.query(GetUser(3)) == "user 3"
    await dp.publish(UserCreated(7))


async def test_handler_exception_reaches_the_caller_unchanged() -> None:
    dp = build()
    dp.start()
    with pytest.raises(Boom) as info:
        await dp.execute(CreateUser("boom"))
    assert str(info.value) == "no users named boom"
    assert not getattr(info.value, "__notes__", None)


@pytest.mark.parametrize("call", ["execute", "query", "publish"])
async def test_calls_before_start_raise(call: str) -> None:
    dp = build()
    with pytest.raises(DispatcherNotStarted, match=r"the dispatcher is not started; call dp.start\(\)"):
        await getattr(dp, call)(CreateUser("ada"))


async def test_unknown_command_names_the_key_and_how_to_register() -> None:
    dp = Dispatcher()
    dp.start()
    with pytest.raises(HandlerNotFound) as info:
        await dp.execute(CreateUser("ada"))
    assert str(info.value) == (
        "No handler registered for command CreateUser; register one with @dp.commands.register(CreateUser)"
    )


async def test_wrong_call_names_the_right_one() -> None:
    dp = build()
    dp.start()
    with pytest.raises(HandlerNotFound, match=r"it is registered as a query: use dp.query\(\)$"):
        await dp.execute(GetUser(1))
    with pytest.raises(HandlerNotFound, match=r"it is registered as a command: use dp.execute\(\)$"):
        await dp.query(CreateUser("ada"))
    with pytest.raises(HandlerNotFound, match=r"it is registered as an event: use dp.publish\(\)$"):
        await dp.execute(UserCreated(1))
    with pytest.raises(
        HandlerNotFound, match=r"^No handler registered for event CreateUser; it is registered"
    ):
        await dp.publish(CreateUser("ada"))


async def test_publish_without_handlers_is_not_an_error() -> None:
    dp = build()
    dp.start()
    await dp.publish("nobody listens")
    await dp.publish(object())


async def test_commands_match_their_exact_class_only() -> None:
    @dataclass(frozen=True)
    class CreateAdmin(CreateUser):
        pass

    dp = build()
    dp.start()
    with pytest.raises(HandlerNotFound, match=r"command CreateAdmin"):
        await dp.execute(CreateAdmin("root"))


async def test_string_messages_are_matched_by_value() -> None:
    dp = Dispatcher()
    calls: list[str] = []

    @dp.events.register("on startup")
    async def started() -> None:
        calls.append("started")

    @dp.commands.register("reindex")
    async def reindex(name: str) -> str:
        return f"reindexed by {name!r}"

    dp.start()
    await dp.publish("on startup")
    assert calls == ["started"]
    assert await dp.execute("reindex") == "reindexed by 'reindex'"
    with pytest.raises(HandlerNotFound, match=r"command 'other'"):
        await dp.execute("other")
    with pytest.raises(HandlerNotFound, match=r"it is registered as a command"):
        await dp.publish("reindex")


async def test_start_is_idempotent_and_reported() -> None:
    dp = build()
    assert repr(dp) == "<Dispatcher new>"
    dp.start()
    dp.start()
    assert dp.started
    assert repr(dp) == "<Dispatcher started>"
    assert await dp.query(GetUser(1)) == "user 1"


async def test_subclass_overrides_are_kept_after_start() -> None:
    class Auditing(Dispatcher):
        def __init__(self) -> None:
            super().__init__()
            self.log: list[object] = []

        async def execute(self, command: object, /) -> object:  # type: ignore[override]
            self.log.append(command)
            return await super().execute(command)

    dp = Auditing()
    dp.commands.bind(CreateUser, lambda cmd: 1)
    dp.start()
    assert await dp.execute(CreateUser("ada")) == 1
    assert dp.log == [CreateUser("ada")]


async def test_methods_taken_before_start_keep_working_after() -> None:
    dp = build()
    execute = dp.execute
    dp.start()
    assert await execute(CreateUser("ada")) == 7


@pytest.mark.parametrize("depth", [-1, 1.5, True, "64"])
def test_max_cascade_depth_must_be_a_whole_number(depth: object) -> None:
    with pytest.raises(ImproperlyConfigured, match=r"max_cascade_depth must be a whole number >= 0"):
        Dispatcher(max_cascade_depth=depth)  # type: ignore[arg-type]


async def test_default_dispatcher_works_like_any_other() -> None:
    from pybus import dispatcher as dp

    assert dp is pybus.dispatcher
    assert isinstance(dp, Dispatcher)
