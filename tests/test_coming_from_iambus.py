"""iambus names that pybus spells differently raise an error naming the pybus equivalent."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pybus import ComingFromIambus, Dispatcher


@dataclass(frozen=True)
class CreateUser:
    name: str


@dataclass(frozen=True)
class UserCreated:
    name: str


def test_dp_handle_names_execute_query_and_publish() -> None:
    with pytest.raises(ComingFromIambus, match=r"await dp\.execute\(command\), await dp\.query\(query\)"):
        Dispatcher().handle(CreateUser("ada"), wait_for_response=True)


@pytest.mark.parametrize(
    ("option", "answer"),
    [("listen_for_signals", r"await dp\.serve\(\) handles"), ("engine_workers", r"Dispatcher\(workers=4")],
)
def test_iambus_dispatcher_options_name_the_pybus_ones(option: str, answer: str) -> None:
    with pytest.raises(ComingFromIambus, match=answer):
        Dispatcher(**{option: True})  # type: ignore[arg-type]


def test_an_unknown_option_is_still_a_type_error() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        Dispatcher(colour="red")  # type: ignore[arg-type]


def test_response_event_says_returned_values_are_published() -> None:
    async def create(cmd: CreateUser) -> UserCreated:
        return UserCreated(cmd.name)

    with pytest.raises(ComingFromIambus, match="drop response_event= and return the event"):
        Dispatcher().commands.bind(CreateUser, create, response_event=UserCreated)


@pytest.mark.parametrize(
    ("name", "answer"),
    [
        ("AbstractHandler", "EventCollector"),
        ("EventHandlerMap", "register"),
        ("RequestHandlerMap", "commands.register"),
    ],
)
def test_iambus_classes_name_the_pybus_way(name: str, answer: str) -> None:
    with pytest.raises(ImportError, match=f"pybus.{name} is iambus's; in pybus: .*{answer}"):
        exec(f"from pybus import {name}")
    import pybus

    assert not hasattr(pybus, "NoSuchName")


@pytest.mark.parametrize(
    ("router", "call"), [("events", "publish"), ("commands", "execute"), ("queries", "query")]
)
def test_router_handle_names_the_dispatcher_call(router: str, call: str) -> None:
    with pytest.raises(ComingFromIambus, match=rf"Use await dp\.{call}\("):
        getattr(Dispatcher(), router).handle("on startup")
