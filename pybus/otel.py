"""OpenTelemetry for a dispatcher: spans, trace context across transports, and metrics.

`instrument(dp)` (before `dp.start()`) makes the dispatcher report through the
OpenTelemetry API, to the providers given or the global ones:

- a **message span** for each message handled: a top-level `execute`, `query` or
  `publish` (its follow-ups inside it), each follow-up event, each message a
  transport consumer delivers. A follow-up's span is the child of the span of
  the message whose handling produced it; a message sent or executed from
  inside a handler is the child of that handler's span, one from the error hook
  the child of the failed message's span; a delivered message continues the
  trace of the sender, read from the envelope's headers.
- a **handler span** for each call of a handler (each retry attempt is a call),
  the child of its message's span, made by a dispatcher-wide middleware;
- the **W3C trace context** added to the headers of every routed envelope sent;
- **metrics**: the counters `pybus.handled` and `pybus.failed` and the histogram
  `pybus.handling.duration` (seconds), per handler call.

docs/tracing.md describes the names and attributes. The core of pybus never
imports this module; it needs the extra `pybus-cqrs[otel]` (opentelemetry-api).
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Mapping, Sequence
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

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
        "install it with: pip install 'pybus-cqrs[otel]'"
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

#: How many failed top-level handlings a `Telemetry` keeps the span of, for the error hook.
KEPT_FAILURES = 1024

#: How many registrations and message keys a `Telemetry` keeps the span names of.
CACHED = 1024


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
    """The message spans of one top-level handling and of the follow-ups in its cascade."""

    __slots__ = ("ids", "open")

    def __init__(self, message_id: int | str) -> None:
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
        #: The key, in the OpenTelemetry context a message span makes current, of that message's id:
        #: code running inside a message's handling finds it there.
        self._inside = otel_context.create_key(f"pybus.otel.message.{id(self)}")
        #: The spans of the last top-level handlings that failed (KEPT_FAILURES at most), by
        #: message id: the parents of what the error hook sends when it reports their failure.
        self._failures: dict[int | str, Span] = {}
        #: Names and attributes by registration (its kind, key, name and location: not the
        #: registration itself, which holds the handler) and by message key; CACHED at most each.
        self._handlers: dict[tuple[str, object, str, str], _Handler] = {}
        self._messages: dict[tuple[str, object], tuple[str, Attributes]] = {}
        #: Header names a propagator gave a value that is not a string (warned about once).
        self._bad_headers: set[object] = set()

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
        except BaseException as exc:
            if not _otel_failure(exc):
                raise
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
            parent = current
            if causation_id is not None:
                record = current_record()
                if record is not None and record[2][0] == causation_id:
                    # Started from inside the handling of its cause (a handler, a middleware, a
                    # task they started, the error hook reporting its failure): a top-level
                    # handling of its own. Its parent is what is current there, if that is
                    # inside the cause's handling (a handler span, or the cause's message span
                    # under a middleware outside the instrumentation's).
                    if otel_context.get_value(self._inside, current) != causation_id:
                        # Not inside it (the error hook runs in the context the failed message
                        # was sent from): the cause's span, if still known.
                        cause = self._spans.get(causation_id)
                        if cause is None:
                            cause = self._failures.get(causation_id)
                        if cause is not None:
                            parent = trace.set_span_in_context(cause, current)
                else:
                    # A follow-up, published by the cascade after its cause's handler returned:
                    # its parent is the cause's message span, and it belongs to the cascade's scope.
                    found = self._scope.get()
                    if found is not None and found.open:
                        scope = found
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
        made = otel_context.set_value(self._inside, message_id, trace.set_span_in_context(span, parent))
        token = otel_context.attach(made)
        self._spans[message_id] = span
        scope_token: Token[_Scope | None] | None = None
        if scope is None:
            scope = _Scope(message_id)
            scope_token = self._scope.set(scope)
        else:
            scope.ids.append(message_id)
        return _Message(span, token, scope, scope_token)

    def finished(self, token: object, error: BaseException | None) -> None:
        """End the span `started` returned, with the handling's outcome (pybus's `Instrumentation`)."""
        if not isinstance(token, _Message):
            return
        # The scope a top-level handling opened (None for a follow-up's span).
        scope = token.scope if token.scope_token is not None else None
        try:
            _end(token.span, error)
            if scope is not None and error is not None and not isinstance(error, asyncio.CancelledError):
                # Kept for the error hook, which reports the failure once the handling is over.
                failed = trace.NonRecordingSpan(token.span.get_span_context())
                _keep(self._failures, scope.ids[0], failed, KEPT_FAILURES)
        except (Exception, asyncio.CancelledError):  # the handling's outcome is decided: never raised
            _logger.warning("pybus.otel could not end a message span", exc_info=True)
        finally:
            otel_context.detach(token.token)
            if scope is not None and token.scope_token is not None:
                # The top-level handling is over, and so is its cascade: forget its spans.
                scope.open = False
                for message_id in scope.ids:
                    self._spans.pop(message_id, None)
                scope.ids.clear()
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
        _keep(self._messages, (operation, key), found, CACHED)
        return found

    def _propagation(self) -> TextMapPropagator:
        return self._propagator if self._propagator is not None else propagate.get_global_textmap()

    # -- the trace context in routed envelopes: a header source ----------------

    def inject(self, headers: dict[str, str]) -> None:
        """Add the current trace context to the headers of a routed envelope being sent.

        The propagator writes into a dict of its own: only string values under string
        names reach `headers` (a header source must add strings), the others are logged."""
        written: dict[Any, Any] = {}
        try:
            self._propagation().inject(written, None, _HEADERS_SETTER)
        except BaseException as exc:
            if not _otel_failure(exc):
                raise
            _logger.warning("pybus.otel could not add the trace context to an envelope", exc_info=True)
            return
        for name, value in written.items():
            if isinstance(name, str) and isinstance(value, str):
                headers[name] = value
            elif name not in self._bad_headers:  # warned about once per name
                if len(self._bad_headers) < CACHED:
                    self._bad_headers.add(name)
                _logger.warning(
                    "pybus.otel left the header %r out of an envelope: the propagator's value is of "
                    "type %s, not a string",
                    name,
                    type(value).__name__,
                )

    # -- handler spans and metrics: a dispatcher-wide middleware ---------------

    async def middleware(self, message: Any, call_next: CallNext) -> Any:
        """Run the rest of the chain and the handler inside a handler span, and count it."""
        try:
            handling = self._handler_started()
        except BaseException as exc:
            if not _otel_failure(exc):
                raise
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
        registration = (handler.kind, handler.key, handler.name, handler.location)
        info = self._handlers.get(registration)
        if info is None:
            info = _Handler(handler)
            _keep(self._handlers, registration, info, CACHED)
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
        except (Exception, asyncio.CancelledError):  # the call's outcome is decided: never raised
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
                labels = {**info.failed, "error.type": key_name(type(error))}
                self._failed.add(1, labels)
            self._duration.record(elapsed, labels)
        except (Exception, asyncio.CancelledError):
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
    """Set the outcome of `span` and end it: a failure is recorded, with status ERROR.

    The span is ended whatever setting its outcome raises (which is then raised)."""
    try:
        if error is None:
            span.set_attribute("pybus.outcome", "ok")
        elif isinstance(error, asyncio.CancelledError):
            span.set_attribute("pybus.outcome", "cancelled")
        else:
            name = key_name(type(error))
            description = _describe(error, name)
            span.set_attribute("pybus.outcome", "failed")
            span.set_attribute("error.type", name)
            span.set_status(Status(StatusCode.ERROR, description))
            try:
                span.record_exception(error)
            except Exception:  # its str() raised, say: recorded as the SDK would, with the description
                cls = type(error)
                module = cls.__module__
                span.add_event(
                    "exception",
                    {
                        "exception.type": cls.__qualname__
                        if module == "builtins"
                        else f"{module}.{cls.__qualname__}",
                        "exception.message": description,
                        "exception.stacktrace": "".join(traceback.format_exception(error)),
                        "exception.escaped": "False",
                    },
                )
    finally:
        span.end()


def _describe(error: BaseException, name: str) -> str:
    """`"Name: message"`, or the name alone when the exception cannot be made a string."""
    try:
        return f"{name}: {error}"
    except Exception:
        return name


def _otel_failure(exc: BaseException) -> bool:
    """Whether `exc`, raised by OpenTelemetry's code, is a failure of OpenTelemetry (logged,
    and the handling goes on) rather than something to raise.

    A `CancelledError` raised by a synchronous call is not the cancellation of the task
    (which comes in at an `await`), unless the task is being cancelled all the same.
    """
    if isinstance(exc, Exception):
        return True
    if not isinstance(exc, asyncio.CancelledError):
        return False  # KeyboardInterrupt, SystemExit
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop running
        return True
    return task is None or not task.cancelling()


_K = TypeVar("_K")
_V = TypeVar("_V")


def _keep(cache: dict[_K, _V], key: _K, value: _V, limit: int) -> None:
    """`cache[key] = value`, dropping the oldest entry when `cache` holds `limit` already."""
    if len(cache) >= limit and key not in cache:
        del cache[next(iter(cache))]
    cache[key] = value
