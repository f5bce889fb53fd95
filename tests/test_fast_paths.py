"""The engines' fast paths and their general paths give the same outcome, for every kind of handler.

Each case builds the same application twice and runs the same call on both: once
as it is (the fast paths: `execute` handing over a handler proven to return
None, the written-out first level of a returned or collected follow-up, the
written-out Factory calls, publish's loop) and once with an `Observer` attached,
which sends every call down the general path. Results, the events the handlers
saw (in order), the exceptions (type, text, notes, groups) and the Factory
teardowns must be the same. The tracked paths are compared the same way, with
the ids each handling saw.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from pybus import (
    Dispatcher,
    EventCollector,
    Factory,
    HandlingContext,
    Singleton,
    UnitOfWork,
    current_context,
    handlers,
)
from pybus.observer import Observer

pytestmark = pytest.mark.asyncio


@dataclass(frozen=True)
class Cmd:
    n: int


@dataclass(frozen=True)
class Evt:
    n: int


@dataclass(frozen=True)
class Deeper:
    n: int


@dataclass(frozen=True)
class Unhandled:
    n: int


class Boom(Exception):
    pass


Build = Callable[[Dispatcher, list[object]], None]


def outcome(error: BaseException) -> object:
    """An exception as comparable data: its type, text, notes, cause and context and, for a
    group, its members."""
    inner = [outcome(e) for e in error.exceptions] if isinstance(error, BaseExceptionGroup) else None
    chained = [None if e is None else outcome(e) for e in (error.__cause__, error.__context__)]
    return (type(error).__name__, str(error), getattr(error, "__notes__", []), chained, inner)


Outcome = tuple[object, list[object]]


async def run_both(
    build: Build, message: object, *, publish: bool = False, **options: Any
) -> tuple[Outcome, Outcome]:
    """The outcome of one call on the application as it is, and on its general paths: its
    plans compiled without the written-out ones, an observer attached."""
    results: list[Outcome] = []
    for general in (False, True):
        seen: list[object] = []
        dp = Dispatcher(**options)
        build(dp, seen)
        handlers.WRITTEN_OUT = not general
        try:
            dp.start()
        finally:
            handlers.WRITTEN_OUT = True
        if general:
            dp.attach_observer(Observer())
        try:
            call = dp.publish(message) if publish else dp.execute(message)
            result: object = ("returned", await call)
        except BaseException as exc:
            result = ("raised", outcome(exc))
        finally:
            await dp.stop()
        results.append((result, seen))
    return results[0], results[1]


def events_seen_by(seen: list[object]) -> Callable[..., Any]:
    async def on_evt(event: Evt) -> None:
        seen.append(("evt", event))

    return on_evt


# -- the applications ----------------------------------------------------------


def returns_none(dp: Dispatcher, seen: list[object]) -> None:
    async def handle(cmd: Cmd) -> None:
        seen.append(("cmd", cmd))

    dp.commands.bind(Cmd, handle)


def raises(dp: Dispatcher, seen: list[object]) -> None:
    async def handle(cmd: Cmd) -> None:
        raise Boom(f"no {cmd.n}")

    dp.commands.bind(Cmd, handle)


def returns_an_event(dp: Dispatcher, seen: list[object]) -> None:
    async def handle(cmd: Cmd) -> Evt:
        return Evt(cmd.n)

    dp.commands.bind(Cmd, handle)
    dp.events.bind(Evt, events_seen_by(seen))


def returns_an_event_without_handler(dp: Dispatcher, seen: list[object]) -> None:
    async def handle(cmd: Cmd) -> Unhandled:
        return Unhandled(cmd.n)

    dp.commands.bind(Cmd, handle)


def returns_a_value(dp: Dispatcher, seen: list[object]) -> None:
    async def handle(cmd: Cmd) -> int:
        return cmd.n * 2

    dp.commands.bind(Cmd, handle)


def returns_sometimes(dp: Dispatcher, seen: list[object]) -> None:
    async def handle(cmd: Cmd) -> Evt | None:
        return Evt(cmd.n) if cmd.n else None

    dp.commands.bind(Cmd, handle)
    dp.events.bind(Evt, events_seen_by(seen))


def follow_up_fails(dp: Dispatcher, seen: list[object]) -> None:
    async def handle(cmd: Cmd) -> Evt:
        return Evt(cmd.n)

    async def first(event: Evt) -> None:
        seen.append(("first", event))
        raise Boom("first")

    async def second(event: Evt) -> Deeper:
        seen.append(("second", event))
        return Deeper(event.n)

    async def third(event: Evt) -> None:
        raise Boom("third")

    async def deeper(event: Deeper) -> None:
        seen.append(("deeper", event))
        raise Boom("deeper")

    dp.commands.bind(Cmd, handle)
    dp.events.bind(Evt, first)
    dp.events.bind(Evt, second)
    dp.events.bind(Evt, third)
    dp.events.bind(Deeper, deeper)


def follow_up_alone_fails(dp: Dispatcher, seen: list[object]) -> None:
    async def handle(cmd: Cmd) -> Evt:
        return Evt(cmd.n)

    async def alone(event: Evt) -> None:
        seen.append(("alone", event))
        raise Boom("alone")

    dp.commands.bind(Cmd, handle)
    dp.events.bind(Evt, alone)


def follow_up_alone_cancelled(dp: Dispatcher, seen: list[object]) -> None:
    async def handle(cmd: Cmd) -> Evt:
        return Evt(cmd.n)

    async def alone(event: Evt) -> None:
        raise asyncio.CancelledError

    dp.commands.bind(Cmd, handle)
    dp.events.bind(Evt, alone)


def follow_up_alone_cascade_fails(dp: Dispatcher, seen: list[object]) -> None:
    async def handle(cmd: Cmd) -> Evt:
        return Evt(cmd.n)

    async def alone(event: Evt) -> Deeper:
        return Deeper(event.n)

    async def deeper(event: Deeper) -> None:
        raise Boom("deeper, alone")

    dp.commands.bind(Cmd, handle)
    dp.events.bind(Evt, alone)
    dp.events.bind(Deeper, deeper)


def follow_up_cascades(dp: Dispatcher, seen: list[object]) -> None:
    async def handle(cmd: Cmd) -> Evt:
        return Evt(cmd.n)

    async def on_evt(event: Evt) -> Deeper:
        seen.append(("evt", event))
        return Deeper(event.n)

    async def on_deeper(event: Deeper) -> None:
        seen.append(("deeper", event))

    dp.commands.bind(Cmd, handle)
    dp.events.bind(Evt, on_evt)
    dp.events.bind(Deeper, on_deeper)


def follow_up_cancelled(dp: Dispatcher, seen: list[object]) -> None:
    async def handle(cmd: Cmd) -> Evt:
        return Evt(cmd.n)

    async def fails(event: Evt) -> None:
        raise Boom("before the cancellation")

    async def cancelled(event: Evt) -> None:
        raise asyncio.CancelledError

    async def never(event: Evt) -> None:
        seen.append(("never", event))

    dp.commands.bind(Cmd, handle)
    dp.events.bind(Evt, fails)
    dp.events.bind(Evt, cancelled)
    dp.events.bind(Evt, never)


def sync_handler(dp: Dispatcher, seen: list[object]) -> None:
    def handle(cmd: Cmd) -> Evt:
        return Evt(cmd.n)

    dp.commands.bind(Cmd, handle)
    dp.events.bind(Evt, events_seen_by(seen))


class ClassHandler:
    def __init__(self, seen: list[object]) -> None:
        self.seen = seen

    async def handle(self, cmd: Cmd) -> None:
        self.seen.append(("class", cmd))


def class_handler(dp: Dispatcher, seen: list[object]) -> None:
    dp.commands.bind(Cmd, ClassHandler, seen=seen)


class RefusingInit:
    def __init__(self) -> None:
        raise Boom("cannot make the handler")

    async def handle(self, cmd: Cmd) -> None:
        return None


def class_handler_init_fails(dp: Dispatcher, seen: list[object]) -> None:
    dp.commands.bind(Cmd, RefusingInit)


class Collecting(EventCollector):
    async def handle(self, cmd: Cmd) -> None:
        self.add_event(Evt(cmd.n))


class CollectingTwo(EventCollector):
    async def handle(self, cmd: Cmd) -> Evt:
        self.add_event(Evt(cmd.n))
        self.add_event(Deeper(cmd.n))
        return Evt(-cmd.n)


class CollectingThenFailing(EventCollector):
    async def handle(self, cmd: Cmd) -> None:
        self.add_event(Evt(cmd.n))
        raise Boom("after collecting")


class DumpsOne:
    async def handle(self, cmd: Cmd) -> None:
        return None

    def add_event(self, event: object) -> None:
        pass

    def dump_events(self) -> object:
        return Evt(1)  # one event, not a list: refused


class DumpsAsync(EventCollector):
    async def handle(self, cmd: Cmd) -> None:
        self.add_event(Evt(cmd.n))

    async def dump_events(self) -> list[object]:  # type: ignore[override]
        return super().dump_events()


def collector(cls: type) -> Build:
    def build(dp: Dispatcher, seen: list[object]) -> None:
        dp.commands.bind(Cmd, cls)
        dp.events.bind(Evt, events_seen_by(seen))

        async def on_deeper(event: Deeper) -> None:
            seen.append(("deeper", event))

        dp.events.bind(Deeper, on_deeper)

    build.__name__ = f"collector_{cls.__name__}"
    return build


def ready_collector(dp: Dispatcher, seen: list[object]) -> None:
    dp.commands.bind(Cmd, CollectingThenFailing())
    dp.events.bind(Evt, events_seen_by(seen))


def with_factory(make: Callable[..., Any], *, singleton: bool = False, ready: bool = False) -> Build:
    def build(dp: Dispatcher, seen: list[object]) -> None:
        bound: dict[str, object] = {}
        if ready:
            bound["ready"] = "ready"
        bound["value"] = Factory(make)
        if singleton:
            bound["single"] = Singleton(lambda: "single")

        async def handle(cmd: Cmd, value: object, **rest: object) -> None:
            seen.append(("handled", cmd, value, list(rest.items())))  # in the order passed

        dp.commands.bind(Cmd, handle, **bound)  # type: ignore[call-overload]

    build.__name__ = f"factory_{getattr(make, '__name__', 'callable')}_{singleton}_{ready}"
    return build


def make_value() -> str:
    return "made"


def make_failing() -> str:
    raise Boom("factory failed")


def make_awaitable() -> Any:
    async def later() -> str:
        return "awaited"

    return later()


async def make_async() -> str:
    return "async"


class Unit(UnitOfWork):
    pass


def make_unit() -> Any:  # not annotated as a unit: refused at the handling
    return Unit()


TEARDOWNS: list[str] = []


def make_scoped_unit() -> Iterator[Any]:
    TEARDOWNS.append("unit entered")
    yield Unit()
    TEARDOWNS.append("unit torn down")


async def make_async_unit() -> Any:
    return Unit()


def make_scoped() -> Iterator[str]:
    TEARDOWNS.append("entered")
    try:
        yield "scoped"
    finally:
        TEARDOWNS.append("torn down")


def make_scoped_failing_teardown() -> Iterator[str]:
    yield "scoped"
    raise Boom("teardown failed")


def make_yields_twice() -> Iterator[str]:
    yield "first"
    yield "second"


def make_never_yields() -> Iterator[str]:
    if False:
        yield "never"


async def make_async_scoped() -> AsyncIterator[str]:
    TEARDOWNS.append("async entered")
    yield "async scoped"
    TEARDOWNS.append("async torn down")


async def make_async_yields_twice() -> AsyncIterator[str]:
    yield "first"
    yield "second"


def factory_with_failing_handler(dp: Dispatcher, seen: list[object]) -> None:
    async def handle(cmd: Cmd, value: str) -> None:
        raise Boom(f"handler failed with {value}")

    dp.commands.bind(Cmd, handle, value=Factory(make_scoped))


def factory_positional(dp: Dispatcher, seen: list[object]) -> None:
    async def handle(cmd: Cmd, value: str) -> None:
        seen.append(("positional", value))

    dp.commands.bind(Cmd, handle, value=Factory(make_value))


def factory_then_entered(dp: Dispatcher, seen: list[object]) -> None:
    async def handle(cmd: Cmd, made: str, scoped: str) -> Evt:
        seen.append(("both", made, scoped))
        return Evt(cmd.n)

    dp.commands.bind(Cmd, handle, made=Factory(make_awaitable), scoped=Factory(make_scoped))
    dp.events.bind(Evt, events_seen_by(seen))


def transactional(func: Callable[..., Any]) -> Callable[..., Any]:
    """A common decorator: its wrapper reads the injected session by name."""

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs["session"].append("begin")
        return await func(*args, **kwargs)

    return wrapper


def decorated(provider: Callable[[], Any], name: str) -> Build:
    def build(dp: Dispatcher, seen: list[object]) -> None:
        @transactional
        async def handle(cmd: Cmd, session: list[str]) -> None:
            seen.append(("decorated", list(session)))

        dp.commands.bind(Cmd, handle, session=provider())

    build.__name__ = f"decorated_{name}"
    return build


def make_session() -> list[str]:
    return []


class Strategy:
    """A class handler whose handle is chosen per instance, in __init__."""

    def __init__(self) -> None:
        self.handle = self.returning  # type: ignore[assignment,method-assign]

    async def handle(self, cmd: Cmd) -> None:
        return None

    async def returning(self, cmd: Cmd) -> Evt:
        return Evt(cmd.n)


def class_with_instance_handle(dp: Dispatcher, seen: list[object]) -> None:
    dp.commands.bind(Cmd, Strategy)
    dp.events.bind(Evt, events_seen_by(seen))


def factory_raising_already_handled(dp: Dispatcher, seen: list[object]) -> None:
    from pybus.unit_of_work import AlreadyHandled

    def refuse() -> str:
        raise AlreadyHandled("not from a unit")

    async def handle(cmd: Cmd, value: str) -> None:
        seen.append(("ran", value))

    dp.commands.bind(Cmd, handle, value=Factory(refuse))


APPLICATIONS: list[Build] = [
    decorated(lambda: Factory(make_session), "factory"),
    decorated(lambda: Singleton(make_session), "singleton"),
    decorated(make_session, "value"),
    class_with_instance_handle,
    factory_raising_already_handled,
    returns_none,
    raises,
    returns_an_event,
    returns_an_event_without_handler,
    returns_a_value,
    returns_sometimes,
    follow_up_fails,
    follow_up_cascades,
    follow_up_cancelled,
    follow_up_alone_fails,
    follow_up_alone_cancelled,
    follow_up_alone_cascade_fails,
    sync_handler,
    class_handler,
    class_handler_init_fails,
    collector(Collecting),
    collector(CollectingTwo),
    collector(CollectingThenFailing),
    collector(DumpsOne),
    collector(DumpsAsync),
    ready_collector,
    with_factory(make_value),
    with_factory(make_value, singleton=True, ready=True),
    with_factory(make_failing),
    with_factory(make_failing, ready=True),
    with_factory(make_awaitable),
    with_factory(make_awaitable, singleton=True),
    with_factory(make_async),
    with_factory(make_unit),
    with_factory(make_scoped_unit),
    with_factory(make_async_unit),
    with_factory(make_scoped),
    with_factory(make_scoped, ready=True),
    with_factory(make_scoped_failing_teardown),
    with_factory(make_yields_twice),
    with_factory(make_never_yields),
    with_factory(make_async_scoped),
    with_factory(make_async_yields_twice),
    factory_with_failing_handler,
    factory_positional,
    factory_then_entered,
]


@pytest.mark.parametrize("build", APPLICATIONS, ids=lambda build: build.__name__)
@pytest.mark.parametrize("n", [0, 3])
async def test_execute_takes_the_same_course_on_the_fast_and_the_general_path(build: Build, n: int) -> None:
    TEARDOWNS.clear()
    fast, general = await run_both(build, Cmd(n))
    teardowns_fast = TEARDOWNS[: len(TEARDOWNS) // 2]
    assert fast == general
    assert TEARDOWNS == teardowns_fast * 2


@pytest.mark.parametrize("build", APPLICATIONS, ids=lambda build: build.__name__)
async def test_the_same_course_with_a_cascade_limit_of_zero(build: Build) -> None:
    fast, general = await run_both(build, Cmd(1), max_cascade_depth=0)
    assert fast == general


def events_only(dp: Dispatcher, seen: list[object]) -> None:
    follow_up_fails(dp, seen)

    async def on_unhandled(event: Unhandled) -> Evt:
        seen.append(("unhandled", event))
        return Evt(event.n)

    dp.events.bind(Unhandled, on_unhandled)


def quiet_events(dp: Dispatcher, seen: list[object]) -> None:
    """Several handlers of one event, all proven to return None (publish does not look at
    their results); a command returning that event."""

    async def handle(cmd: Cmd) -> Evt:
        return Evt(cmd.n)

    async def first(event: Evt) -> None:
        seen.append(("first", event))

    async def fails(event: Evt) -> None:
        seen.append(("fails", event))
        raise Boom(f"quiet {event.n}")

    async def last(event: Evt) -> None:
        seen.append(("last", event))
        if event.n == 13:
            raise asyncio.CancelledError

    dp.commands.bind(Cmd, handle)
    for handler in (first, fails, last):
        dp.events.bind(Evt, handler)


@pytest.mark.parametrize("n", [1, 13])
async def test_handlers_that_return_none_take_the_same_course(n: int) -> None:
    published = await run_both(quiet_events, Evt(n), publish=True)
    assert published[0] == published[1]
    executed = await run_both(quiet_events, Cmd(n))
    assert executed[0] == executed[1]


@pytest.mark.parametrize("event", [Evt(1), Deeper(2), Unhandled(3), Cmd(4)], ids=repr)
async def test_publish_takes_the_same_course_on_the_fast_and_the_general_path(event: object) -> None:
    fast, general = await run_both(events_only, event, publish=True)
    assert fast == general


async def test_publish_cancelled_after_a_failure_names_it_on_both_paths() -> None:
    def build(dp: Dispatcher, seen: list[object]) -> None:
        async def fails(event: Evt) -> None:
            raise Boom("first")

        async def cancelled(event: Evt) -> None:
            raise asyncio.CancelledError

        dp.events.bind(Evt, fails)
        dp.events.bind(Evt, cancelled)

    fast, general = await run_both(build, Evt(1), publish=True)
    assert fast == general
    assert "1 other event handler failure(s) of this publish" in repr(fast)


async def test_a_handler_proven_to_return_none_is_handed_over_and_raises_only_when_awaited() -> None:
    for build in (class_handler_init_fails, with_factory(make_failing), raises):
        dp = Dispatcher()
        build(dp, [])
        dp.start()
        call = dp.execute(Cmd(1))  # nothing runs, nothing raises yet
        with pytest.raises(Boom):
            await call
        await dp.stop()


def contexts(seen: list[object]) -> list[object]:
    """The contexts the handlers saw, their ids replaced by the order they first appeared in."""
    numbers: dict[object, int] = {}

    def number(value: object) -> object:
        return None if value is None else numbers.setdefault(value, len(numbers))

    out: list[object] = []
    for entry in seen:
        if isinstance(entry, HandlingContext):
            ids = (number(entry.message_id), number(entry.correlation_id), number(entry.causation_id))
            out.append((entry.kind, entry.key, entry.attempt, ids))
        else:
            out.append(entry)
    return out


def recording(seen: list[object]) -> None:
    context = current_context()
    assert context is not None
    seen.append(context)


def tracked_cascade(dp: Dispatcher, seen: list[object]) -> None:
    async def handle(cmd: Cmd) -> Evt:
        recording(seen)
        return Evt(cmd.n)

    async def on_evt(event: Evt) -> Deeper:
        recording(seen)
        return Deeper(event.n)

    async def on_deeper(event: Deeper) -> None:
        recording(seen)
        raise Boom("deepest")

    dp.commands.bind(Cmd, handle)
    dp.events.bind(Evt, on_evt)
    dp.events.bind(Deeper, on_deeper)


class TrackedCollector(EventCollector):
    def __init__(self, seen: list[object]) -> None:
        self.seen = seen

    async def handle(self, cmd: Cmd) -> None:
        recording(self.seen)
        self.add_event(Evt(cmd.n))


def tracked_collector(dp: Dispatcher, seen: list[object]) -> None:
    async def on_evt(event: Evt) -> None:
        recording(seen)

    dp.commands.bind(Cmd, TrackedCollector, seen=seen)
    dp.events.bind(Evt, on_evt)


def tracked_factory(dp: Dispatcher, seen: list[object]) -> None:
    async def handle(cmd: Cmd, value: str) -> None:
        recording(seen)

    dp.commands.bind(Cmd, handle, value=Factory(make_scoped))


@pytest.mark.parametrize("build", [tracked_cascade, tracked_collector, tracked_factory])
async def test_the_tracked_paths_give_each_handling_the_same_ids(build: Build) -> None:
    """With tracking on, the fast and general paths give the handlings the same chain of ids."""
    (fast, fast_seen), (general, general_seen) = await run_both(build, Cmd(2), context=True)
    assert fast == general
    assert contexts(fast_seen) == contexts(general_seen)
    assert contexts(fast_seen)  # the handlers ran and saw their contexts


class Patched:
    async def handle(self, cmd: Cmd) -> None:
        return None


async def test_a_class_handler_patched_after_start_publishes_what_the_patch_returns() -> None:
    """The method a class handling calls is looked up on an instance made then: a class
    handler is never handed over on the strength of a proof made at start."""
    heard: list[object] = []
    dp = Dispatcher()
    dp.commands.bind(Cmd, Patched)
    dp.events.bind(Evt, events_seen_by(heard))
    dp.start()

    async def returning(self: Patched, cmd: Cmd) -> Evt:
        return Evt(cmd.n)

    original = Patched.handle
    Patched.handle = returning  # type: ignore[assignment,method-assign]
    try:
        assert await dp.execute(Cmd(3)) == Evt(3)
    finally:
        setattr(Patched, "handle", original)  # noqa: B010 - restore the class as it was
        await dp.stop()
    assert heard == [("evt", Evt(3))]


class Counted:
    made = 0

    def __init__(self) -> None:
        Counted.made += 1

    async def handle(self, cmd: Cmd) -> None:
        return None


def counted_class(dp: Dispatcher, seen: list[object]) -> None:
    dp.commands.bind(Cmd, Counted)


def counted_factory(dp: Dispatcher, seen: list[object]) -> None:
    def make() -> str:
        seen.append("made")
        return "made"

    async def handle(cmd: Cmd, value: str) -> None:
        return None

    dp.commands.bind(Cmd, handle, value=Factory(make))


async def test_nothing_runs_when_execute_is_called_only_when_it_is_awaited() -> None:
    """Factories and class instances are made when the call is awaited: a call that is
    never awaited makes nothing."""
    for build in (counted_class, counted_factory):
        seen: list[object] = []
        Counted.made = 0
        dp = Dispatcher()
        build(dp, seen)
        dp.start()
        call = dp.execute(Cmd(1))
        call.close()  # never awaited
        assert seen == [], build.__name__
        assert Counted.made == 0, build.__name__
        await dp.execute(Cmd(1))
        made_by_class = build is counted_class
        assert seen == ([] if made_by_class else ["made"]), build.__name__
        assert Counted.made == (1 if made_by_class else 0), build.__name__
        await dp.stop()


async def test_an_override_entered_between_the_call_and_its_await_applies_to_an_injected_handler() -> None:
    real = Singleton(lambda: "real")
    got: list[str] = []
    dp = Dispatcher()

    async def handle(cmd: Cmd, value: str) -> None:
        got.append(value)

    dp.commands.bind(Cmd, handle, value=real)
    async with dp:
        await dp.execute(Cmd(0))  # the Singleton is made
        call = dp.execute(Cmd(1))
        with dp.override(real, "fake"):
            await call
    assert got == ["real", "fake"]


@pytest.mark.parametrize("call", ["publish", "execute"])
async def test_a_handler_that_fails_after_its_override_ended_is_still_named(call: str) -> None:
    """The fast loops name a failing handler from the plan it began with, not from the
    event's current handlers, which override_handler may have changed meanwhile."""
    outcomes = []
    for general in (False, True):
        dp = Dispatcher()

        async def real(event: Evt) -> None:
            pass

        async def handle(cmd: Cmd) -> Evt:
            return Evt(cmd.n)

        dp.events.bind(Evt, real)
        dp.commands.bind(Cmd, handle)
        dp.start()
        if general:
            dp.attach_observer(Observer())
        gate = asyncio.Event()

        async def fake(event: Evt, gate: asyncio.Event = gate) -> None:
            await gate.wait()
            raise Boom("fake failed")

        with dp.override_handler(Evt, fake):
            running = asyncio.ensure_future(dp.publish(Evt(1)) if call == "publish" else dp.execute(Cmd(1)))
            await asyncio.sleep(0)
        gate.set()
        with pytest.raises(BaseExceptionGroup) as raised:
            await running
        outcomes.append(outcome(raised.value))
        await dp.stop()
    assert outcomes[0] == outcomes[1]
    assert "raised by fake" in repr(outcomes[0])


async def make_async_scoped_finally() -> AsyncIterator[str]:
    TEARDOWNS.append("async entered")
    try:
        yield "async scoped"
    finally:
        TEARDOWNS.append("async torn down")


@pytest.mark.parametrize("make", [make_scoped, make_async_scoped_finally], ids=lambda make: make.__name__)
async def test_a_handling_cancelled_inside_a_factory_scope_tears_it_down_once_on_both_paths(
    make: Callable[[], Any],
) -> None:
    """Cancel the handler while it holds a Factory's value: the written-out scope and the
    general one both run the teardown once and let the cancellation through."""
    outcomes = []
    for general in (False, True):
        TEARDOWNS.clear()
        started = asyncio.Event()
        dp = Dispatcher()

        async def handle(cmd: Cmd, value: str, started: asyncio.Event = started) -> None:
            started.set()
            await asyncio.Event().wait()

        dp.commands.bind(Cmd, handle, value=Factory(make))
        handlers.WRITTEN_OUT = not general
        try:
            dp.start()
        finally:
            handlers.WRITTEN_OUT = True
        running = asyncio.ensure_future(dp.execute(Cmd(1)))
        await started.wait()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        outcomes.append(list(TEARDOWNS))
        await dp.stop()
    assert outcomes[0] == outcomes[1]
    assert len(outcomes[0]) == 2  # entered once, torn down once


async def test_a_ready_collector_takes_the_next_message_after_a_handling_was_cancelled() -> None:
    """Its one-at-a-time mark is cleared however the handling ends, cancellation included."""

    class Slow(EventCollector):
        def __init__(self) -> None:
            self.block = True

        async def handle(self, cmd: Cmd) -> None:
            self.add_event(Evt(cmd.n))
            if self.block:
                await asyncio.Event().wait()

    heard: list[object] = []
    instance = Slow()
    dp = Dispatcher()
    dp.commands.bind(Cmd, instance)
    dp.events.bind(Evt, events_seen_by(heard))
    async with dp:
        running = asyncio.ensure_future(dp.execute(Cmd(1)))
        await asyncio.sleep(0)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        instance.block = False
        await dp.execute(Cmd(2))
    assert heard == [("evt", Evt(2))]  # the cancelled handling's event was dropped, not published
