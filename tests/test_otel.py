"""OpenTelemetry (`pybus.otel`): message and handler spans along cascades, the trace context
across the in-memory and Redis transports, metrics, and what never breaks a handling.

Spans and metrics go to the SDK's in-memory exporter and reader, through providers
passed to `instrument` (the global ones are left alone)."""

from __future__ import annotations

import asyncio
import builtins
import gc
import importlib
import logging
import subprocess
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import Counter, Histogram, Meter, MeterProvider
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import pybus.otel
from pybus import (
    Dispatcher,
    DispatcherFrozen,
    HandlingContext,
    ImproperlyConfigured,
    Retry,
    current_context,
)
from pybus.otel import Telemetry, instrument
from pybus.transport import InMemoryBroker, InMemoryTransport
from tests.consuming import consuming, until


class Otel:
    """An SDK tracer provider with an in-memory exporter, and a meter provider with an
    in-memory reader: what one process exports."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = SdkTracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = SdkMeterProvider(metric_readers=[self.reader])

    def instrument(self, dp: Dispatcher) -> Telemetry:
        return instrument(dp, tracer_provider=self.tracer_provider, meter_provider=self.meter_provider)

    def spans(self) -> dict[str, ReadableSpan]:
        """The finished spans by name (each name once in these tests)."""
        spans = self.exporter.get_finished_spans()
        found = {span.name: span for span in spans}
        assert len(found) == len(spans), [span.name for span in spans]
        return found

    def spans_named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.exporter.get_finished_spans() if span.name == name]

    def counts(self, metric: str) -> dict[tuple[str, ...], int]:
        """(kind, key, handler, outcome) -> the counter's value or the histogram's count."""
        data = self.reader.get_metrics_data()
        found: dict[tuple[str, ...], int] = {}
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for each in scope.metrics:
                    if each.name != metric:
                        continue
                    for point in each.data.data_points:
                        attributes = point.attributes or {}
                        labels = tuple(
                            str(attributes[name])
                            for name in ("pybus.kind", "pybus.key", "pybus.handler", "pybus.outcome")
                        )
                        if isinstance(point, HistogramDataPoint):
                            found[labels] = point.count
                        else:
                            assert isinstance(point, NumberDataPoint)
                            found[labels] = int(point.value)
        return found

    def close(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@pytest.fixture
def otel() -> Iterator[Otel]:
    found = Otel()
    yield found
    found.close()


def parent_of(span: ReadableSpan, spans: dict[str, ReadableSpan]) -> str | None:
    """The name of `span`'s parent among `spans` (None for a root; '?' for one not there)."""
    if span.parent is None:
        return None
    names = {other.context.span_id: name for name, other in spans.items()}
    return names.get(span.parent.span_id, "?")


def times(span: ReadableSpan) -> tuple[int, int]:
    assert span.start_time is not None
    assert span.end_time is not None
    return span.start_time, span.end_time


def attributes(span: ReadableSpan) -> dict[str, object]:
    return dict(span.attributes or {})


@dataclass(frozen=True)
class Open:
    n: int


@dataclass(frozen=True)
class Opened:
    n: int


@dataclass(frozen=True)
class Noted:
    n: int


class Boom(Exception):
    pass


async def test_a_cascade_makes_one_trace_of_message_and_handler_spans(otel: Otel) -> None:
    dp = Dispatcher()
    otel.instrument(dp)
    seen: list[HandlingContext] = []

    @dp.commands.register(Open)
    async def open_(cmd: Open) -> Opened:
        context = current_context()
        assert context is not None
        seen.append(context)
        return Opened(cmd.n)

    @dp.events.register(Opened)
    async def note(event: Opened) -> Noted:
        return Noted(event.n)

    @dp.events.register(Opened)
    def audit(event: Opened) -> None:
        pass

    @dp.events.register(Noted)
    async def noted(event: Noted) -> None:
        pass

    async with dp:
        assert await dp.execute(Open(1)) == Opened(1)
    spans = otel.spans()
    assert {name: parent_of(span, spans) for name, span in spans.items()} == {
        "execute Open": None,
        "command Open -> open_": "execute Open",
        "publish Opened": "execute Open",  # a follow-up: the child of the message that produced it
        "event Opened -> note": "publish Opened",
        "event Opened -> audit": "publish Opened",
        "publish Noted": "publish Opened",  # caused by Opened, though published after its span ended
        "event Noted -> noted": "publish Noted",
    }
    assert len({span.context.trace_id for span in spans.values()}) == 1
    (context,) = seen
    root, opened = spans["execute Open"], spans["publish Opened"]
    assert attributes(root) == {
        "messaging.system": "pybus",
        "messaging.operation.type": "process",
        "messaging.operation.name": "execute",
        "messaging.message.id": context.message_id,
        "messaging.message.conversation_id": context.message_id,
        "pybus.kind": "command",
        "pybus.key": "Open",
        "pybus.outcome": "ok",
    }
    assert root.kind is SpanKind.INTERNAL
    assert root.status.status_code is StatusCode.UNSET
    assert attributes(opened)["messaging.operation.name"] == "publish"
    assert attributes(opened)["messaging.message.conversation_id"] == context.message_id
    assert attributes(opened)["pybus.causation_id"] == context.message_id
    second = attributes(spans["publish Noted"])
    assert second["pybus.causation_id"] == attributes(opened)["messaging.message.id"]
    handler = attributes(spans["command Open -> open_"])
    assert handler == {
        "messaging.system": "pybus",
        "pybus.kind": "command",
        "pybus.key": "Open",
        "pybus.handler": "open_",
        "pybus.location": context.location,
        "pybus.attempt": 1,
        "pybus.outcome": "ok",
    }
    # The message span is open until its handlers (and, at the top, its follow-ups) are done.
    first, last = times(root)
    for span in spans.values():
        start, end = times(span)
        assert first <= start <= end <= last
    ok = {
        ("command", "Open", "open_", "ok"): 1,
        ("event", "Opened", "note", "ok"): 1,
        ("event", "Opened", "audit", "ok"): 1,
        ("event", "Noted", "noted", "ok"): 1,
    }
    assert otel.counts("pybus.handled") == ok
    assert otel.counts("pybus.failed") == {}
    assert otel.counts("pybus.handling.duration") == ok


@dataclass(frozen=True)
class Fail:
    n: int


def failing_dispatcher(**options: Any) -> tuple[Dispatcher, list[Exception]]:
    """A command whose handler raises, and a list of what it raised."""
    dp = Dispatcher(**options)
    raised: list[Exception] = []

    @dp.commands.register(Fail)
    async def fail(cmd: Fail) -> None:
        error = Boom(f"no {cmd.n}")
        raised.append(error)
        raise error

    return dp, raised


async def test_a_failing_handler_raises_as_before_and_its_spans_say_it_failed(otel: Otel) -> None:
    # The same, tracked but not instrumented: what the caller saw before.
    plain, plain_raised = failing_dispatcher(context=True)
    async with plain:
        with pytest.raises(Boom) as without:
            await plain.execute(Fail(1))
    dp, raised = failing_dispatcher()
    otel.instrument(dp)
    async with dp:
        with pytest.raises(Boom) as caught:
            await dp.execute(Fail(1))
    assert caught.value is raised[0]
    assert str(caught.value) == str(without.value) == "no 1"
    assert getattr(caught.value, "__notes__", None) == getattr(without.value, "__notes__", None)
    assert caught.value.__cause__ is without.value.__cause__ is None
    assert plain_raised[0] is without.value
    spans = otel.spans()
    handler, message = spans["command Fail -> fail"], spans["execute Fail"]
    for span in (handler, message):
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == "Boom: no 1"
        assert attributes(span)["pybus.outcome"] == "failed"
        assert attributes(span)["error.type"] == "Boom"
        (event,) = span.events
        assert event.name == "exception"
        assert str(dict(event.attributes or {})["exception.type"]).endswith("Boom")
        assert dict(event.attributes or {})["exception.message"] == "no 1"
    assert otel.counts("pybus.failed") == {("command", "Fail", "fail", "failed"): 1}
    assert otel.counts("pybus.handled") == {}
    assert otel.counts("pybus.handling.duration") == {("command", "Fail", "fail", "failed"): 1}


@dataclass(frozen=True)
class Flaky:
    n: int


async def test_a_retried_handler_has_one_span_per_attempt(otel: Otel) -> None:
    dp = Dispatcher()
    otel.instrument(dp)
    attempts: list[int] = []

    @dp.queries.register(Flaky, retry=Retry(attempts=2, delay=0))
    async def flaky(query: Flaky) -> int:
        attempts.append(query.n)
        if len(attempts) == 1:
            raise Boom("first")
        return query.n * 10

    async with dp:
        assert await dp.query(Flaky(4)) == 40
    spans = otel.spans_named("query Flaky -> flaky")
    assert [(attributes(span)["pybus.attempt"], attributes(span)["pybus.outcome"]) for span in spans] == [
        (1, "failed"),
        (2, "ok"),
    ]
    (message,) = otel.spans_named("query Flaky")
    assert {span.parent.span_id for span in spans if span.parent} == {message.context.span_id}
    assert attributes(message)["pybus.outcome"] == "ok"
    assert message.status.status_code is StatusCode.UNSET
    assert otel.counts("pybus.failed") == {("query", "Flaky", "flaky", "failed"): 1}
    assert otel.counts("pybus.handled") == {("query", "Flaky", "flaky", "ok"): 1}
    assert otel.counts("pybus.handling.duration") == {
        ("query", "Flaky", "flaky", "failed"): 1,
        ("query", "Flaky", "flaky", "ok"): 1,
    }


@dataclass(frozen=True)
class Slow:
    n: int


async def test_failing_event_handlers_and_a_cancelled_handling(otel: Otel) -> None:
    dp = Dispatcher()
    otel.instrument(dp)

    @dp.events.register(Opened)
    async def fine(event: Opened) -> None:
        pass

    @dp.events.register(Opened)
    async def broken(event: Opened) -> None:
        raise Boom("broken")

    @dp.commands.register(Slow)
    async def slow(cmd: Slow) -> None:
        await asyncio.sleep(10)

    async with dp:
        with pytest.raises(ExceptionGroup) as group:
            await dp.publish(Opened(1))
        with pytest.raises(TimeoutError):
            await dp.execute(Slow(1), timeout=0.01)
    assert [type(error) for error in group.value.exceptions] == [Boom]
    spans = otel.spans()
    assert attributes(spans["event Opened -> fine"])["pybus.outcome"] == "ok"
    assert attributes(spans["event Opened -> broken"])["pybus.outcome"] == "failed"
    published = spans["publish Opened"]
    assert attributes(published)["error.type"] == "HandlerFailures"  # an ExceptionGroup
    assert published.status.status_code is StatusCode.ERROR
    # Cancelled: neither ok nor failed, and not an error of the span.
    for name in ("execute Slow", "command Slow -> slow"):
        assert attributes(spans[name])["pybus.outcome"] == "cancelled"
        assert spans[name].status.status_code is StatusCode.UNSET
        assert not spans[name].events
    assert otel.counts("pybus.handling.duration")[("command", "Slow", "slow", "cancelled")] == 1
    assert ("command", "Slow", "slow", "cancelled") not in otel.counts("pybus.failed")


async def test_calls_from_inside_a_handler_are_children_of_its_span(otel: Otel) -> None:
    dp = Dispatcher()
    telemetry = otel.instrument(dp)
    done = asyncio.Event()

    @dp.commands.register(Open)
    async def open_(cmd: Open) -> None:
        await dp.publish(Noted(cmd.n))  # nested: inside this handler's span
        await dp.events.send(Opened(cmd.n))  # background: handled later, in a worker

    @dp.events.register(Noted)
    async def noted(event: Noted) -> None:
        pass

    @dp.events.register(Opened)
    async def opened(event: Opened) -> None:
        done.set()

    tracer = otel.tracer_provider.get_tracer("app")
    async with dp:
        with tracer.start_as_current_span("request"):
            await dp.execute(Open(1))
        await dp.join()
    assert done.is_set()
    spans = otel.spans()
    assert {name: parent_of(span, spans) for name, span in spans.items()} == {
        "request": None,
        "execute Open": "request",  # the caller's span, when there is one
        "command Open -> open_": "execute Open",
        "publish Noted": "command Open -> open_",
        "event Noted -> noted": "publish Noted",
        "publish Opened": "command Open -> open_",  # even though that span has ended by now
        "event Opened -> opened": "publish Opened",
    }
    assert len({span.context.trace_id for span in spans.values()}) == 1
    assert telemetry.remembered == 0


@dataclass(frozen=True)
class Shipped:
    n: int


def w3c(span: ReadableSpan) -> str:
    """The traceparent header that names `span`."""
    context = span.context
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def check_crossing(sender: Otel, worker: Otel, headers: dict[str, str], route: str) -> None:
    """The worker's spans continue the sender's trace: the process span's parent is the
    (remote) send span."""
    sent, got = sender.spans(), worker.spans()
    assert {name: parent_of(span, sent) for name, span in sent.items()} == {
        "execute Open": None,
        "command Open -> open_": "execute Open",
        "send Shipped": "execute Open",
    }
    assert {name: parent_of(span, got) for name, span in got.items()} == {
        "process Shipped": "?",  # its parent is in the other process
        "event Shipped -> ship": "process Shipped",
        "publish Noted": "process Shipped",
        "event Noted -> note": "publish Noted",
    }
    send, process = sent["send Shipped"], got["process Shipped"]
    assert process.parent is not None
    assert process.parent.is_remote
    assert process.parent.span_id == send.context.span_id
    trace_ids = {span.context.trace_id for span in [*sent.values(), *got.values()]}
    assert trace_ids == {send.context.trace_id}
    assert headers["traceparent"] == w3c(send)
    assert (send.kind, process.kind) == (SpanKind.PRODUCER, SpanKind.CONSUMER)
    assert attributes(send)["messaging.operation.type"] == "send"
    assert attributes(process)["messaging.operation.type"] == "process"
    assert attributes(send)["messaging.destination.name"] == attributes(process)["messaging.destination.name"]
    assert attributes(process)["messaging.destination.name"] == route
    assert attributes(process)["messaging.message.id"] == attributes(send)["messaging.message.id"]
    assert attributes(process)["pybus.delivery"] == 1
    assert "pybus.delivery" not in attributes(got["publish Noted"])


def shipping(sender: Dispatcher, worker: Dispatcher, headers: dict[str, str]) -> None:
    """`Open` on the sender returns `Shipped`, routed to the worker, whose handler
    returns `Noted`, handled there too."""
    sender.route(Shipped)

    @sender.commands.register(Open)
    async def open_(cmd: Open) -> Shipped:
        return Shipped(cmd.n)

    worker.route(Shipped)

    @worker.events.register(Shipped)
    async def ship(event: Shipped) -> Noted:
        context = current_context()
        assert context is not None
        headers.update(context.headers)
        return Noted(event.n)

    @worker.events.register(Noted)
    async def note(event: Noted) -> None:
        pass


async def test_a_trace_crosses_the_in_memory_transport(otel: Otel) -> None:
    broker = InMemoryBroker()
    shop = Dispatcher(transport=InMemoryTransport(broker))
    worker = Dispatcher(transport=InMemoryTransport(broker, group="shipping"))
    headers: dict[str, str] = {}
    shipping(shop, worker, headers)
    remote = Otel()
    otel.instrument(shop)
    telemetry = remote.instrument(worker)
    async with shop, consuming(worker) as consumer:
        await shop.execute(Open(1))
        await until(lambda: consumer.handled == 1)
    check_crossing(otel, remote, headers, shop.routes[Shipped])
    assert telemetry.remembered == 0
    remote.close()


async def test_a_trace_crosses_redis(otel: Otel, redis_url: str) -> None:
    from pybus.redis_streams import RedisTransport

    shop = Dispatcher(transport=RedisTransport(redis_url, group="shop"))
    worker = Dispatcher(transport=RedisTransport(redis_url, group="billing", consumer="w1"))
    headers: dict[str, str] = {}
    shipping(shop, worker, headers)
    remote = Otel()
    otel.instrument(shop)
    remote.instrument(worker)
    async with shop, consuming(worker) as consumer:
        await shop.execute(Open(1))
        await until(lambda: consumer.handled == 1)
    assert shop.transport is not None
    await shop.transport.aclose()
    check_crossing(otel, remote, headers, shop.routes[Shipped])
    remote.close()


async def test_a_routed_message_published_by_a_handler_continues_from_its_span(otel: Otel) -> None:
    broker = InMemoryBroker()
    shop = Dispatcher(transport=InMemoryTransport(broker))
    worker = Dispatcher(transport=InMemoryTransport(broker, group="shipping"))
    shop.route(Shipped)
    shop.route(Open)  # executed here all the same
    worker.route(Shipped)

    @shop.commands.register(Open)
    async def open_(cmd: Open) -> None:
        await shop.publish(Shipped(cmd.n))  # written by this handler: no span of its own

    @worker.events.register(Shipped)
    async def ship(event: Shipped) -> None:
        pass

    otel.instrument(shop)
    otel.instrument(worker)
    async with shop, consuming(worker) as consumer:
        await shop.execute(Open(1))
        await shop.publish(Shipped(2))  # from outside any span: the worker starts a trace
        await until(lambda: consumer.handled == 2)
    spans = otel.spans_named("process Shipped")
    by_id = {span.context.span_id: span.name for span in otel.exporter.get_finished_spans()}
    assert sorted(str(span.parent and by_id[span.parent.span_id]) for span in spans) == [
        "None",
        "command Open -> open_",
    ]
    assert "send Shipped" not in by_id.values()
    (executed,) = otel.spans_named("execute Open")
    assert executed.kind is SpanKind.INTERNAL
    assert "messaging.destination.name" not in attributes(executed)


class SeenHeaders(TraceContextTextMapPropagator):
    """W3C trace context, noting the header names of each carrier it reads."""

    def __init__(self) -> None:
        self.seen: list[list[str]] = []

    def extract(
        self, carrier: CarrierT, context: Context | None = None, getter: Getter[CarrierT] = default_getter
    ) -> Context:
        self.seen.append(sorted(getter.keys(carrier)))
        return super().extract(carrier, context, getter)


async def test_a_delivered_message_without_trace_context_starts_a_trace(otel: Otel) -> None:
    broker = InMemoryBroker()
    shop = Dispatcher(transport=InMemoryTransport(broker))  # not instrumented
    shop.add_header_source(lambda headers: headers.update(tenant="acme"))
    worker = Dispatcher(transport=InMemoryTransport(broker, group="shipping"))
    shipping(shop, worker, {})
    propagator = SeenHeaders()
    instrument(
        worker, tracer_provider=otel.tracer_provider, meter_provider=otel.meter_provider,
        propagator=propagator,
    )  # fmt: skip
    tracer = otel.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("the worker starts"):  # not the parent of what it consumes
        async with shop, consuming(worker) as consumer:
            await shop.execute(Open(1))
            await until(lambda: consumer.handled == 1)
    spans = otel.spans()
    assert spans["process Shipped"].parent is None
    assert parent_of(spans["publish Noted"], spans) == "process Shipped"
    assert propagator.seen == [["tenant"]]


async def test_instrument_is_called_once_before_start() -> None:
    dp = Dispatcher()
    telemetry = instrument(dp)  # the global providers (no-op here)
    assert dp.instrumentation is telemetry
    assert repr(telemetry) == "<pybus.otel.Telemetry spans=0>"
    with pytest.raises(ImproperlyConfigured) as twice:
        instrument(dp)
    assert str(twice.value) == (
        f"<Dispatcher new> already has an instrumentation ({telemetry!r}); "
        "call pybus.otel.instrument(dp) once per dispatcher"
    )

    @dp.commands.register(Open)
    async def open_(cmd: Open) -> int:
        return cmd.n

    async with dp:
        assert dp.tracks_context
        assert await dp.execute(Open(3)) == 3
        with pytest.raises(DispatcherFrozen) as late:
            instrument(dp)
    assert str(late.value) == (
        "Cannot register the OpenTelemetry instrumentation (pybus.otel.instrument) for every handler: "
        "the dispatcher has started and its handler maps are frozen; register it before dp.start()"
    )


def test_without_opentelemetry_the_import_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def without_opentelemetry(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "pybus.otel")
    monkeypatch.setattr(builtins, "__import__", without_opentelemetry)
    with pytest.raises(ImportError) as missing:
        importlib.import_module("pybus.otel")
    assert str(missing.value) == (
        "pybus.otel needs the OpenTelemetry API, which is not installed (No module named 'opentelemetry'); "
        "install it with: pip install 'pybus-cqrs[otel]'"
    )


def test_pybus_imports_neither_pybus_otel_nor_opentelemetry() -> None:
    modules = "pybus, pybus.transport, pybus.consumer, pybus.testing, pybus.middleware, pybus.cli"
    found = "sorted(m for m in sys.modules if m == 'pybus.otel' or m.startswith('opentelemetry'))"
    code = f"import sys, {modules}; print({found})"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


async def test_no_span_is_kept_once_the_handlings_are_done(otel: Otel) -> None:
    dp = Dispatcher(concurrent_events=True)
    telemetry = otel.instrument(dp)

    @dp.commands.register(Open)
    async def open_(cmd: Open) -> Opened:
        if cmd.n % 7 == 0:
            await dp.commands.send(Fail(cmd.n))
        return Opened(cmd.n)

    @dp.events.register(Opened)
    async def note(event: Opened) -> Noted:
        assert telemetry.remembered > 0  # while a cascade runs, its spans are kept
        return Noted(event.n)

    @dp.events.register(Opened)
    async def count(event: Opened) -> None:
        await dp.execute(Shipped(event.n))

    @dp.commands.register(Shipped)
    async def shipped(cmd: Shipped) -> None:
        pass

    @dp.events.register(Noted)
    async def noted(event: Noted) -> None:
        if event.n % 5 == 0:
            raise Boom("noted")

    @dp.commands.register(Fail)
    async def fail(cmd: Fail) -> None:
        raise Boom("fail")

    dp.on_error = lambda error, message: None
    async with dp:
        for n in range(1, 101):
            try:
                await dp.execute(Open(n))
            except ExceptionGroup:
                assert n % 5 == 0
            await dp.publish(Noted(1))
        # Interleaved: each cascade keeps to its own trace.
        ends = await asyncio.gather(*(dp.execute(Open(n)) for n in range(101, 201)), return_exceptions=True)
        assert sum(isinstance(end, ExceptionGroup) for end in ends) == 20
        await dp.join()
        assert telemetry.remembered == 0
    assert len(otel.spans_named("execute Open")) == 200
    assert len(otel.spans_named("execute Fail")) == 28
    by_id = {span.context.span_id: span for span in otel.exporter.get_finished_spans()}
    for span in otel.spans_named("publish Noted"):
        if span.parent is not None:  # not one of the top-level publishes
            cause = by_id[span.parent.span_id]
            assert cause.name == "publish Opened"
            assert cause.context.trace_id == span.context.trace_id
            assert attributes(span)["pybus.causation_id"] == attributes(cause)["messaging.message.id"]


class Broken:
    """A tracer, meter and propagator whose every call raises."""

    def __getattr__(self, name: str) -> Any:
        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"broken {name}")

        return broken


class BrokenTracerProvider(trace.TracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return Broken()  # type: ignore[return-value]


class OldMeter(Meter):
    """A meter of an API before 1.30 (histograms without advice), whose instruments raise."""

    def create_counter(self, name: str, unit: str = "", description: str = "") -> Counter:
        return Broken()  # type: ignore[return-value]

    def create_histogram(self, name: str, unit: str = "", description: str = "") -> Histogram:  # type: ignore[override]
        return Broken()  # type: ignore[return-value]

    def create_up_down_counter(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def create_observable_counter(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def create_observable_gauge(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def create_observable_up_down_counter(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class OldMeterProvider(MeterProvider):
    def get_meter(self, name: str, *args: Any, **kwargs: Any) -> Meter:
        return OldMeter(name)


class BrokenPropagator(TextMapPropagator):
    def extract(
        self, carrier: CarrierT, context: Context | None = None, getter: Getter[CarrierT] | None = None
    ) -> Context:
        raise RuntimeError("broken extract")

    def inject(
        self, carrier: CarrierT, context: Context | None = None, setter: Setter[CarrierT] | None = None
    ) -> None:
        raise RuntimeError("broken inject")

    @property
    def fields(self) -> set[str]:
        return set()


class FragileTracerProvider(trace.TracerProvider):
    """Starts spans whose every method raises."""

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return Fragile()


class Fragile(trace.NoOpTracer):
    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return Broken()  # type: ignore[return-value]


async def test_a_broken_opentelemetry_never_breaks_a_handling(caplog: pytest.LogCaptureFixture) -> None:
    broker = InMemoryBroker()
    shop = Dispatcher(transport=InMemoryTransport(broker))
    worker = Dispatcher(transport=InMemoryTransport(broker, group="shipping"))
    shipping(shop, worker, {})

    @shop.commands.register(Fail)
    async def fail(cmd: Fail) -> None:
        raise Boom("still raised")

    # Spans that cannot start on one side, spans that cannot end on the other; instruments
    # that raise, propagators that raise.
    instrument(
        shop, tracer_provider=BrokenTracerProvider(), meter_provider=OldMeterProvider(),
        propagator=BrokenPropagator(),
    )  # fmt: skip
    instrument(
        worker, tracer_provider=FragileTracerProvider(), meter_provider=OldMeterProvider(),
        propagator=BrokenPropagator(),
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="pybus.otel"):
        async with shop, consuming(worker) as consumer:
            assert await shop.execute(Open(1)) == Shipped(1)
            with pytest.raises(Boom, match="still raised"):
                await shop.execute(Fail(1))
            await until(lambda: consumer.handled == 1)
    assert {record.getMessage() for record in caplog.records} == {
        # the shop (its send span of Shipped too)
        "pybus.otel could not start the span of command Open(n=1)",
        "pybus.otel could not start the span of command Fail(n=1)",
        "pybus.otel could not start a handler span",
        "pybus.otel could not add the trace context to an envelope",
        # the worker (the trace context cannot be read: no process span)
        "pybus.otel could not start the span of event Shipped(n=1)",
        "pybus.otel could not end a handler span",
        "pybus.otel could not record the metrics of a handler call",
        "pybus.otel could not end a message span",
    }


# -- the outside review's findings (pybus.otel) ------------------------------


@dataclass(frozen=True)
class Top:
    n: int


@dataclass(frozen=True)
class Audit:
    n: int


@dataclass(frozen=True)
class Audited:
    n: int


@dataclass(frozen=True)
class Archived:
    n: int


@dataclass(frozen=True)
class Job:
    n: int


@dataclass(frozen=True)
class Done:
    n: int


@dataclass(frozen=True)
class Reported:
    n: int


class WithoutHandlerSpans(trace.TracerProvider):
    """The SDK's spans, except that a handler span cannot start."""

    def __init__(self, provider: trace.TracerProvider) -> None:
        self.provider = provider

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return NoHandlerSpans(self.provider.get_tracer(*args, **kwargs))


class NoHandlerSpans(trace.NoOpTracer):
    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer

    def start_span(self, name: str, *args: Any, **kwargs: Any) -> trace.Span:
        if " -> " in name:
            raise RuntimeError("no handler span")
        return self.tracer.start_span(name, *args, **kwargs)


@pytest.mark.parametrize("caller", ["an outer middleware", "a handler without its span"])
async def test_handlings_started_from_a_handling_have_their_own_cascade_at_every_level(
    otel: Otel, caller: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A middleware added before instrument() runs with the message span current, as a
    # handler does when its handler span could not start: what it executes or sends is a
    # top-level handling of its own, whose follow-ups find their cause at every level.
    dp = Dispatcher()
    done = asyncio.Event()

    async def start_more(n: int) -> None:
        await dp.execute(Audit(n))
        await dp.commands.send(Job(n))

    if caller == "an outer middleware":

        async def outer(message: Any, call_next: Any) -> Any:
            if isinstance(message, Top):
                await start_more(message.n)
            result = await call_next(message)
            if isinstance(message, Top):
                await asyncio.wait_for(done.wait(), 5)  # Top's handling is still open meanwhile
            return result

        dp.add_middleware(outer)
        telemetry = otel.instrument(dp)
    else:
        telemetry = instrument(
            dp, tracer_provider=WithoutHandlerSpans(otel.tracer_provider), meter_provider=otel.meter_provider
        )

    @dp.commands.register(Top)
    async def top(cmd: Top) -> None:
        if caller != "an outer middleware":
            await start_more(cmd.n)
            await asyncio.wait_for(done.wait(), 5)

    @dp.commands.register(Audit)
    async def audit(cmd: Audit) -> Audited:
        return Audited(cmd.n)

    @dp.events.register(Audited)
    async def audited(event: Audited) -> Archived:
        return Archived(event.n)

    @dp.events.register(Archived)
    async def archived(event: Archived) -> Opened:
        return Opened(event.n)

    @dp.events.register(Opened)
    async def opened(event: Opened) -> None:
        pass

    @dp.commands.register(Job)
    async def job(cmd: Job) -> Done:
        return Done(cmd.n)

    @dp.events.register(Done)
    async def done_(event: Done) -> Noted:
        return Noted(event.n)

    @dp.events.register(Noted)
    async def noted(event: Noted) -> None:
        done.set()

    with caplog.at_level(logging.WARNING, logger="pybus.otel"):
        async with dp:
            await dp.execute(Top(1))
            await dp.join()
    spans = otel.spans()
    expected = {
        "execute Top": None,
        "command Top -> top": "execute Top",
        "execute Audit": "execute Top",
        "command Audit -> audit": "execute Audit",
        "publish Audited": "execute Audit",
        "event Audited -> audited": "publish Audited",
        "publish Archived": "publish Audited",
        "event Archived -> archived": "publish Archived",
        "publish Opened": "publish Archived",
        "event Opened -> opened": "publish Opened",
        "execute Job": "execute Top",  # handled by a worker, from the middleware's context
        "command Job -> job": "execute Job",
        "publish Done": "execute Job",
        "event Done -> done_": "publish Done",
        "publish Noted": "publish Done",
        "event Noted -> noted": "publish Noted",
    }
    if caller != "an outer middleware":
        expected = {name: parent for name, parent in expected.items() if " -> " not in name}
        assert {record.getMessage() for record in caplog.records} == {
            "pybus.otel could not start a handler span"
        }
    assert {name: parent_of(span, spans) for name, span in spans.items()} == expected
    assert len({span.context.trace_id for span in spans.values()}) == 1
    assert telemetry.remembered == 0


async def test_no_registration_is_kept_alive_and_the_caches_are_bounded(
    otel: Otel, monkeypatch: pytest.MonkeyPatch
) -> None:
    dp = Dispatcher()
    telemetry = otel.instrument(dp)

    @dp.commands.register(Open)
    async def open_(cmd: Open) -> None:
        pass

    for name in ("a", "b", "c"):

        @dp.events.register(name)
        async def on_name() -> None:
            pass

    class Payload:
        pass

    fakes: list[weakref.ref[Payload]] = []
    async with dp:
        for n in range(3):
            payload = Payload()
            fakes.append(weakref.ref(payload))

            async def fake(cmd: Open, payload: Payload = payload) -> None:
                pass

            with dp.override_handler(Open, fake):
                await dp.execute(Open(n))
            del payload, fake
        gc.collect()
        # The fakes ended with their overrides: the cache holds no registration.
        assert [fake() for fake in fakes] == [None, None, None]
        assert len(otel.spans_named("command Open -> fake")) == 3
        # Names and attributes are kept for CACHED registrations and message keys at most.
        monkeypatch.setattr(pybus.otel, "CACHED", 2)
        for name in ("a", "b", "c", "a"):
            await dp.publish(name)
    assert len(telemetry._messages) == len(telemetry._handlers) == 2
    assert [len(otel.spans_named(f"publish {name!r}")) for name in "abc"] == [2, 1, 1]
    assert [len(otel.spans_named(f"event {name!r} -> on_name")) for name in "abc"] == [2, 1, 1]


class OddPropagator(TraceContextTextMapPropagator):
    """W3C trace context, and a header whose value is a number."""

    def inject(
        self, carrier: CarrierT, context: Context | None = None, setter: Setter[CarrierT] = default_setter
    ) -> None:
        super().inject(carrier, context, setter)
        cast(Any, carrier)["x-number"] = 5


class RaisingPropagator(TraceContextTextMapPropagator):
    """Raises what it is given (a CancelledError from third-party code, say) as it injects."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def inject(
        self, carrier: CarrierT, context: Context | None = None, setter: Setter[CarrierT] = default_setter
    ) -> None:
        raise self.error


async def test_a_propagator_that_writes_a_number_or_raises_cancelled_never_fails_a_send(
    otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    broker = InMemoryBroker()
    shop = Dispatcher(transport=InMemoryTransport(broker))
    worker = Dispatcher(transport=InMemoryTransport(broker, group="shipping"))
    headers: dict[str, str] = {}
    shipping(shop, worker, headers)
    instrument(
        shop, tracer_provider=otel.tracer_provider, meter_provider=otel.meter_provider,
        propagator=OddPropagator(),
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="pybus.otel"):
        async with shop, consuming(worker) as consumer:
            assert await shop.execute(Open(1)) == Shipped(1)
            assert await shop.execute(Open(2)) == Shipped(2)
            await until(lambda: consumer.handled == 2)
    # The string headers went with the envelope, the number did not (and was logged once).
    assert headers.keys() == {"traceparent"}
    assert [record.getMessage() for record in caplog.records] == [
        "pybus.otel left the header 'x-number' out of an envelope: the propagator's value is of "
        "type int, not a string"
    ]

    # A CancelledError raised inside the propagator is its failure, not a cancellation.
    caplog.clear()
    shop = Dispatcher(transport=InMemoryTransport(broker))
    shipping(shop, Dispatcher(), {})
    telemetry = instrument(
        shop, tracer_provider=otel.tracer_provider, meter_provider=otel.meter_provider,
        propagator=RaisingPropagator(asyncio.CancelledError()),
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="pybus.otel"):
        async with shop:
            assert await shop.execute(Open(3)) == Shipped(3)
        await asyncio.to_thread(telemetry.inject, {})  # no event loop there: the same
    assert [record.getMessage() for record in caplog.records] == [
        "pybus.otel could not add the trace context to an envelope"
    ] * 2

    # ... unless the task is being cancelled all the same.
    async def cancelled_while_injecting() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        telemetry.inject({})

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(cancelled_while_injecting())
    # And KeyboardInterrupt or SystemExit are never OpenTelemetry's failure.
    interrupted = instrument(Dispatcher(), propagator=RaisingPropagator(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        interrupted.inject({})


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")


async def test_an_exception_that_cannot_be_printed_still_ends_both_spans(otel: Otel) -> None:
    dp = Dispatcher()
    telemetry = otel.instrument(dp)

    @dp.commands.register(Fail)
    async def fail(cmd: Fail) -> None:
        raise Unprintable

    async with dp:
        with pytest.raises(Unprintable):
            await dp.execute(Fail(1))
        assert not trace.get_current_span().get_span_context().is_valid
    spans = otel.spans()
    assert spans.keys() == {"execute Fail", "command Fail -> fail"}
    for span in spans.values():
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == "Unprintable"  # its name, without the message
        assert attributes(span)["error.type"] == "Unprintable"
        (event,) = span.events
        assert event.name == "exception"
        assert dict(event.attributes or {})["exception.type"] == f"{__name__}.Unprintable"
        assert dict(event.attributes or {})["exception.message"] == "Unprintable"
        assert "raise Unprintable" in str(dict(event.attributes or {})["exception.stacktrace"])
    assert telemetry.remembered == 0
    assert otel.counts("pybus.failed") == {("command", "Fail", "fail", "failed"): 1}


async def test_calls_from_the_error_hook_are_children_of_the_failed_message(
    otel: Otel, monkeypatch: pytest.MonkeyPatch
) -> None:
    dp = Dispatcher()
    telemetry = otel.instrument(dp)

    @dp.commands.register(Open)
    async def open_(cmd: Open) -> None:
        await dp.commands.send(Job(cmd.n))  # fails in the background; reported to the hook

    @dp.commands.register(Job)
    async def job(cmd: Job) -> None:
        raise Boom("job")

    @dp.commands.register(Fail)
    async def fail(cmd: Fail) -> None:
        raise Boom("fail")

    @dp.commands.register(Reported)
    async def reported(cmd: Reported) -> Noted:
        return Noted(cmd.n)

    @dp.events.register(Noted)
    async def noted(event: Noted) -> None:
        pass

    async def hook(error: BaseException, message: object) -> None:
        # Runs in the context Job was sent from (open_'s span current), in Job's handling.
        assert trace.get_current_span() is not trace.INVALID_SPAN
        if isinstance(message, Job):
            if message.n == 2:
                with pytest.raises(Boom):  # a failure of its own, kept in place of Job's
                    await dp.execute(Fail(2))
            await dp.execute(Reported(message.n))

    dp.on_error = hook
    async with dp:
        await dp.execute(Open(1))
        await dp.join()
        spans = otel.spans()
        assert {name: parent_of(span, spans) for name, span in spans.items()} == {
            "execute Open": None,
            "command Open -> open_": "execute Open",
            "execute Job": "command Open -> open_",
            "command Job -> job": "execute Job",
            "execute Reported": "execute Job",  # not the hook's current span: the failed message's
            "command Reported -> reported": "execute Reported",
            "publish Noted": "execute Reported",
            "event Noted -> noted": "publish Noted",
        }
        assert (
            attributes(spans["execute Reported"])["pybus.causation_id"]
            == attributes(spans["execute Job"])["messaging.message.id"]
        )
        # Only the last KEPT_FAILURES failed handlings are kept: beyond, the hook's current span.
        otel.exporter.clear()
        monkeypatch.setattr(pybus.otel, "KEPT_FAILURES", 1)
        await dp.execute(Open(2))
        await dp.join()
    spans = otel.spans()
    assert parent_of(spans["execute Fail"], spans) == "execute Job"
    assert parent_of(spans["execute Reported"], spans) == "command Open -> open_"
    assert telemetry.remembered == 0


async def test_error_type_is_the_class_name_as_keys_are_named(otel: Otel) -> None:
    class LocalError(Exception):
        pass

    dp = Dispatcher()
    otel.instrument(dp)

    @dp.commands.register(Fail)
    async def fail(cmd: Fail) -> None:
        raise LocalError("local")

    async with dp:
        with pytest.raises(LocalError):
            await dp.execute(Fail(1))
    assert LocalError.__qualname__.endswith("<locals>.LocalError")
    for span in otel.spans().values():
        assert attributes(span)["error.type"] == "LocalError"
        assert span.status.description == "LocalError: local"
    data = otel.reader.get_metrics_data()
    assert data is not None
    found = {
        (each.name, str(dict(point.attributes or {}).get("error.type")))
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for each in scope.metrics
        for point in each.data.data_points
    }
    assert found == {("pybus.failed", "LocalError"), ("pybus.handling.duration", "LocalError")}


class CancellingTracerProvider(trace.TracerProvider):
    """Its spans named with `part` cannot start: the task is being cancelled meanwhile."""

    def __init__(self, part: str) -> None:
        self.part = part

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return CancellingTracer(self.part)


class CancellingTracer(trace.NoOpTracer):
    def __init__(self, part: str) -> None:
        self.part = part

    def start_span(self, name: str, *args: Any, **kwargs: Any) -> trace.Span:
        if self.part in name:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            raise asyncio.CancelledError
        return trace.INVALID_SPAN


@pytest.mark.parametrize("part", ["execute ", " -> "])
async def test_a_cancellation_that_comes_while_a_span_starts_is_raised(otel: Otel, part: str) -> None:
    dp = Dispatcher()
    instrument(dp, tracer_provider=CancellingTracerProvider(part), meter_provider=otel.meter_provider)
    ran: list[int] = []

    @dp.commands.register(Open)
    async def open_(cmd: Open) -> None:
        ran.append(cmd.n)

    async with dp:
        task = asyncio.create_task(dp.execute(Open(1)))
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
        assert ran == []
