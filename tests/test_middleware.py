"""Middleware: order, short-circuit, replaced messages, exceptions, the handling
context, collected events, errors at registration, and LoggingMiddleware."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import pytest

from pybus import (
    CallNext,
    Dispatcher,
    DispatcherFrozen,
    Event,
    HandlingContext,
    ImproperlyConfigured,
    Middleware,
)
from pybus.middleware import LoggingMiddleware
from pybus.routes import routes
from pybus.transport import InMemoryBroker, InMemoryTransport
from tests.consuming import consuming, until


@dataclass(frozen=True)
class Charge:
    amount: int


@dataclass(frozen=True)
class Charged(Event):
    amount: int


@dataclass(frozen=True)
class Refund:
    amount: int


class Declined(Exception):
    pass


def recorder(name: str, seen: list[str]) -> Middleware:
    async def record(message: Any, call_next: CallNext) -> Any:
        seen.append(f"{name} before {call_next.context.handler}")
        result = await call_next(message)
        seen.append(f"{name} after")
        return result

    record.__qualname__ = name
    return record


async def test_dispatcher_then_router_then_registration_outermost_first() -> None:
    seen: list[str] = []
    dp = Dispatcher(middleware=[recorder("dp1", seen)])
    dp.add_middleware(recorder("dp2", seen))
    dp.commands.add_middleware(recorder("commands", seen))
    dp.events.add_middleware(recorder("events", seen))

    @dp.commands.register(Charge, middleware=[recorder("own1", seen), recorder("own2", seen)])
    async def charge(cmd: Charge) -> str:
        seen.append("handler")
        return "ok"

    async with dp:
        assert await dp.execute(Charge(5)) == "ok"
    assert seen == [
        "dp1 before charge", "dp2 before charge", "commands before charge",
        "own1 before charge", "own2 before charge", "handler",
        "own2 after", "own1 after", "commands after", "dp2 after", "dp1 after",
    ]  # fmt: skip
    assert [route.middleware for route in routes(dp)] == [["dp1", "dp2", "commands", "own1", "own2"]]


async def test_each_event_handler_gets_its_own_chain_and_follow_ups_go_through_it() -> None:
    seen: list[str] = []
    dp = Dispatcher(middleware=[recorder("mw", seen)])

    @dp.commands.register(Charge)
    async def charge(cmd: Charge) -> Charged:
        return Charged(cmd.amount)

    @dp.events.register(Charged)
    async def notify(event: Charged) -> None:
        seen.append("notify")

    @dp.events.register(Charged)
    def audit(event: Charged) -> None:  # a sync handler under middleware
        seen.append("audit")

    async with dp:
        await dp.execute(Charge(1))
    assert seen == [
        "mw before charge", "mw after",
        "mw before notify", "notify", "mw after",
        "mw before audit", "audit", "mw after",
    ]  # fmt: skip


async def test_a_middleware_may_answer_itself_or_replace_the_message() -> None:
    called: list[object] = []

    async def cached(message: Any, call_next: CallNext) -> Any:
        if message.amount == 0:
            return "nothing to do"  # short-circuit: the handler is not called
        return await call_next(message)

    async def doubled(message: Any, call_next: CallNext) -> Any:
        return await call_next(Charge(message.amount * 2))

    dp = Dispatcher(middleware=[cached, doubled])

    @dp.commands.register(Charge)
    async def charge(cmd: Charge) -> str:
        called.append(cmd)
        return f"charged {cmd.amount}"

    async with dp:
        assert await dp.execute(Charge(0)) == "nothing to do"
        assert await dp.execute(Charge(3)) == "charged 6"
    assert called == [Charge(6)]


async def test_a_middleware_sees_the_handlers_exception_and_may_translate_it() -> None:
    seen: list[BaseException] = []

    async def translate(message: Any, call_next: CallNext) -> Any:
        try:
            return await call_next(message)
        except Declined as exc:
            seen.append(exc)
            raise LookupError("card declined") from exc

    async def retry_once(message: Any, call_next: CallNext) -> Any:
        try:
            return await call_next(message)
        except Declined:
            return await call_next(message)

    dp = Dispatcher()
    attempts: list[int] = []

    @dp.commands.register(Charge, middleware=[translate])
    async def charge(cmd: Charge) -> None:
        raise Declined("insufficient funds")

    @dp.commands.register(Refund, middleware=[retry_once])
    async def refund(cmd: Refund) -> str:
        attempts.append(cmd.amount)
        if len(attempts) == 1:
            raise Declined("try again")
        return "refunded"

    async with dp:
        with pytest.raises(LookupError, match="card declined") as raised:
            await dp.execute(Charge(1))
        assert await dp.execute(Refund(2)) == "refunded"
    assert [str(exc) for exc in seen] == ["insufficient funds"]
    assert raised.value.__cause__ is seen[0]
    assert attempts == [2, 2]


async def test_a_timeout_is_raised_inside_the_middleware() -> None:
    seen: list[str] = []

    async def watch(message: Any, call_next: CallNext) -> Any:
        try:
            return await call_next(message)
        except TimeoutError as exc:
            seen.append(f"timed out: {exc.__notes__}")
            raise

    dp = Dispatcher(middleware=[watch])

    @dp.commands.register(Charge, timeout=0.01)
    async def slow(cmd: Charge) -> None:
        await asyncio.sleep(10)

    async with dp:
        with pytest.raises(TimeoutError):
            await dp.execute(Charge(1))
    (note,) = seen
    assert "did not finish within its timeout of 0.01 s" in note


async def test_the_context_names_the_handling() -> None:
    contexts: list[HandlingContext] = []

    async def remember(message: Any, call_next: CallNext) -> Any:
        contexts.append(call_next.context)
        return await call_next(message)

    dp = Dispatcher(middleware=[remember])

    @dp.events.register("shutdown")
    async def on_shutdown() -> None:
        pass

    @dp.queries.register(Charge)
    async def price(query: Charge) -> int:
        return query.amount

    async with dp:
        await dp.publish("shutdown")
        await dp.query(Charge(1))
    shutdown, charge = contexts
    assert (shutdown.kind, shutdown.key, shutdown.handler, shutdown.attempt) == (
        "event",
        "shutdown",
        "on_shutdown",
        1,
    )
    assert (charge.kind, charge.key, charge.handler) == ("query", Charge, "price")
    assert charge.location.endswith(f"test_middleware.py:{price.__code__.co_firstlineno}")
    # A top-level call starts a correlation of its own: its message is the root.
    assert charge.correlation_id == charge.message_id != shutdown.message_id
    assert charge.causation_id is None
    assert str(charge) == "query Charge -> price"


async def test_under_a_consumer_the_context_carries_the_delivery_attempt_and_ids() -> None:
    broker = InMemoryBroker()
    shop = Dispatcher(transport=InMemoryTransport(broker))
    shop.route(Charged)
    seen: list[tuple[int, int, str | None, str | None]] = []

    async def remember(message: Any, call_next: CallNext) -> Any:
        context = call_next.context
        seen.append((context.delivery, context.attempt, context.message_id, context.correlation_id))
        return await call_next(message)

    worker = Dispatcher(transport=InMemoryTransport(broker, group="billing"), on_error=lambda e, m: None)
    worker.route(Charged)

    @worker.events.register(Charged, middleware=[remember])
    async def bill(event: Charged) -> None:
        if len(seen) == 1:
            raise Declined("first delivery fails")

    async with shop, consuming(worker) as consumer:
        await shop.publish(Charged(1))
        await until(lambda: consumer.handled == 1)
    (first, attempt, first_id, correlation), (second, again, second_id, _) = seen
    assert (first, second) == (1, 2)  # the transport's delivery count
    assert attempt == again == 1  # no in-process retry policy: one attempt per delivery
    assert first_id is not None
    assert first_id == second_id == correlation


@dataclass(frozen=True)
class Collecting:
    fail_first: bool = False


class CollectingHandler:
    calls = 0

    def __init__(self) -> None:
        self.events: list[object] = []

    async def handle(self, message: Collecting) -> str:
        CollectingHandler.calls += 1
        self.events.append(Charged(CollectingHandler.calls))
        if message.fail_first and CollectingHandler.calls == 1:
            raise Declined("first call fails")
        return "done"

    def add_event(self, event: object) -> None:
        self.events.append(event)

    def dump_events(self) -> list[object]:
        return self.events


async def test_collected_events_count_once_from_the_call_that_succeeded() -> None:
    published: list[Charged] = []

    async def again_on_failure(message: Any, call_next: CallNext) -> Any:
        try:
            return await call_next(message)
        except Declined:
            return await call_next(message)

    async def skip(message: Any, call_next: CallNext) -> Any:
        return "skipped"

    dp = Dispatcher()
    dp.commands.bind(Collecting, CollectingHandler, middleware=[again_on_failure])
    dp.commands.bind(Refund, CollectingHandler, argname="message", middleware=[skip])
    dp.events.bind(Charged, published.append)
    CollectingHandler.calls = 0
    async with dp:
        assert await dp.execute(Collecting(fail_first=True)) == "done"
        assert await dp.execute(Refund(1)) == "skipped"
    assert published == [Charged(2)]  # not the event of the failed first call, none from `skip`


def test_what_is_not_middleware_is_refused_with_the_fix() -> None:
    def sync_mw(message: object, call_next: CallNext) -> object:
        return call_next(message)

    async def one_arg(message: object) -> object:
        return message

    dp = Dispatcher()
    with pytest.raises(ImproperlyConfigured) as raised:
        dp.add_middleware(sync_mw)  # type: ignore[arg-type]
    assert str(raised.value) == (
        "sync_mw cannot be middleware for every handler: it is not async; define it with "
        "`async def` and return `await call_next(message)`"
    )
    with pytest.raises(ImproperlyConfigured) as raised:
        dp.commands.add_middleware(one_arg)  # type: ignore[arg-type]
    assert str(raised.value) == (
        "one_arg cannot be middleware for every command: it must accept two positional "
        "arguments, (message, call_next)"
    )
    with pytest.raises(ImproperlyConfigured) as raised:
        dp.events.add_middleware(LoggingMiddleware)  # type: ignore[arg-type]
    assert "pass an instance, not the class" in str(raised.value)
    with pytest.raises(ImproperlyConfigured) as raised:
        dp.commands.bind(Charge, lambda cmd: None, middleware=LoggingMiddleware())  # type: ignore[call-overload]
    assert str(raised.value) == (
        "middleware= for command Charge takes a list, and LoggingMiddleware(...) is one "
        "middleware; pass middleware=[LoggingMiddleware(...)]"
    )
    with pytest.raises(ImproperlyConfigured, match="cannot be middleware for every handler"):
        Dispatcher(middleware=[42])  # type: ignore[list-item]
    assert "Charge" not in dp.commands  # a refused registration leaves nothing behind


async def test_middleware_added_after_start_is_refused() -> None:
    async with Dispatcher() as dp:
        with pytest.raises(DispatcherFrozen) as raised:
            dp.add_middleware(LoggingMiddleware())
        assert str(raised.value) == (
            "Cannot register middleware LoggingMiddleware instance for every handler: the dispatcher "
            "has started and its handler maps are frozen; register it before dp.start()"
        )
        with pytest.raises(DispatcherFrozen, match="for every query"):
            dp.queries.add_middleware(LoggingMiddleware())


async def test_override_handler_runs_the_replacement_inside_the_dispatchers_middleware() -> None:
    seen: list[str] = []
    dp = Dispatcher(middleware=[recorder("mw", seen)])

    @dp.commands.register(Charge)
    async def charge(cmd: Charge) -> str:
        return "real"

    async def fake(cmd: Charge) -> str:
        return "fake"

    async with dp:
        with dp.override_handler(Charge, fake):
            assert await dp.execute(Charge(1)) == "fake"
    assert seen == ["mw before fake", "mw after"]


async def test_middleware_runs_for_messages_handled_by_background_workers() -> None:
    seen: list[str] = []
    dp = Dispatcher(middleware=[recorder("mw", seen)])
    dp.events.bind(Charged, lambda event: seen.append(f"handled {event.amount}"))
    async with dp:
        await dp.send(Charged(4))
        await dp.join()
    assert seen == ["mw before <lambda>", "handled 4", "mw after"]


# -- LoggingMiddleware -----------------------------------------------------------------


async def test_logging_middleware_logs_the_request_then_the_outcome(caplog: pytest.LogCaptureFixture) -> None:
    timings: list[tuple[str, BaseException | None]] = []
    logging_mw = LoggingMiddleware(
        logger=logging.getLogger("test.actions"),
        after=logging.DEBUG,
        on_timing=lambda context, seconds, error: timings.append((context.handler, error)),
    )
    dp = Dispatcher(middleware=[logging_mw])

    @dp.commands.register(Charge)
    async def charge(cmd: Charge) -> str:
        if cmd.amount < 0:
            raise Declined("negative amount")
        return "ok"

    caplog.set_level(logging.DEBUG, logger="test.actions")
    async with dp:
        await dp.execute(Charge(5))
        with pytest.raises(Declined):
            await dp.execute(Charge(-1))
    before, after, failing, failed = caplog.records
    assert (before.levelno, before.getMessage()) == (
        logging.INFO,
        "command Charge -> charge: handling Charge(amount=5)",
    )
    assert before.__dict__["pybus_kind"] == "command"
    assert before.__dict__["pybus_key"] == "Charge"
    assert before.__dict__["pybus_handler"] == "charge"
    assert before.__dict__["pybus_attempt"] == 1
    assert before.__dict__["pybus_message"] == "Charge(amount=5)"
    assert after.levelno == logging.DEBUG
    assert after.getMessage().startswith("command Charge -> charge: ok in ")
    assert after.__dict__["pybus_outcome"] == "ok"
    assert after.__dict__["pybus_duration_ms"] >= 0
    assert failing.getMessage() == "command Charge -> charge: handling Charge(amount=-1)"
    assert failed.levelno == logging.ERROR
    assert failed.getMessage().startswith("command Charge -> charge: failed (Declined: negative amount) in ")
    assert failed.__dict__["pybus_outcome"] == "failed"
    assert failed.__dict__["pybus_error"] == "Declined: negative amount"
    assert failed.exc_info is not None
    assert isinstance(failed.exc_info[1], Declined)
    assert [(name, type(error)) for name, error in timings] == [("charge", type(None)), ("charge", Declined)]


async def test_logging_middleware_levels_and_description_are_configurable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dp = Dispatcher()
    quiet = LoggingMiddleware(before=None, describe=lambda message: f"<{type(message).__name__}>")

    @dp.commands.register(Charge, middleware=[quiet])
    async def slow(cmd: Charge) -> None:
        await asyncio.sleep(10)

    caplog.set_level(logging.INFO, logger="pybus")
    async with dp:
        with pytest.raises(TimeoutError):
            await dp.execute(Charge(1), timeout=0.01)
    (cancelled,) = caplog.records
    assert cancelled.getMessage().startswith("command Charge -> slow: cancelled in ")
    assert cancelled.__dict__["pybus_message"] == "<Charge>"
    assert cancelled.__dict__["pybus_outcome"] == "cancelled"
    assert repr(quiet) == "LoggingMiddleware(logger='pybus')"


async def test_logging_middleware_levels_logger_name_and_the_ids_of_the_cascade(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dp = Dispatcher(middleware=[LoggingMiddleware(level=logging.DEBUG, logger="test.ids")])

    @dp.commands.register(Charge)
    async def charge(cmd: Charge) -> Charged:
        return Charged(cmd.amount)

    @dp.events.register(Charged)
    async def receipt(event: Charged) -> None:
        pass

    caplog.set_level(logging.DEBUG, logger="test.ids")
    async with dp:
        await dp.execute(Charge(5))
    records = caplog.records
    assert {record.name for record in records} == {"test.ids"}
    assert {record.levelno for record in records} == {logging.DEBUG}
    command, _, event, _ = records
    assert command.__dict__["pybus_correlation_id"] == command.__dict__["pybus_message_id"]
    assert command.__dict__["pybus_causation_id"] is None
    assert event.__dict__["pybus_correlation_id"] == command.__dict__["pybus_message_id"]
    assert event.__dict__["pybus_causation_id"] == command.__dict__["pybus_message_id"]
    assert (event.__dict__["pybus_attempt"], event.__dict__["pybus_delivery"]) == (1, 1)


@pytest.mark.parametrize(
    ("options", "text"),
    [
        ({"level": "INFO"}, r"LoggingMiddleware\(level='INFO'\): a logging level is an int"),
        ({"before": True}, r"LoggingMiddleware\(before=True\).*\(or None: no first record\)"),
        ({"failure_level": None}, r"LoggingMiddleware\(failure_level=None\)"),
        ({"logger": 3}, r"pass a logging.Logger or a logger's name"),
    ],
)
def test_logging_middleware_refuses_what_is_not_a_level_or_a_logger(
    options: dict[str, Any], text: str
) -> None:
    with pytest.raises(ImproperlyConfigured, match=text):
        LoggingMiddleware(**options)


async def test_a_failing_metrics_hook_or_describe_never_changes_the_outcome(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []

    def broken_timing(context: HandlingContext, seconds: float, error: BaseException | None) -> None:
        raise ConnectionError("statsd is down")

    def broken_describe(message: Any) -> str:
        raise KeyError("secret")

    mw = LoggingMiddleware(logger="", on_timing=broken_timing, describe=broken_describe)
    assert mw.logger is logging.getLogger()  # "" names the root logger
    dp = Dispatcher(middleware=[mw])

    @dp.commands.register(Charge)
    async def charge(cmd: Charge) -> str:
        calls.append(cmd.amount)
        if cmd.amount < 0:
            raise Declined("card declined")
        return "charged"

    caplog.set_level(logging.INFO)
    async with dp:
        assert await dp.execute(Charge(5)) == "charged"
        with pytest.raises(Declined, match="card declined"):
            await dp.execute(Charge(-1))
    assert calls == [5, -1]
    assert "<Charge: describe() raised KeyError: 'secret'>" in caplog.text
    assert "on_timing hook failed" in caplog.text
    with pytest.raises(ImproperlyConfigured, match=r"LoggingMiddleware\(on_timing=5\): pass a function"):
        LoggingMiddleware(on_timing=5)  # type: ignore[arg-type]
