"""The handling context: when it is tracked, what `current_context()` returns, ids along
cascades, background sends and transports, `HandlingContext` parameters, and the
error hook running in the failed handling's context."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

import pytest

from pybus import (
    CallNext,
    Dispatcher,
    DispatcherFrozen,
    HandlerSignatureError,
    HandlingContext,
    ImproperlyConfigured,
    Retry,
    current_context,
)
from pybus.observer import Observer
from pybus.testing import track
from pybus.transport import InMemoryBroker, InMemoryTransport
from tests.consuming import consuming, until


@dataclass(frozen=True)
class Open:
    n: int


@dataclass(frozen=True)
class Opened:
    n: int


@dataclass(frozen=True)
class Noted:
    n: int


@dataclass(frozen=True)
class Archived:
    n: int


def seen_contexts() -> tuple[list[HandlingContext], Any]:
    """A list, and a handler body that appends the current context to it."""
    found: list[HandlingContext] = []

    def remember() -> None:
        context = current_context()
        assert context is not None
        found.append(context)

    return found, remember


async def test_tracking_is_off_unless_something_uses_it_and_current_context_is_none() -> None:
    dp = Dispatcher()
    inside: list[HandlingContext | None] = []

    @dp.commands.register(Open)
    async def open_(cmd: Open) -> None:
        inside.append(current_context())

    async with dp:
        assert not dp.tracks_context
        await dp.execute(Open(1))
    assert inside == [None]
    assert current_context() is None


async def test_with_tracking_on_the_handler_sees_its_context_and_nothing_outside_does() -> None:
    dp = Dispatcher(context=True)
    found, remember = seen_contexts()

    @dp.commands.register(Open)
    async def open_(cmd: Open) -> None:
        remember()

    async with dp:
        assert dp.tracks_context
        await dp.execute(Open(1))
        assert current_context() is None
    (context,) = found
    assert (context.kind, context.key, context.handler, context.attempt) == ("command", Open, "open_", 1)
    assert context.location.endswith(f"test_context.py:{open_.__code__.co_firstlineno}")
    assert context.correlation_id == context.message_id
    assert context.causation_id is None
    assert (context.delivery, dict(context.headers)) == (1, {})
    assert str(context) == "command Open -> open_"


async def _noop(message: object, call_next: CallNext) -> object:
    return await call_next(message)


async def _takes_context(event: Noted, context: HandlingContext) -> None:
    pass


def _tracked_by(what: str) -> Dispatcher:
    dp = Dispatcher(
        middleware=[_noop] if what == "dispatcher middleware" else (),
        retry=Retry() if what == "dispatcher retry" else None,
        transport=InMemoryTransport() if what == "a route" else None,
    )

    async def plain(cmd: Open) -> None:
        pass

    if what == "router middleware":
        dp.events.add_middleware(_noop)
    if what == "router retry":
        dp.queries.retry = Retry()
    dp.commands.bind(
        Open,
        plain,
        middleware=[_noop] if what == "registration middleware" else (),
        retry=Retry() if what == "registration retry" else None,
    )
    if what == "a HandlingContext parameter":
        dp.events.bind(Noted, _takes_context)
    if what == "a route":
        dp.route(Archived)
    return dp


@pytest.mark.parametrize(
    "what",
    [
        "dispatcher middleware",
        "router middleware",
        "registration middleware",
        "dispatcher retry",
        "router retry",
        "registration retry",
        "a route",
        "a HandlingContext parameter",
    ],
)
async def test_each_thing_that_uses_the_context_turns_tracking_on(what: str) -> None:
    dp = _tracked_by(what)
    assert not dp.tracks_context  # decided at start
    async with dp:
        assert dp.tracks_context
    assert not Dispatcher().tracks_context


async def test_an_observer_or_tracked_session_turns_tracking_on_while_attached() -> None:
    dp = Dispatcher()
    found, remember = seen_contexts()

    @dp.commands.register(Open)
    async def open_(cmd: Open) -> None:
        if current_context() is not None:
            remember()

    async with dp:
        async with track(dp) as session:
            assert dp.tracks_context
            await dp.execute(Open(1))
        assert session.handled.of_type(Open) == [Open(1)]
        assert not dp.tracks_context
        await dp.execute(Open(2))
        dp.attach_observer(Observer())
        await dp.execute(Open(3))
        dp.detach_observer()
    assert [context.key for context in found] == [Open, Open]


async def test_correlation_and_causation_along_a_cascade_of_three_levels() -> None:
    dp = Dispatcher(context=True)
    found: dict[str, list[HandlingContext]] = {}

    def remember(name: str) -> None:
        context = current_context()
        assert context is not None
        found.setdefault(name, []).append(context)

    @dp.commands.register(Open)
    async def open_(cmd: Open) -> Opened:
        remember("open")
        return Opened(cmd.n)

    @dp.events.register(Opened)
    async def note(event: Opened) -> Noted:
        remember("note")
        return Noted(event.n)

    @dp.events.register(Opened)
    async def also(event: Opened) -> None:
        remember("also")

    @dp.events.register(Noted)
    async def archive(event: Noted) -> Archived:
        remember("archive")
        return Archived(event.n)

    @dp.events.register(Archived)
    async def done(event: Archived) -> None:
        remember("done")

    async with dp:
        await dp.execute(Open(1))
        await dp.execute(Open(2))
    first = {name: contexts[0] for name, contexts in found.items()}
    root = first["open"]
    assert root.causation_id is None
    # Every handling of the tree has the root's id as its correlation id ...
    assert {context.correlation_id for context in first.values()} == {root.message_id}
    # ... each is caused by the message whose handling returned it ...
    assert first["note"].causation_id == root.message_id
    assert first["archive"].causation_id == first["note"].message_id
    assert first["done"].causation_id == first["archive"].message_id
    # ... and every handler of one event sees the same message id.
    assert first["also"].message_id == first["note"].message_id
    assert len({context.message_id for context in first.values()}) == 4
    # A new top-level call starts a new correlation.
    second = found["open"][1]
    assert second.correlation_id == second.message_id != root.message_id
    assert found["done"][1].correlation_id == second.message_id


async def test_messages_sent_to_the_background_and_nested_calls_are_caused_by_the_sender() -> None:
    dp = Dispatcher(context=True)
    found: dict[str, HandlingContext] = {}

    def remember(name: str) -> None:
        context = current_context()
        assert context is not None
        found[name] = context

    @dp.commands.register(Open)
    async def open_(cmd: Open) -> None:
        remember("open")
        await dp.send(Noted(cmd.n))
        await dp.publish(Archived(cmd.n))

        async def later() -> None:
            remember("task")

        await asyncio.create_task(later())

    @dp.events.register(Noted)
    async def note(event: Noted) -> None:
        remember("background")

    @dp.events.register(Archived)
    async def archive(event: Archived) -> None:
        remember("nested")

    async with dp:
        await dp.execute(Open(1))
        await dp.join()
    root = found["open"]
    for name in ("background", "nested"):
        assert found[name].correlation_id == root.message_id, name
        assert found[name].causation_id == root.message_id, name
        assert found[name].message_id != root.message_id, name
    # A task started by a handler runs in the handler's context.
    assert found["task"] == root


async def test_concurrent_event_handlers_each_see_their_own_context() -> None:
    dp = Dispatcher(context=True, concurrent_events=True)
    seen: dict[str, str] = {}

    async def make(name: str) -> Any:
        async def handler(event: Noted) -> None:
            await asyncio.sleep(0)
            context = current_context()
            assert context is not None
            seen[name] = context.handler

        handler.__qualname__ = name
        return handler

    for name in ("first", "second", "third"):
        dp.events.bind(Noted, await make(name))
    async with dp:
        await dp.publish(Noted(1))
    assert seen == {"first": "first", "second": "second", "third": "third"}


async def test_a_handling_context_parameter_receives_the_current_context() -> None:
    dp = Dispatcher()
    got: list[HandlingContext] = []

    @dp.commands.register(Open)
    async def open_(cmd: Open, context: HandlingContext) -> Opened:
        got.append(context)
        return Opened(cmd.n)

    def first_param(context: HandlingContext, event: Opened) -> None:  # the message goes by name
        assert event == Opened(1)
        got.append(context)

    # The type checker reads the first parameter as the message's; at runtime the
    # HandlingContext parameter is recognised and the message is passed by name.
    dp.events.bind(Opened, first_param)  # type: ignore[arg-type]

    class Optional:
        async def handle(self, event: Opened, context: HandlingContext | None = None) -> None:
            assert context is not None
            got.append(context)

    dp.events.bind(Opened, Optional)
    async with dp:
        assert dp.tracks_context  # a parameter asked for it
        await dp.execute(Open(1))
    command, by_name, in_class = got
    assert command.handler == "open_"
    assert (by_name.handler, in_class.handler) == ("first_param", "Optional")
    assert by_name.causation_id == command.message_id == in_class.causation_id


def test_a_handling_context_parameter_that_cannot_be_passed_is_refused() -> None:
    dp = Dispatcher()

    async def bound(cmd: Open, context: HandlingContext) -> None:
        pass

    with pytest.raises(HandlerSignatureError, match=r"annotated HandlingContext.*also bound"):
        dp.commands.bind(Open, bound, context=object())

    async def positional(cmd: Open, context: HandlingContext, /) -> None:
        pass

    with pytest.raises(HandlerSignatureError, match="cannot be passed by keyword"):
        dp.commands.bind(Open, positional)


def test_a_class_handler_takes_the_context_in_handle_not_in_init() -> None:
    class Handler:
        def __init__(self, context: HandlingContext) -> None:
            self.context = context

        async def handle(self, cmd: Open) -> None:
            pass

    with pytest.raises(HandlerSignatureError, match=r"not to __init__: take it as a parameter of handle\(\)"):
        Dispatcher().commands.bind(Open, Handler)


async def test_overriding_with_a_handler_that_takes_the_context_needs_a_tracking_dispatcher() -> None:
    dp = Dispatcher()

    @dp.commands.register(Open)
    async def open_(cmd: Open) -> None:
        pass

    async def fake(cmd: Open, context: HandlingContext) -> None:
        pass

    async with dp:
        with pytest.raises(ImproperlyConfigured, match="Dispatcher\\(context=True\\)"):
            with dp.override_handler(Open, fake):
                pass

    tracked = Dispatcher(context=True)
    tracked.commands.bind(Open, open_)
    got: list[HandlingContext] = []

    async def recording(cmd: Open, context: HandlingContext) -> None:
        got.append(context)

    async with tracked:
        with tracked.override_handler(Open, recording):
            await tracked.execute(Open(1))
    assert [context.handler for context in got] == ["recording"]


async def test_the_error_hook_hears_each_failing_event_handler_in_its_own_context() -> None:
    heard: list[tuple[str, str | None]] = []

    def on_error(error: BaseException, message: object) -> None:
        context = current_context()
        heard.append((str(error), context.handler if context else None))

    dp = Dispatcher(context=True, on_error=on_error)

    @dp.events.register(Noted)
    async def fine(event: Noted) -> None:
        pass

    @dp.events.register(Noted)
    async def broken(event: Noted) -> None:
        raise ValueError("broken failed")

    @dp.events.register(Noted)
    async def worse(event: Noted) -> None:
        raise KeyError("worse failed")

    async with dp:
        await dp.send(Noted(1))
        await dp.join()
    assert sorted(heard) == [("'worse failed'", "worse"), ("broken failed", "broken")]


def test_a_context_built_by_hand_for_a_unit_test() -> None:
    context = HandlingContext("command", Open, "open_", message_id="m1", headers={"tenant": "a"})
    assert (context.message_id, context.correlation_id, context.causation_id) == ("m1", "m1", None)
    assert (context.attempt, context.delivery, dict(context.headers)) == (1, 1, {"tenant": "a"})
    assert context == HandlingContext("command", Open, "open_", message_id="m1", headers={"tenant": "a"})
    assert context != HandlingContext("command", Open, "open_", message_id="m2")
    assert (
        len({context, HandlingContext("command", Open, "open_", message_id="m1", headers={"tenant": "a"})})
        == 1
    )
    assert "message_id='m1'" in repr(context)
    fresh = HandlingContext("event", "started", "on_start", attempt=2, delivery=3)
    assert fresh.correlation_id == fresh.message_id
    assert (fresh.attempt, fresh.delivery) == (2, 3)


@dataclass(frozen=True)
class Shipped:
    n: int


async def test_routed_messages_carry_the_ids_and_headers_across_the_transport() -> None:
    broker = InMemoryBroker()
    shop = Dispatcher(transport=InMemoryTransport(broker))
    shop.route(Shipped)
    shop.add_header_source(lambda headers: headers.update(tenant="acme"))
    sent: list[HandlingContext] = []

    @shop.commands.register(Open)
    async def open_(cmd: Open) -> Shipped:
        context = current_context()
        assert context is not None
        sent.append(context)
        return Shipped(cmd.n)  # a follow-up that goes to the transport

    worker = Dispatcher(transport=InMemoryTransport(broker, group="shipping"))
    worker.route(Shipped)
    got: list[HandlingContext] = []

    @worker.events.register(Shipped)
    async def ship(event: Shipped) -> Noted:
        context = current_context()
        assert context is not None
        got.append(context)
        return Noted(event.n)

    @worker.events.register(Noted)
    async def note(event: Noted) -> None:
        context = current_context()
        assert context is not None
        got.append(context)

    async with shop, consuming(worker) as consumer:
        await shop.execute(Open(1))
        await until(lambda: consumer.handled == 1)
    (root,) = sent
    shipped, noted = got
    assert shipped.correlation_id == root.message_id
    assert shipped.causation_id == root.message_id
    assert dict(shipped.headers) == {"tenant": "acme"}
    # The local follow-up of a delivered message keeps its delivery's correlation and headers.
    assert noted.correlation_id == root.message_id
    assert noted.causation_id == shipped.message_id
    assert dict(noted.headers) == {"tenant": "acme"}
    assert noted.delivery == shipped.delivery == 1


class Recording:
    """An instrumentation that records what it is told, as (event, kind, key, ids) lines."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, object, str]] = []

    def started(self, kind: Any, message: object, ids: Any) -> object:
        context = current_context()
        self.lines.append(("started", kind, type(message), str(ids[0])))
        assert context is None or context.message_id != str(ids[0])  # the caller's, not yet its own
        return (kind, type(message), ids)

    def finished(self, token: Any, error: BaseException | None) -> None:
        kind, key, _ = token
        self.lines.append(("finished", kind, key, type(error).__name__ if error else "ok"))


async def test_an_instrumentation_is_told_of_each_message_and_turns_the_fast_path_off() -> None:
    dp = Dispatcher()
    recording = Recording()
    dp.instrumentation = recording

    @dp.commands.register(Open)
    async def open_(cmd: Open) -> Opened:
        if cmd.n < 0:
            raise ValueError("negative")
        return Opened(cmd.n)

    @dp.events.register(Opened)
    async def note(event: Opened) -> Noted:
        return Noted(event.n)

    @dp.events.register(Noted)
    async def noted(event: Noted) -> None:
        pass

    async with dp:
        assert dp.tracks_context
        with pytest.raises(DispatcherFrozen):
            dp.instrumentation = None
        await dp.execute(Open(1))
        with pytest.raises(ValueError, match="negative"):
            await dp.execute(Open(-1))
        await dp.publish(Noted(2))
    steps = [
        (step, kind, key, last if step == "finished" else "") for step, kind, key, last in recording.lines
    ]
    assert steps == [
        ("started", "command", Open, ""),
        ("started", "event", Opened, ""),
        ("finished", "event", Opened, "ok"),
        ("started", "event", Noted, ""),
        ("finished", "event", Noted, "ok"),
        ("finished", "command", Open, "ok"),  # a top-level call ends after its follow-ups
        ("started", "command", Open, ""),
        ("finished", "command", Open, "ValueError"),
        ("started", "event", Noted, ""),
        ("finished", "event", Noted, "ok"),
    ]


async def test_header_sources_are_functions_added_before_start() -> None:
    dp = Dispatcher()
    with pytest.raises(ImproperlyConfigured, match=r"takes a function f\(headers\)"):
        dp.add_header_source("tenant")  # type: ignore[arg-type]

    async def awaited(headers: dict[str, str]) -> None:
        headers["tenant"] = "acme"

    with pytest.raises(ImproperlyConfigured, match="it is not awaited, so it cannot be async"):
        dp.add_header_source(awaited)  # type: ignore[arg-type]
    async with dp:
        with pytest.raises(DispatcherFrozen):
            dp.add_header_source(lambda headers: None)


SHARED = ValueError("the same exception object, raised by every handling")


async def test_an_exception_object_raised_again_by_another_handling_is_reported_in_that_one() -> None:
    heard: list[tuple[object, str | None]] = []

    def on_error(error: BaseException, message: object) -> None:
        context = current_context()
        heard.append((message, context.message_id if context else None))

    ids: dict[int, str] = {}
    dp = Dispatcher(context=True, on_error=on_error)

    @dp.events.register(Noted)
    async def fails(event: Noted) -> None:
        context = current_context()
        assert context is not None
        ids[event.n] = context.message_id
        raise SHARED

    async with dp:
        with pytest.raises(ExceptionGroup):
            await dp.publish(Noted(0))  # raised to the caller: marked with this handling
        for n in (1, 2):
            await dp.send(Noted(n))
            await dp.join()
    assert heard == [(Noted(1), ids[1]), (Noted(2), ids[2])]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_process_makes_message_ids_of_its_own() -> None:
    from pybus.context import ident, new_number

    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write one id and leave at once
        os.write(writer, ident(new_number()).encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(pid, 0)
    with os.fdopen(reader) as pipe:
        child = pipe.read()
    parent = ident(new_number())
    assert child.rpartition("-")[0] != parent.rpartition("-")[0]


async def test_headers_are_strings_copied_when_sent() -> None:
    broker = InMemoryBroker()
    shop = Dispatcher(transport=InMemoryTransport(broker))
    shop.route(Shipped)
    kept: list[dict[str, Any]] = []

    def source(headers: dict[str, Any]) -> None:
        headers["tenant"] = "acme"
        kept.append(headers)

    shop.add_header_source(source)
    async with shop:
        await shop.publish(Shipped(1))
        kept[0]["tenant"] = "changed after the send"  # the envelope has its own copy
        (envelope,) = broker.streams[next(iter(broker.streams))]
        assert dict(envelope.headers) == {"tenant": "acme"}
        shop._routing.outgoing.append(lambda headers: headers.update(retries=3))  # type: ignore[call-overload]
        with pytest.raises(ImproperlyConfigured, match=r"'retries': 3 .*headers are strings"):
            await shop.publish(Shipped(2))
    assert shop.transport is not None
    await shop.transport.aclose()


async def test_an_error_escaping_a_nested_call_is_reported_in_the_handling_that_let_it_escape() -> None:
    heard: list[tuple[object, str | None]] = []

    def on_error(error: BaseException, message: object) -> None:
        context = current_context()
        heard.append((message, context.handler if context else None))

    dp = Dispatcher(context=True, on_error=on_error)

    @dp.commands.register(Open)
    async def outer(cmd: Open) -> None:
        await dp.execute(Archived(cmd.n))  # its ValueError escapes this handler too

    @dp.commands.register(Archived)
    async def inner(cmd: Archived) -> None:
        raise ValueError("inner failed")

    async with dp:
        await dp.send(Open(1))
        await dp.join()
    assert heard == [(Open(1), "outer")]


async def test_the_hand_off_of_a_routed_follow_up_names_its_key() -> None:
    class Refusing(InMemoryTransport):
        async def send(self, envelope: Any) -> str:
            raise ConnectionError("the broker is away")

    heard: list[tuple[str, object, str]] = []

    def on_error(error: BaseException, message: object) -> None:
        context = current_context()
        assert context is not None
        heard.append((context.kind, context.key, context.handler))

    shop = Dispatcher(transport=Refusing(), on_error=on_error)
    shop.route(Shipped)
    seen_by_source: list[tuple[object, str | None]] = []

    def source(headers: dict[str, str]) -> None:
        context = current_context()
        assert context is not None
        seen_by_source.append((context.key, context.causation_id))

    shop.add_header_source(source)

    @shop.commands.register(Open)
    async def open_(cmd: Open) -> Shipped:
        return Shipped(cmd.n)

    async with shop:
        await shop.send(Open(1))
        await shop.join()
    assert heard == [("event", Shipped, "transport")]
    ((key, cause),) = seen_by_source
    assert key is Shipped
    assert cause is not None


def test_an_annotation_that_cannot_be_resolved_is_named_in_the_error() -> None:
    from pybus import HandlingContext as Ctx  # a local alias: "Ctx" cannot be resolved later

    async def handler(cmd: Open, context: Ctx) -> None:
        pass

    handler.__annotations__["context"] = "Ctx"  # as `from __future__ import annotations` leaves it
    with pytest.raises(HandlerSignatureError) as raised:
        Dispatcher().commands.bind(Open, handler)
    (note,) = raised.value.__notes__
    assert "'context' (NameError: name 'Ctx' is not defined) could not be resolved" in note


async def test_an_instrumentation_hears_a_follow_ups_handler_failures_as_its_outcome() -> None:
    dp = Dispatcher(on_error=lambda error, message: None)
    recording = Recording()
    dp.instrumentation = recording

    @dp.commands.register(Open)
    async def open_(cmd: Open) -> Opened:
        return Opened(cmd.n)

    @dp.events.register(Opened)
    async def broken(event: Opened) -> None:
        raise ValueError("follow-up failed")

    async with dp:
        with pytest.raises(ExceptionGroup):
            await dp.execute(Open(1))
    finished = [(key, outcome) for step, _, key, outcome in recording.lines if step == "finished"]
    assert finished == [(Opened, "HandlerFailures"), (Open, "HandlerFailures")]


async def test_an_instrumentation_that_fails_to_start_leaves_no_handling_unawaited() -> None:
    class Refusing(Recording):
        def started(self, kind: Any, message: object, ids: Any) -> object:
            raise RuntimeError("the tracer is broken")

    dp = Dispatcher()
    dp.instrumentation = Refusing()

    @dp.commands.register(Open)
    async def open_(cmd: Open) -> None:
        pass

    async with dp:
        with pytest.raises(RuntimeError, match="the tracer is broken"):
            await dp.execute(Open(1))
    # filterwarnings = error: a coroutine never awaited would fail this test.
