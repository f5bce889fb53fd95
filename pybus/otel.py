"""OpenTelemetry for a dispatcher: spans, trace context across transports, and metrics.

`instrument(dp)` (before `dp.start()`) makes the dispatcher report through the
OpenTelemetry API, to the providers given or the global ones:

- a **message span** for each message handled: a top-level `execute`, `query` or
  `publish` (its follow-ups inside it), each follow-up event, each message a
  transport consumer delivers. A follow-up's span is the child of the span of
  the message whose handling produced it; a message sent or executed from
  inside a handler is the child of that handler's span; a delivered message
  continues the trace of the sender, read from the envelope's headers.
- a **handler span** for each call of a handler (each retry attempt is a call),
  the child of its message's span, made by a dispatcher-wide middleware;
- the **W3C trace context** added to the headers of every routed envelope sent;
- **metrics**: the counters `pybus.handled` and `pybus.failed` and the histogram
  `pybus.handling.duration` (seconds), per handler call.

docs/tracing.md describes the names and attributes. The core of pybus never
imports this module; it needs the extra `pybus[otel]` (opentelemetry-api).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, TypeAlias

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics, propagate, trace
    from opentelemetry.context import Context
    from opentelemetry.propagators.textmap import Getter, Setter, TextMapPropagator
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode
    from opentelemetry.util.types import AttributeValue
except ImportError as exc:
    raise ImportError(
        f"pybus.otel needs the OpenTelemetry API, which is not installed ({exc}); "
        "install it with: pip install 'pybus[otel]'"
    ) from exc

from pybus.context import Ids, Registration, current_record, ident
from pybus.errors import DispatcherFrozen, ImproperlyConfigured, Kind, key_name, message_key
from pybus.lifecycle import State
from pybus.middleware import CallNext

if TYPE_CHECKING:
    from pybus.dispatcher import Dispatcher

__all__ = ["Telemetry", "instrument"]

#: The instrumentation scope's name (tracer and meter).
SCOPE = "pybus"

_logger = logging.getLogger("pybus.otel")

Attributes: TypeAlias = dict[str, AttributeValue]

#: `messaging.operation.name` of a message handled in this process, by kind.
_OPERATIONS: dict[Kind, str] = {"command": "execute", "query": "query", "event": "publish"}

#: The histogram's buckets, in seconds (those OpenTelemetry's semantic conventions
#: advise for messaging durations).
DURATION_BUCKETS: Sequence[float] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip


def instrument(
    dp: Dispatcher,
    *,
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
    propagator: TextMapPropagator | None = None,
) -> Telemetry:
    """Report `dp`'s handlings to OpenTelemetry: spans, trace context in routed
    messages' headers, and metrics (see docs/tracing.md).

    `tracer_provider` and `meter_provider` default to the global ones (through
    OpenTelemetry's proxies, so they may be set later), `propagator` to the
    global text-map propagator (W3C trace context and baggage unless configured
    otherwise). Call it once, before `dp.start()`: it sets `dp.instrumentation`,
    adds the dispatcher-wide middleware `Telemetry.middleware` (inside the
    dispatcher-wide middleware added before it, outside all other) and the
    header source `Telemetry.inject`. Context tracking is then on.

    Returns the `Telemetry` installed. Raises `DispatcherFrozen` once `dp` has
    started, `ImproperlyConfigured` when `dp` already has an instrumentation.
    """
    if dp.state is not State.NEW:
        raise DispatcherFrozen(
            "event", None, "the OpenTelemetry instrumentation (pybus.otel.instrument)", target="every handler"
        )
    if dp.instrumentation is not None:
        raise ImproperlyConfigured(
            f"{dp!r} already has an instrumentation ({dp.instrumentation!r}); "
            "call pybus.otel.instrument(dp) once per dispatcher"
        )
    telemetry = Telemetry(
        dp, tracer_provider=tracer_provider, meter_provider=meter_provider, propagator=propagator
    )
    dp.instrumentation = telemetry
    dp.add_middleware(telemetry.middleware)
    dp.add_header_source(telemetry.inject)
    return telemetry


class _Scope:
    """The spans of one top-level handling and of the follow-ups in its cascade."""

    __slots__ = ("context", "ids", "open")

    def __init__(self, context: Context, message_id: int | str) -> None:
        #: What the top-level handling made current: a follow-up starts with this current.
        self.context = context
        self.ids: list[int | str] = [message_id]
        self.open = True


class _Message:
    """What `started` hands to `finished`."""

    __slots__ = ("scope", "scope_token", "span", "token")

    def __init__(
        self, span: Span, token: Token[Any], scope: _Scope | None, scope_token: Token[_Scope | None] | None
    ) -> None:
        self.span, self.token, self.scope, self.scope_token = span, token, scope, scope_token


class _Handler:
    """A registration's span name and attributes, worked out once."""

    __slots__ = ("attributes", "cancelled", "failed", "name", "ok")

    def __init__(self, handler: Registration) -> None:
        key = key_name(handler.key)
        self.name = f"{handler.kind} {key} -> {handler.name}"
        self.attributes: Attributes = {
            "messaging.system": "pybus",
            "pybus.kind": handler.kind,
            "pybus.key": key,
            "pybus.handler": handler.name,
            "pybus.location": handler.location,
        }
        labels: Attributes = {"pybus.kind": handler.kind, "pybus.key": key, "pybus.handler": handler.name}
        self.ok: Attributes = {**labels, "pybus.outcome": "ok"}
        self.failed: Attributes = {**labels, "pybus.outcome": "failed"}
        self.cancelled: Attributes = {**labels, "pybus.outcome": "cancelled"}


_HandlerCall: TypeAlias = tuple[Span, Token[Any], _Handler, float]


class Telemetry:
    """The OpenTelemetry instrumentation of one dispatcher (made by `instrument`).

    It is the dispatcher's `instrumentation` (message spans), its middleware
    `Telemetry.middleware` (handler spans and metrics) and its header source
    `Telemetry.inject` (trace context in routed envelopes). A failure inside
    OpenTelemetry is logged on the `pybus.otel` logger and never reaches the
    handling; a handler's exception goes through unchanged.
    """

    def __init__(
        self,
        dp: Dispatcher,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        from pybus import __version__

        self._tracer = trace.get_tracer(SCOPE, __version__, tracer_provider=tracer_provider)
        meter = metrics.get_meter(SCOPE, __version__, meter_provider=meter_provider)
        self._handled = meter.create_counter(
            "pybus.handled", unit="{call}", description="Handler calls that returned"
        )
        self._failed = meter.create_counter(
            "pybus.failed", unit="{call}", description="Handler calls that raised an exception"
        )
        self._duration = _histogram(meter)
        self._propagator = propagator
        self._dp = dp
        # Routes may still be added between instrument() and start(): read at the first handling.
        self._routes: dict[object, str] | None = None
        #: The span of each message whose follow-ups may still start, by message id.
        #: Emptied as each top-level handling finishes.
        self._spans: dict[int | str, Span] = {}
        self._scope: ContextVar[_Scope | None] = ContextVar(f"pybus_otel_scope_{id(self)}", default=None)
        self._handlers: dict[Registration, _Handler] = {}
        self._messages: dict[tuple[str, object], tuple[str, Attributes]] = {}

    def __repr__(self) -> str:
        return f"<pybus.otel.Telemetry spans={len(self._spans)}>"

    @property
    def remembered(self) -> int:
        """How many message spans are kept for follow-ups still to come (0 between handlings)."""
        return len(self._spans)

    # -- message spans: the dispatcher's instrumentation ---------------------

    def started(self, kind: Kind, message: object, ids: Ids) -> object:
        """Start the span of `message` and make it current (pybus's `Instrumentation`)."""
        try:
            return self._start(kind, message, ids)
        except Exception:
            _logger.warning("pybus.otel could not start the span of %s %r", kind, message, exc_info=True)
            return None

    def _start(self, kind: Kind, message: object, ids: Ids) -> _Message:
        message_id, correlation_id, causation_id, delivery = ids
        current = otel_context.get_current()
        scope: _Scope | None = None
        if delivery is not None and isinstance(message_id, str):
            # Delivered by a transport (its ids are the envelope's strings): the trace goes
            # on from the sender's span, read from the headers, not from the consumer's context.
            parent = self._propagation().extract(delivery.headers, Context(), _HEADERS_GETTER)
            operation = "process"
        else:
            found = self._scope.get()
            if found is not None and found.open and found.context is current:
                scope = found  # a follow-up in the cascade of the top-level handling in progress
            parent = current
            if causation_id is not None:
                record = current_record()
                if record is None or record[2][0] != causation_id:
                    # Not called from a handler of its cause (a follow-up, run after that
                    # handler returned): its parent is the cause's message span.
                    cause = self._spans.get(causation_id)
                    if cause is not None:
                        parent = trace.set_span_in_context(cause, current)
            # A routed event published here is written to the transport (by the engine's
            # forwarder, inside this span); routed commands and queries executed here are not.
            routed = kind == "event" and message_key(message) in self._routes_table()
            operation = "send" if routed else _OPERATIONS[kind]
        name, static = self._message_info(operation, kind, message)
        attributes = dict(static)
        attributes["messaging.message.id"] = ident(message_id)
        attributes["messaging.message.conversation_id"] = ident(correlation_id)
        if causation_id is not None:
            attributes["pybus.causation_id"] = ident(causation_id)
        if delivery is not None and operation == "process":
            attributes["pybus.delivery"] = delivery.attempt
        span_kind = (
            SpanKind.CONSUMER if operation == "process"
            else SpanKind.PRODUCER if operation == "send"
            else SpanKind.INTERNAL
        )  # fmt: skip
        span = self._tracer.start_span(name, parent, span_kind, attributes)
        made = trace.set_span_in_context(span, parent)
        self._spans[message_id] = span
        scope_token: Token[_Scope | None] | None = None
        if scope is None:
            scope = _Scope(made, message_id)
            scope_token = self._scope.set(scope)
        else:
            scope.ids.append(message_id)
        return _Message(span, otel_context.attach(made), scope, scope_token)

    def finished(self, token: object, error: BaseException | None) -> None:
        """End the span `started` returned, with the handling's outcome (pybus's `Instrumentation`)."""
        if not isinstance(token, _Message):
            return
        try:
            _end(token.span, error)
        except Exception:
            _logger.warning("pybus.otel could not end a message span", exc_info=True)
        finally:
            otel_context.detach(token.token)
            if token.scope_token is not None and token.scope is not None:
                # The top-level handling is over, and so is its cascade: forget its spans.
                token.scope.open = False
                for message_id in token.scope.ids:
                    self._spans.pop(message_id, None)
                try:
                    self._scope.reset(token.scope_token)
                except ValueError:  # pragma: no cover - the engines call started/finished in one context
                    _logger.warning("pybus.otel: a message span finished in another context")

    def _routes_table(self) -> dict[object, str]:
        routes = self._routes
        if routes is None:
            routes = self._routes = dict(self._dp.routes)
        return routes

    def _message_info(self, operation: str, kind: Kind, message: object) -> tuple[str, Attributes]:
        key = message_key(message)
        found = self._messages.get((operation, key))
        if found is not None:
            return found
        name = key_name(key)
        attributes: Attributes = {
            "messaging.system": "pybus",
            "messaging.operation.type": "send" if operation == "send" else "process",
            "messaging.operation.name": operation,
            "pybus.kind": kind,
            "pybus.key": name,
        }
        route = self._routes_table().get(key)
        if route is not None and operation in ("send", "process"):
            attributes["messaging.destination.name"] = route
        found = (f"{operation} {name}", attributes)
        self._messages[(operation, key)] = found
        return found

    def _propagation(self) -> TextMapPropagator:
        return self._propagator if self._propagator is not None else propagate.get_global_textmap()

    # -- the trace context in routed envelopes: a header source ----------------

    def inject(self, headers: dict[str, str]) -> None:
        """Add the current trace context to the headers of a routed envelope being sent."""
        try:
            self._propagation().inject(headers, None, _HEADERS_SETTER)
        except Exception:
            _logger.warning("pybus.otel could not add the trace context to an envelope", exc_info=True)

    # -- handler spans and metrics: a dispatcher-wide middleware ---------------

    async def middleware(self, message: Any, call_next: CallNext) -> Any:
        """Run the rest of the chain and the handler inside a handler span, and count it."""
        try:
            handling = self._handler_started()
        except Exception:
            _logger.warning("pybus.otel could not start a handler span", exc_info=True)
            handling = None
        if handling is None:
            return await call_next(message)
        try:
            result = await call_next(message)
        except BaseException as exc:
            self._handler_finished(handling, exc)
            raise
        self._handler_finished(handling, None)
        return result

    def _handler_started(self) -> _HandlerCall | None:
        record = current_record()
        if record is None:  # pragma: no cover - an instrumented dispatcher tracks every handling
            return None
        handler, attempt, _ = record
        info = self._handlers.get(handler)
        if info is None:
            info = self._handlers[handler] = _Handler(handler)
        attributes = dict(info.attributes)
        attributes["pybus.attempt"] = attempt
        span = self._tracer.start_span(info.name, attributes=attributes)
        token = otel_context.attach(trace.set_span_in_context(span))
        return span, token, info, time.perf_counter()

    def _handler_finished(self, handling: _HandlerCall, error: BaseException | None) -> None:
        span, token, info, started = handling
        elapsed = time.perf_counter() - started
        try:
            _end(span, error)
        except Exception:
            _logger.warning("pybus.otel could not end a handler span", exc_info=True)
        finally:
            otel_context.detach(token)
        try:
            if error is None:
                labels = info.ok
                self._handled.add(1, labels)
            elif isinstance(error, asyncio.CancelledError):
                labels = info.cancelled
            else:
                labels = {**info.failed, "error.type": type(error).__qualname__}
                self._failed.add(1, labels)
            self._duration.record(elapsed, labels)
        except Exception:
            _logger.warning("pybus.otel could not record the metrics of a handler call", exc_info=True)


class _HeadersGetter(Getter[Mapping[str, str]]):
    """Reads an envelope's headers for a propagator."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


class _HeadersSetter(Setter[dict[str, str]]):
    """Writes an envelope's headers for a propagator."""

    def set(self, carrier: dict[str, str], key: str, value: str) -> None:
        carrier[key] = value


_HEADERS_GETTER = _HeadersGetter()
_HEADERS_SETTER = _HeadersSetter()


def _histogram(meter: metrics.Meter) -> metrics.Histogram:
    name, unit = "pybus.handling.duration", "s"
    description = "Duration of handler calls (with the middleware inside the instrumentation's)"
    try:
        return meter.create_histogram(
            name, unit, description, explicit_bucket_boundaries_advisory=DURATION_BUCKETS
        )
    except TypeError:  # opentelemetry-api < 1.30 takes no advice: the SDK's default buckets apply
        return meter.create_histogram(name, unit, description)


def _end(span: Span, error: BaseException | None) -> None:
    """Set the outcome of `span` and end it: a failure is recorded, with status ERROR."""
    if error is None:
        span.set_attribute("pybus.outcome", "ok")
    elif isinstance(error, asyncio.CancelledError):
        span.set_attribute("pybus.outcome", "cancelled")
    else:
        span.set_attribute("pybus.outcome", "failed")
        span.set_attribute("error.type", type(error).__qualname__)
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end()
