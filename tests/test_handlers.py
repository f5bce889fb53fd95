"""Handler inspection at registration: what can be a handler, and how it is called."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import pytest

from pybus import Dispatcher, HandlerSignatureError, ImproperlyConfigured


@dataclass
class Ping:
    n: int = 0


@pytest.fixture
def dp() -> Dispatcher:
    return Dispatcher()


# -- kinds of handlers -------------------------------------------------------------


async def test_async_function_gets_the_message(dp: Dispatcher) -> None:
    async def handler(msg: Ping) -> int:
        return msg.n * 2

    dp.queries.bind(Ping, handler)
    dp.start()
    assert await dp.query(Ping(21)) == 42


async def test_sync_function_is_called_directly(dp: Dispatcher) -> None:
    def handler(msg: Ping) -> int:
        return msg.n + 1

    dp.queries.bind(Ping, handler)
    dp.start()
    assert await dp.query(Ping(1)) == 2


async def test_zero_parameter_handler_is_called_without_the_message(dp: Dispatcher) -> None:
    calls: list[str] = []

    async def on_start() -> None:
        calls.append("started")

    dp.events.bind("on startup", on_start)
    dp.start()
    await dp.publish("on startup")
    assert calls == ["started"]


async def test_bound_kwargs_are_passed_on_each_call(dp: Dispatcher) -> None:
    async def handler(msg: Ping, factor: int, offset: int = 0) -> int:
        return msg.n * factor + offset

    dp.queries.bind(Ping, handler, factor=3)
    dp.start()
    assert await dp.query(Ping(2)) == 6


async def test_argname_passes_the_message_by_keyword(dp: Dispatcher) -> None:
    async def handler(repo: dict[str, int], *, query: Ping) -> int:
        return repo["base"] + query.n

    dp.queries.bind(Ping, handler, argname="query", repo={"base": 10})
    dp.start()
    assert await dp.query(Ping(5)) == 15


async def test_argname_naming_the_first_parameter_passes_it_by_position(dp: Dispatcher) -> None:
    async def handler(msg: Ping, /, extra: int = 1) -> int:
        return msg.n + extra

    dp.queries.bind(Ping, handler, argname="msg")
    dp.start()
    assert await dp.query(Ping(1)) == 2


async def test_argname_is_accepted_by_kwargs_catch_all(dp: Dispatcher) -> None:
    async def handler(**kwargs: Any) -> Any:
        return kwargs["message"].n

    dp.queries.bind(Ping, handler, argname="message")
    dp.start()
    assert await dp.query(Ping(8)) == 8


async def test_keyword_only_handler_gets_no_message(dp: Dispatcher) -> None:
    async def handler(*, value: int) -> int:
        return value

    dp.queries.bind(Ping, handler, value=7)  # type: ignore[arg-type]  # no message: typed as a mismatch
    dp.start()
    assert await dp.query(Ping()) == 7


async def test_partial_is_a_handler(dp: Dispatcher) -> None:
    async def handler(msg: Ping, bonus: int) -> int:
        return msg.n + bonus

    dp.queries.bind(Ping, functools.partial(handler, bonus=100))
    dp.start()
    assert await dp.query(Ping(1)) == 101


async def test_sync_callable_returning_a_coroutine_is_awaited(dp: Dispatcher) -> None:
    async def real(msg: Ping) -> int:
        return msg.n

    def undecorated_wrapper(msg: Ping) -> Any:  # a decorator that lost the async-ness
        return real(msg)

    dp.queries.bind(Ping, undecorated_wrapper)
    dp.start()
    assert await dp.query(Ping(4)) == 4


class Counter:
    """A class handler with state: a new instance for every handling."""

    instances = 0

    def __init__(self, start: int) -> None:
        Counter.instances += 1
        self.value = start

    async def handle(self, msg: Ping) -> int:
        self.value += msg.n
        return self.value


async def test_class_with_handle_is_instantiated_per_handling_with_init_kwargs(dp: Dispatcher) -> None:
    Counter.instances = 0
    dp.queries.bind(Ping, Counter, start=10)
    dp.start()
    assert await dp.query(Ping(1)) == 11
    assert await dp.query(Ping(1)) == 11  # no state leaked from the first handling
    assert Counter.instances == 2


async def test_class_with_call_is_a_handler(dp: Dispatcher) -> None:
    class Doubler:
        def __call__(self, msg: Ping) -> int:
            return msg.n * 2

    dp.queries.bind(Ping, Doubler)
    dp.start()
    assert await dp.query(Ping(4)) == 8


async def test_class_with_static_and_class_methods(dp: Dispatcher) -> None:
    class Static:
        @staticmethod
        async def handle(msg: Ping) -> str:
            return f"static {msg.n}"

    class Klass:
        @classmethod
        def handle(cls, msg: str) -> str:
            return f"{cls.__name__} {msg}"

    dp.queries.bind(Ping, Static)
    dp.queries.bind("klass", Klass, argname="msg")
    dp.start()
    assert await dp.query(Ping(1)) == "static 1"
    assert await dp.query("klass") == "Klass klass"


async def test_ready_instance_is_used_as_it_is(dp: Dispatcher) -> None:
    counter = Counter(start=0)
    Counter.instances = 0
    dp.queries.bind(Ping, counter)
    dp.start()
    assert await dp.query(Ping(1)) == 1
    assert await dp.query(Ping(1)) == 2  # the same instance both times
    assert Counter.instances == 0


async def test_callable_instance_gets_bound_kwargs_per_call(dp: Dispatcher) -> None:
    class Adder:
        async def __call__(self, msg: Ping, amount: int) -> int:
            return msg.n + amount

    dp.queries.bind(Ping, Adder(), amount=5)
    dp.start()
    assert await dp.query(Ping(1)) == 6


# -- validation: every mistake is reported at registration ----------------------------


def test_missing_value_for_a_parameter(dp: Dispatcher) -> None:
    async def create(msg: Ping, repo: object) -> None: ...

    with pytest.raises(HandlerSignatureError) as info:
        dp.commands.bind(Ping, create)
    assert str(info.value) == (
        "Cannot register create as the command handler for Ping: parameter 'repo' has no value; "
        "bind one at registration (register(..., repo=...)), provide one for its type before "
        "registering (dp.provide(Type, provider)), or give it a default"
    )


def test_bound_value_the_handler_does_not_take(dp: Dispatcher) -> None:
    async def create(msg: Ping) -> None: ...

    with pytest.raises(HandlerSignatureError, match=r"a value is bound to 'repo', which it does not take"):
        dp.commands.bind(Ping, create, repo=object())


def test_bound_value_for_positional_only_parameter(dp: Dispatcher) -> None:
    async def create(msg: Ping, repo: object = None, /) -> None: ...

    with pytest.raises(HandlerSignatureError, match=r"its parameters are 'msg', 'repo'"):
        dp.commands.bind(Ping, create, repo=object())


def test_positional_only_parameter_without_default(dp: Dispatcher) -> None:
    async def create(msg: Ping, repo: object, /) -> None: ...

    with pytest.raises(
        HandlerSignatureError, match=r"parameter 'repo' is positional-only and has no default"
    ):
        dp.commands.bind(Ping, create, repo=object())


def test_argname_that_names_no_parameter(dp: Dispatcher) -> None:
    async def create(cmd: Ping) -> None: ...

    with pytest.raises(HandlerSignatureError) as info:
        dp.commands.bind(Ping, create, argname="command")
    assert str(info.value).endswith("argname='command' names no parameter; its parameters are 'cmd'")


def test_argname_also_bound(dp: Dispatcher) -> None:
    async def create(cmd: Ping) -> None: ...

    with pytest.raises(
        HandlerSignatureError, match=r"argname='cmd' names the message parameter, but a value"
    ):
        dp.commands.bind(Ping, create, argname="cmd", cmd=1)


def test_argname_naming_a_later_positional_only_parameter(dp: Dispatcher) -> None:
    async def create(repo: object, cmd: Ping, /) -> None: ...

    with pytest.raises(
        HandlerSignatureError, match=r"names a positional-only parameter that is not the first"
    ):
        dp.commands.bind(Ping, create, argname="cmd", repo=1)


def test_value_bound_to_the_message_parameter(dp: Dispatcher) -> None:
    async def create(repo: object, cmd: Ping) -> None: ...

    with pytest.raises(HandlerSignatureError) as info:
        dp.commands.bind(Ping, create, repo=object())
    assert "its first parameter 'repo' receives the message, but a value is bound to it" in str(info.value)


def test_class_handle_parameter_without_default(dp: Dispatcher) -> None:
    class Create:
        def handle(self, cmd: Ping, repo: object) -> None: ...

    with pytest.raises(HandlerSignatureError) as info:
        dp.commands.bind(Ping, Create, repo=object())
    assert str(info.value).startswith(
        "Cannot register Create.handle as the command handler for Ping: parameter 'repo' has no default"
    )
    assert "values bound at registration go to __init__" in str(info.value)


def test_class_init_needs_a_value(dp: Dispatcher) -> None:
    with pytest.raises(HandlerSignatureError) as info:
        dp.queries.bind(Ping, Counter)
    assert str(info.value) == (
        "Cannot register Counter.__init__ as the query handler for Ping: parameter 'start' has no "
        "value; bind one at registration (register(..., start=...)), provide one for its type "
        "before registering (dp.provide(Type, provider)), or give it a default"
    )


def test_class_init_does_not_take_a_bound_value(dp: Dispatcher) -> None:
    with pytest.raises(HandlerSignatureError, match=r"a value is bound to 'stop', which it does not take"):
        dp.queries.bind(Ping, Counter, start=1, stop=2)


def test_not_a_handler(dp: Dispatcher) -> None:
    with pytest.raises(ImproperlyConfigured) as info:
        dp.commands.bind(Ping, 42)  # type: ignore[call-overload]
    assert str(info.value) == (
        "int instance cannot handle command Ping: a handler is an async or "
        "sync function, a class with a handle() or __call__() method, or an instance of one"
    )


def test_class_without_handle_or_call(dp: Dispatcher) -> None:
    class Nothing:
        pass

    with pytest.raises(ImproperlyConfigured, match=r"a class with a handle\(\) or __call__\(\) method"):
        dp.commands.bind(Ping, Nothing)


def test_uninspectable_handler(dp: Dispatcher) -> None:
    async def broken(msg: Ping) -> None: ...

    broken.__signature__ = "not a signature"  # type: ignore[attr-defined]
    with pytest.raises(HandlerSignatureError, match=r"its signature cannot be inspected \(.*\); wrap it"):
        dp.events.bind(Ping, broken)


def test_handler_record_describes_the_registration(dp: Dispatcher) -> None:
    async def create(cmd: Ping, repo: object) -> None: ...

    record = dp.commands.bind(Ping, create, repo="r")
    assert record.kind == "command"
    assert record.key is Ping
    assert record.target is create
    assert record.message_param == "cmd"
    assert dict(record.bound) == {"repo": "r"}
    assert record.is_async
    assert record.location.endswith(f"test_handlers.py:{create.__code__.co_firstlineno}")
    assert str(record) == f"{record.name} ({record.location})"
    with pytest.raises(TypeError):
        record.bound["repo"] = "other"  # type: ignore[index]
