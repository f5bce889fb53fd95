"""Registration on routers: decorators, bind, duplicates, freezing, custom routers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from pybus import (
    Dispatcher,
    DispatcherFrozen,
    EventRouter,
    HandlerAlreadyRegistered,
    ImproperlyConfigured,
    RequestRouter,
)
from pybus.handlers import Handler


@dataclass
class CreateUser:
    name: str = "ada"


@dataclass
class UserCreated:
    name: str = "ada"


async def create_user(cmd: CreateUser) -> None:
    return None


async def other_create_user(cmd: CreateUser) -> None:
    return None


def test_register_returns_the_function_unchanged() -> None:
    dp = Dispatcher()

    @dp.commands.register(CreateUser)
    async def handler(cmd: CreateUser) -> str:
        return cmd.name

    assert handler.__name__ == "handler"
    assert [h.target for h in dp.commands.handlers[CreateUser]] == [handler]


async def test_a_registered_function_stays_directly_callable() -> None:
    dp = Dispatcher()

    @dp.queries.register(CreateUser)
    async def handler(cmd: CreateUser) -> str:
        return cmd.name

    assert await handler(CreateUser("direct")) == "direct"


def test_the_three_registration_styles_are_equivalent() -> None:
    dp = Dispatcher()
    dp.register_command_handler(CreateUser, handler=create_user)  # iambus passes it by keyword
    dp.register_event_handler(UserCreated, create_user, argname="cmd")
    dp.register_query_handler("users", create_user)
    assert list(dp.commands.handlers) == [CreateUser]
    assert list(dp.events.handlers) == [UserCreated]
    assert list(dp.queries.handlers) == ["users"]
    assert dp.registered_kind(CreateUser) == "command"
    assert dp.registered_kind(UserCreated) == "event"
    assert dp.registered_kind("users") == "query"
    assert dp.registered_kind("nobody") is None


def test_second_command_handler_is_refused() -> None:
    dp = Dispatcher()
    dp.commands.bind(CreateUser, create_user)
    with pytest.raises(HandlerAlreadyRegistered) as info:
        dp.commands.bind(CreateUser, other_create_user)
    text = str(info.value)
    assert text.startswith("The command CreateUser already has a handler, create_user (")
    assert "remove the registration of other_create_user (" in text


def test_second_query_handler_is_refused() -> None:
    dp = Dispatcher()
    dp.queries.bind("users", create_user)
    with pytest.raises(HandlerAlreadyRegistered, match=r"^The query 'users' already has a handler"):
        dp.queries.bind("users", create_user)


async def on_created(event: UserCreated) -> None:
    return None


async def also_on_created(event: UserCreated) -> None:
    return None


def test_events_take_many_handlers_but_not_the_same_one_twice() -> None:
    dp = Dispatcher()
    dp.events.bind(UserCreated, on_created)
    dp.events.bind(UserCreated, also_on_created)
    with pytest.raises(HandlerAlreadyRegistered, match=r"on_created \(.*\) is already registered for event"):
        dp.events.bind(UserCreated, on_created)
    assert len(dp.events.handlers[UserCreated]) == 2


def test_a_key_belongs_to_one_kind() -> None:
    dp = Dispatcher()
    dp.commands.bind(CreateUser, create_user)
    with pytest.raises(ImproperlyConfigured) as info:
        dp.events.bind(CreateUser, other_create_user)
    assert str(info.value) == (
        "Cannot register other_create_user for event CreateUser: CreateUser is already registered "
        "as a command; a message key belongs to one kind, so give the two roles their own message classes"
    )


def test_registering_after_start_is_refused() -> None:
    dp = Dispatcher()
    dp.start()
    for router in (dp.events, dp.commands, dp.queries):
        with pytest.raises(DispatcherFrozen):
            router.bind(CreateUser, create_user)
    with pytest.raises(DispatcherFrozen) as info:
        dp.register_event_handler("late", create_user)
    assert str(info.value) == (
        "Cannot register create_user for event 'late': the dispatcher has started and its handler "
        "maps are frozen; register every handler before dp.start()"
    )
    assert all(router.frozen for router in (dp.events, dp.commands, dp.queries))


@pytest.mark.parametrize("key", [CreateUser(), 42, None, str])
def test_keys_are_classes_or_strings(key: object) -> None:
    dp = Dispatcher()
    with pytest.raises(ImproperlyConfigured, match=r"Cannot register .* as a command key"):
        dp.commands.bind(key, create_user)  # type: ignore[call-overload]


def test_handlers_view_is_read_only() -> None:
    dp = Dispatcher()
    dp.commands.bind(CreateUser, create_user)
    view = dp.commands.handlers
    with pytest.raises(TypeError):
        view[UserCreated] = ()  # type: ignore[index]
    assert CreateUser in dp.commands
    assert UserCreated not in dp.commands


class AuditingRouter(RequestRouter):
    """The iambus README's pattern: a subclass that overrides bind."""

    seen: list[tuple[object, str | None]]

    def bind(  # type: ignore[override]
        self,
        message: object,
        handler: object,
        argname: str | None = None,
        response_event: object = None,
        **initkwargs: Any,
    ) -> Handler:
        self.seen = [*getattr(self, "seen", []), (message, argname)]
        # iambus-style: untyped arguments, so the typed overloads do not apply
        return super().bind(message, handler, argname, **initkwargs)  # type: ignore[arg-type]


class LoudEventRouter(EventRouter):
    pass


async def test_custom_router_classes_are_used_and_register_goes_through_bind() -> None:
    dp = Dispatcher(commands_router_cls=AuditingRouter, events_router_cls=LoudEventRouter)
    assert isinstance(dp.commands, AuditingRouter)
    assert isinstance(dp.events, LoudEventRouter)
    assert type(dp.queries) is RequestRouter

    @dp.commands.register(CreateUser, argname="cmd")
    async def handler(cmd: CreateUser) -> str:
        return f"created {cmd.name}"

    dp.register_command_handler("ping", create_user)
    assert dp.commands.seen == [(CreateUser, "cmd"), ("ping", None)]
    dp.start()
    assert await dp.execute(CreateUser("bob")) == "created bob"


def test_routers_are_created_on_first_use_and_kept() -> None:
    dp = Dispatcher()
    assert dp.events is dp.events
    assert dp.commands is not dp.queries
    assert (dp.commands.kind, dp.queries.kind, dp.events.kind) == ("command", "query", "event")
    assert dp.commands.dispatcher is dp


# -- mistakes refused when they are made -------------------------------------------------------


def test_register_used_without_the_key_is_refused() -> None:
    dp = Dispatcher()
    with pytest.raises(ImproperlyConfigured) as info:

        @dp.commands.register  # type: ignore[call-overload]
        async def create(cmd: CreateUser) -> None: ...

    assert str(info.value) == (
        "@dp.commands.register needs the message key: write @dp.commands.register(SomeMessage) "
        "above create; used without it, it would register nothing"
    )
    assert CreateUser not in dp.commands


def test_register_given_the_handler_is_refused_and_names_bind() -> None:
    dp = Dispatcher()
    with pytest.raises(ImproperlyConfigured) as info:
        dp.events.register(UserCreated, create_user)  # type: ignore[call-overload]
    assert str(info.value) == (
        "dp.events.register(UserCreated, create_user) does not register create_user: register(Key) "
        "makes a decorator; to register a handler directly, call dp.events.bind(UserCreated, create_user)"
    )
    assert UserCreated not in dp.events


def test_generator_handlers_are_refused() -> None:
    from collections.abc import AsyncIterator, Iterator

    from pybus import HandlerSignatureError

    async def stream(cmd: CreateUser) -> AsyncIterator[UserCreated]:
        yield UserCreated()

    def produce(cmd: CreateUser) -> Iterator[UserCreated]:
        yield UserCreated()

    class Handler:
        def handle(self, cmd: CreateUser) -> Iterator[UserCreated]:
            yield UserCreated()

    dp = Dispatcher()
    with pytest.raises(HandlerSignatureError, match="it is an async generator function"):
        dp.commands.bind(CreateUser, stream)
    with pytest.raises(
        HandlerSignatureError, match=r"produce .*: it is a generator function \(it uses yield\)"
    ):
        dp.commands.bind(CreateUser, produce)
    with pytest.raises(HandlerSignatureError, match=r"Handler.handle .*replace yield with return"):
        dp.commands.bind(CreateUser, Handler)
    assert CreateUser not in dp.commands


def test_a_keyword_only_message_parameter_suggests_argname() -> None:
    from pybus import HandlerSignatureError

    async def create(*, cmd: CreateUser) -> None: ...

    dp = Dispatcher()
    with pytest.raises(HandlerSignatureError) as info:
        dp.commands.bind(CreateUser, create)  # type: ignore[arg-type]
    assert str(info.value).endswith(
        "if 'cmd' is meant to receive the message, name it with argname='cmd' "
        "(a keyword-only parameter is never given the message by position)"
    )
    dp.commands.bind(CreateUser, create, argname="cmd")  # the suggestion works


def test_register_without_the_key_above_a_class_is_refused_at_start() -> None:
    dp = Dispatcher()

    @dp.commands.register
    class CreateUserHandler:
        async def handle(self, cmd: CreateUser) -> None: ...

    with pytest.raises(ImproperlyConfigured) as info:
        dp.start()
    assert str(info.value) == (
        "@dp.commands.register was written without the message key above the class "
        "CreateUserHandler, which looks like a handler: nothing was registered; write "
        "@dp.commands.register(SomeMessage)"
    )


def test_a_register_decorator_never_applied_is_refused_at_start() -> None:
    dp = Dispatcher()
    dp.events.register(UserCreated)  # the decorator is made and dropped
    with pytest.raises(ImproperlyConfigured, match=r"dp.events.register\(UserCreated\) made a decorator"):
        dp.start()
