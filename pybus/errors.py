"""The exceptions pybus raises.

Every error derives from `PyBusError`, builds its own message in `__init__`
and says what happened and what to do instead::

    PyBusError
    ├── ImproperlyConfigured          a registration that cannot work
    │   ├── HandlerSignatureError     the handler cannot be called as registered
    │   └── HandlerAlreadyRegistered  a second handler for a command or query
    ├── DispatcherFrozen              registration after start()
    ├── DispatcherNotStarted          execute/query/publish before start()
    ├── HandlerNotFound               no handler for the message (also a LookupError)
    ├── CascadeDepthExceeded          follow-up events nested past the limit
    ├── QueueFull                     send_nowait() on a full engine queue
    ├── DispatcherClosed              a send (or call) after stop()
    ├── InvalidMessage                a class, None or an unhashable key given as a message (TypeError)
    ├── ForeignEventLoop              used from a second event loop or thread (RuntimeError)
    ├── WouldDeadlock                 stop() or join() awaited by a background handling (RuntimeError)
    ├── ProviderError                 a provider generator that does not yield exactly once
    ├── TransportError                the broker could not be reached or refused a command
    ├── DecodeError                   a transport delivered bytes that are no known message
    └── TrackingTimeout               a tracked session's work did not finish (also a TimeoutError)

A handler's own exception is never wrapped: it reaches the caller of
`execute`/`query` unchanged, and event handler failures are raised together
as an `ExceptionGroup`.
"""

from __future__ import annotations

from typing import Literal

Kind = Literal["event", "command", "query"]

#: How a user sends a message of each kind, for hints in error messages.
CALLS: dict[Kind, str] = {
    "event": "dp.publish()",
    "command": "dp.execute()",
    "query": "dp.query()",
}

#: The dispatcher attribute holding the router of each kind.
ROUTERS: dict[Kind, str] = {
    "event": "events",
    "command": "commands",
    "query": "queries",
}


def key_name(key: object) -> str:
    """Name a message key for people: a class by its qualified name, a string quoted."""
    if isinstance(key, type):
        # A class defined inside a function is named from that function on.
        return key.__qualname__.rpartition("<locals>.")[2]
    return repr(key)


def message_key(message: object) -> object:
    """The key a message is routed by: the string itself, or its class."""
    return message if isinstance(message, str) else type(message)


def whole_number(name: str, value: object, minimum: int) -> int:
    """`value` when it is an int >= `minimum` (not a bool); else `ImproperlyConfigured` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ImproperlyConfigured(f"{name} must be a whole number >= {minimum}, not {value!r}")
    return value


def drain_seconds(name: str, value: object) -> float | None:
    """`value` as seconds when it is None (no limit) or a number >= 0; else `ImproperlyConfigured`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or value < 0:
        raise ImproperlyConfigured(
            f"{name} must be None (no limit) or a number of seconds >= 0, not {value!r}"
        )
    return None if value == float("inf") else float(value)


def with_article(kind: Kind) -> str:
    """'an event', 'a command', 'a query'."""
    return f"an {kind}" if kind == "event" else f"a {kind}"


class PyBusError(Exception):
    """Base class of every error pybus raises."""


class ComingFromIambus(PyBusError, ImportError):
    """An iambus name that pybus spells differently; the text names the pybus equivalent
    (see docs/coming-from-iambus.md). An ImportError too, so that `from pybus import
    AbstractHandler` shows the text."""


class ImproperlyConfigured(PyBusError):
    """A registration or a setting that cannot work, reported when it is made."""


class HandlerSignatureError(ImproperlyConfigured):
    """The handler's parameters do not fit the registration.

    Raised by `bind`/`register`, never at call time.
    """

    def __init__(self, kind: Kind, key: object, handler: str, reason: str) -> None:
        self.kind = kind
        self.key = key
        self.handler = handler
        self.reason = reason
        super().__init__(f"Cannot register {handler} as the {kind} handler for {key_name(key)}: {reason}")


class HandlerAlreadyRegistered(ImproperlyConfigured):
    """A command or query key already has its one handler, or an event handler was
    registered twice for the same event."""

    def __init__(self, kind: Kind, key: object, existing: str, new: str) -> None:
        self.kind = kind
        self.key = key
        self.existing = existing
        self.new = new
        if kind == "event":
            text = (
                f"{new} is already registered for event {key_name(key)}; "
                "it would run twice for every event: remove the second registration"
            )
        else:
            text = (
                f"The {kind} {key_name(key)} already has a handler, {existing}; "
                f"a {kind} has exactly one handler: remove the registration of {new} "
                "or give it its own message class"
            )
        super().__init__(text)


class DispatcherFrozen(PyBusError):
    """A handler was registered after `start()` froze the handler maps."""

    def __init__(self, kind: Kind, key: object, handler: str, *, target: str | None = None) -> None:
        self.kind = kind
        self.key = key
        self.handler = handler
        where = target or f"{kind} {key_name(key)}"
        what = "every handler" if target is None else "it"
        super().__init__(
            f"Cannot register {handler} for {where}: the dispatcher "
            f"has started and its handler maps are frozen; register {what} before dp.start()"
        )


class DispatcherNotStarted(PyBusError):
    """A message was sent before `start()`."""

    def __init__(self, kind: Kind, message: object) -> None:
        self.kind = kind
        self.message = message
        super().__init__(
            f"Cannot handle {kind} {key_name(message_key(message))}: the dispatcher is not started; "
            "call dp.start() (or enter `async with dp:`) once every handler is registered"
        )


class HandlerNotFound(PyBusError, LookupError):
    """No handler is registered for the message under the kind it was sent as.

    `registered_as` names the kind the key is registered under, when it is.
    """

    def __init__(self, kind: Kind, key: object, registered_as: Kind | None = None) -> None:
        self.kind = kind
        self.key = key
        self.registered_as = registered_as
        name = key_name(key)
        if registered_as is not None:
            hint = f"it is registered as {with_article(registered_as)}: use {CALLS[registered_as]}"
        else:
            hint = f"register one with @dp.{ROUTERS[kind]}.register({name})"
        super().__init__(f"No handler registered for {kind} {name}; {hint}")


class HandlerFailures(ExceptionGroup[Exception]):
    """The failures of the event handlers one `publish` ran, follow-ups included (or, from
    `execute`/`query`, of the follow-ups of a handling that succeeded), each with a note
    naming its handler. An `ExceptionGroup`: handle it with `except*`. `handled` is the
    message whose handling raised it. A background handling gives each failure to the
    error hook on its own (see `each_failure`)."""

    handled: object = None


def handler_failures(message: object, summary: str, failures: list[Exception]) -> HandlerFailures:
    group = HandlerFailures(summary, failures)
    group.handled = message
    return group


def each_failure(error: BaseException, message: object) -> list[BaseException]:
    """The handlers' own exceptions when `error` is the `HandlerFailures` of the handling of
    `message`; else `[error]`. A handler's own exception is one failure, never split: an
    `ExceptionGroup` it raised, or the `HandlerFailures` of a `publish` it awaited (which
    names another message)."""
    if isinstance(error, HandlerFailures) and error.handled is message:
        return list(error.exceptions)
    return [error]


class CascadeDepthExceeded(PyBusError, RecursionError):
    """Follow-up events nested deeper than the dispatcher's `max_cascade_depth`.

    Usually a cycle: handlers that keep returning events that lead back to them.
    Failures of handlers that ran before the limit was hit are attached as the
    `__cause__` (an `ExceptionGroup`), so none is lost.
    """

    def __init__(self, limit: int, key: object) -> None:
        self.limit = limit
        self.key = key
        super().__init__(
            f"Follow-up event {key_name(key)} would be published at depth {limit + 1}, "
            f"past max_cascade_depth={limit}; handlers probably form a cycle that keeps "
            "returning events: break the cycle, or raise Dispatcher(max_cascade_depth=...) "
            "if the chain is really that long"
        )


class QueueFull(PyBusError):
    """`send_nowait` found the engine's queue at capacity."""

    def __init__(self, kind: Kind, capacity: int) -> None:
        self.kind = kind
        self.capacity = capacity
        super().__init__(
            f"The {kind} queue is full (it holds {capacity} message{'' if capacity == 1 else 's'} at most); "
            f"await dp.{ROUTERS[kind]}.send() to wait for room, or raise Dispatcher(queue_size=...)"
        )


class DispatcherClosed(PyBusError):
    """The dispatcher was stopped (or is stopping); it takes no new messages.

    `kind` and `message` name what was refused; `text` replaces the default
    explanation for refusals that are not a message (start, a Singleton).
    """

    def __init__(self, kind: Kind | None, message: object = None, *, text: str | None = None) -> None:
        self.kind = kind
        self.message = message
        if text is None:
            text = (
                f"Cannot take {kind} {key_name(message_key(message))}: the dispatcher is stopping or stopped "
                "and takes no new messages; send before dp.stop(), or use a new Dispatcher"
            )
        super().__init__(text)


class InvalidMessage(PyBusError, TypeError):
    """What was passed where a message (or an ordering key) goes cannot be one."""

    def __init__(self, call: str, given: object, *, key: bool = False) -> None:
        self.call = call
        self.given = given
        if key:
            text = (
                f"{call} got key={given!r}, which is not hashable; an ordering key is compared by "
                "equality and hashed, so pass a string, a number or a tuple"
            )
        elif isinstance(given, type):
            name = key_name(given)
            text = (
                f"{call} got the class {name}, not a message; pass an instance, as in "
                f"{call.removesuffix('()')}({name}(...))"
            )
        else:
            text = f"{call} got {given!r}, which is not a message; pass the message to handle"
        super().__init__(text)


class ForeignEventLoop(PyBusError, RuntimeError):
    """The dispatcher was used from an event loop (or a thread) other than the one it runs in."""

    def __init__(self, action: str) -> None:
        self.action = action
        super().__init__(
            f"Cannot {action}: this dispatcher runs in another event loop (it started its workers or "
            "Singletons there), and its work would never be done in this one; a dispatcher serves one "
            "event loop: build one per loop (per test, per thread), and stop it before its loop ends"
        )


class WouldDeadlock(PyBusError, RuntimeError):
    """`stop()` or `join()` was awaited from inside a background handling of the same dispatcher."""

    def __init__(self, call: str) -> None:
        self.call = call
        super().__init__(
            f"{call} cannot be awaited from inside a background handling of the same dispatcher: it "
            "waits for every background handling to finish, this one included, so it would wait "
            "forever; await it in the code that runs the dispatcher (after serve() returns, in an "
            "application's shutdown), and from a handler signal that code, e.g. with an asyncio.Event"
        )


class ProviderError(PyBusError):
    """A provider generator did not yield exactly once."""

    def __init__(self, provider: str, problem: str) -> None:
        self.provider = provider
        super().__init__(
            f"{provider} {problem}; a provider generator yields its value exactly once, "
            "and its code after the yield is the teardown"
        )


class TransportError(PyBusError):
    """The broker could not be reached or refused a command; the cause is chained.

    `maybe_written` is True when a send failed after its command may have reached
    the broker: the message may exist and be delivered. It is False when nothing
    was written (and for every error that is not about a send).
    """

    def __init__(self, *args: object, maybe_written: bool = False) -> None:
        super().__init__(*args)
        self.maybe_written = maybe_written


class DecodeError(PyBusError):
    """A transport delivered bytes that are not a message this process knows."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(
            f"Cannot decode a message named {name!r}: {reason}; it is dead-lettered, and the "
            "producer and this worker should agree on the route's name and the message's fields"
        )


#: How many lines of recent activity a `TrackingTimeout` shows.
ACTIVITY_LINES = 200


class TrackingTimeout(PyBusError, TimeoutError):
    """A tracked session's work did not finish within its timeout."""

    def __init__(self, timeout: float, outstanding: list[str], activity: list[str]) -> None:
        self.timeout = timeout
        self.outstanding = outstanding
        self.activity = activity
        lines = [
            f"The tracked session's work did not finish within {timeout} s; "
            f"{len(outstanding)} handling(s) still outstanding:",
            *(f"  {line}" for line in outstanding),
            f"Last activity (at most {ACTIVITY_LINES} lines, oldest first):",
            *(f"  {line}" for line in activity),
            "Raise track(dp, timeout=...) if the work is slow, or look for a handler that never returns.",
        ]
        super().__init__("\n".join(lines))
