"""Every error's exact text: what happened and what to do."""

from __future__ import annotations

import pytest

from pybus import (
    CascadeDepthExceeded,
    DispatcherFrozen,
    DispatcherNotStarted,
    HandlerAlreadyRegistered,
    HandlerNotFound,
    HandlerSignatureError,
    ImproperlyConfigured,
    PyBusError,
)


class CreateUser:
    pass


def test_hierarchy() -> None:
    assert issubclass(ImproperlyConfigured, PyBusError)
    assert issubclass(HandlerSignatureError, ImproperlyConfigured)
    assert issubclass(HandlerAlreadyRegistered, ImproperlyConfigured)
    for error in (DispatcherFrozen, DispatcherNotStarted, HandlerNotFound, CascadeDepthExceeded):
        assert issubclass(error, PyBusError)
    assert issubclass(HandlerNotFound, LookupError)
    assert issubclass(CascadeDepthExceeded, RecursionError)


def test_handler_signature_error_text() -> None:
    error = HandlerSignatureError("command", CreateUser, "create_user", "parameter 'repo' has no value")
    assert str(error) == (
        "Cannot register create_user as the command handler for CreateUser: parameter 'repo' has no value"
    )
    assert (error.kind, error.key, error.handler) == ("command", CreateUser, "create_user")


def test_handler_already_registered_text_for_requests() -> None:
    error = HandlerAlreadyRegistered("query", CreateUser, "first (a.py:1)", "second (b.py:2)")
    assert str(error) == (
        "The query CreateUser already has a handler, first (a.py:1); a query has exactly one "
        "handler: remove the registration of second (b.py:2) or give it its own message class"
    )


def test_handler_already_registered_text_for_events() -> None:
    error = HandlerAlreadyRegistered("event", "on startup", "h (a.py:1)", "h (a.py:1)")
    assert str(error) == (
        "h (a.py:1) is already registered for event 'on startup'; it would run twice for "
        "every event: remove the second registration"
    )


def test_dispatcher_frozen_text() -> None:
    assert str(DispatcherFrozen("event", CreateUser, "late")) == (
        "Cannot register late for event CreateUser: the dispatcher has started and its handler "
        "maps are frozen; register every handler before dp.start()"
    )


def test_dispatcher_not_started_text() -> None:
    assert str(DispatcherNotStarted("command", CreateUser())) == (
        "Cannot handle command CreateUser: the dispatcher is not started; call dp.start() (or enter "
        "`async with dp:`) once every handler is registered"
    )
    assert "'on startup'" in str(DispatcherNotStarted("event", "on startup"))


@pytest.mark.parametrize(
    ("kind", "registered_as", "text"),
    [
        (
            "command",
            None,
            "No handler registered for command CreateUser; register one with "
            "@dp.commands.register(CreateUser)",
        ),
        (
            "command",
            "query",
            "No handler registered for command CreateUser; it is registered as a query: use dp.query()",
        ),
        (
            "query",
            "command",
            "No handler registered for query CreateUser; it is registered as a command: use dp.execute()",
        ),
        (
            "event",
            "command",
            "No handler registered for event CreateUser; it is registered as a command: use dp.execute()",
        ),
        (
            "command",
            "event",
            "No handler registered for command CreateUser; it is registered as an event: use dp.publish()",
        ),
    ],
)
def test_handler_not_found_text(kind: str, registered_as: str | None, text: str) -> None:
    error = HandlerNotFound(kind, CreateUser, registered_as=registered_as)  # type: ignore[arg-type]
    assert str(error) == text


def test_cascade_depth_exceeded_text() -> None:
    assert str(CascadeDepthExceeded(64, CreateUser)) == (
        "Follow-up event CreateUser would be published at depth 65, past max_cascade_depth=64; "
        "handlers probably form a cycle that keeps returning events: break the cycle, or raise "
        "Dispatcher(max_cascade_depth=...) if the chain is really that long"
    )
