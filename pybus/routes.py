"""What a dispatcher routes where, and the message flow between handlers.

`routes(dp)` lists every registration; `message_flow(dp)` builds the graph
`pybus graph` draws: messages to their handlers, handlers to the messages they
emit. What a handler emits is read from its return annotation (a class, a
union of classes, `Literal["string key"]`) and from what it declares with
`register(..., emits=[...])`. Only message types are drawn: keys registered
in the dispatcher, subclasses of `pybus.Event`, and declared types; a handler
returning `int` returns a result, not an event.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pybus.dispatcher import Dispatcher
from pybus.errors import Kind, key_name
from pybus.handlers import Handler, callable_name, resolved_hints
from pybus.messages import Event
from pybus.providers import Provider
from pybus.retry import Retry
from pybus.routers import EventRouter, RequestRouter


@dataclass(frozen=True, slots=True)
class Route:
    """One registration, described for people and for `--json`."""

    kind: Kind
    key: str
    handler: str
    location: str
    injected: dict[str, str]
    timeout: float | None
    emits: list[str]
    output_known: bool
    transport: str | None = None
    middleware: list[str] = field(default_factory=list)
    #: The retry policy that applies (the registration's, the router's or the dispatcher's).
    retry: str | None = None


@dataclass(slots=True)
class Flow:
    """Nodes and edges of the message flow.

    `messages` maps a node id to (kind, label, handled); `handlers` maps a node
    id to (label, output known); edges are (from, to).
    """

    messages: dict[str, tuple[str, str, bool]] = field(default_factory=dict)
    handlers: dict[str, tuple[str, bool]] = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)

    def to_mermaid(self) -> str:
        lines = ["flowchart LR"]
        for node, (kind, label, handled) in self.messages.items():
            text = f"{kind} {label}" + ("" if handled else " (no handler)")
            lines.append(f'    {node}["{_escape(text)}"]' + ("" if handled else ":::unhandled"))
        for node, (label, known) in self.handlers.items():
            text = label + ("" if known else " (output unknown)")
            lines.append(f'    {node}("{_escape(text)}")' + ("" if known else ":::unknown"))
        lines.extend(f"    {source} --> {target}" for source, target in self.edges)
        lines.append("    classDef unhandled stroke-dasharray: 5 5")
        lines.append("    classDef unknown fill:#fff4dd")
        return "\n".join(lines)

    def to_dot(self) -> str:
        lines = ["digraph pybus {", "    rankdir=LR;"]
        for node, (kind, label, handled) in self.messages.items():
            text = f"{kind} {label}" + ("" if handled else " (no handler)")
            style = "" if handled else ", style=dashed"
            lines.append(f'    {node} [shape=box, label="{_escape(text)}"{style}];')
        for node, (label, known) in self.handlers.items():
            text = label + ("" if known else " (output unknown)")
            style = "" if known else ", style=filled, fillcolor=lightyellow"
            lines.append(f'    {node} [shape=ellipse, label="{_escape(text)}"{style}];')
        lines.extend(f"    {source} -> {target};" for source, target in self.edges)
        lines.append("}")
        return "\n".join(lines)


def _escape(text: str) -> str:
    return text.replace('"', "'")


def registrations(dp: Dispatcher) -> Iterator[Handler]:
    """Every registration: commands, then queries, then events, each in registration order."""
    for router in (dp.commands, dp.queries, dp.events):
        for found in router.handlers.values():
            yield from found


def _router(dp: Dispatcher, handler: Handler) -> EventRouter | RequestRouter:
    return dp.events if handler.kind == "event" else dp.commands if handler.kind == "command" else dp.queries


def _describe_retry(policy: Retry | None) -> str | None:
    return None if policy is None else str(policy)


def _describe_bound(value: object) -> str:
    return repr(value) if isinstance(value, Provider) else f"<{type(value).__name__}>"


def emitted(dp: Dispatcher, handler: Handler) -> tuple[list[object], bool]:
    """The message keys a handler emits, and whether its output is fully known."""
    returned, known = _returned_types(handler)
    keys: list[object] = [t for t in returned if _is_message(dp, t)]
    keys.extend(key for key in handler.emits if key not in keys)
    if handler.collects_events and not handler.emits:
        known = False  # what it collects is only known if declared
    return keys, known


def _is_message(dp: Dispatcher, key: object) -> bool:
    if isinstance(key, str):
        return True
    return isinstance(key, type) and (issubclass(key, Event) or dp.registered_kind(key) is not None)


def _returned_types(handler: Handler) -> tuple[list[object], bool]:
    target = handler.target
    func = getattr(target, handler.method) if handler.method else target
    # Each annotation resolved on its own: a parameter's that does not resolve leaves the return's.
    hints, _ = resolved_hints(typing.cast("Callable[..., typing.Any]", func))
    if "return" not in hints:  # none, or one that does not resolve: nothing can be said
        return [], False
    return _flatten(hints["return"])


def _flatten(annotation: object) -> tuple[list[object], bool]:
    if annotation is None or annotation is type(None):
        return [], True
    if annotation is typing.Any:
        return [], False
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        found: list[object] = []
        known = True
        for arg in typing.get_args(annotation):
            inner, inner_known = _flatten(arg)
            found.extend(inner)
            known = known and inner_known
        return found, known
    if origin is typing.Literal:
        return [arg for arg in typing.get_args(annotation) if isinstance(arg, str)], True
    if origin is not None:  # list[X], Awaitable[X]...: the object returned is the container
        return ([origin] if inspect.isclass(origin) else []), inspect.isclass(origin)
    if inspect.isclass(annotation):
        return [annotation], True
    return [], False  # Any, a TypeVar, a string that did not resolve


def routes(dp: Dispatcher) -> list[Route]:
    """Every registration, described; then the routed keys this process does not handle."""
    routed = dp.routes
    found = []
    for handler in registrations(dp):
        emits, known = emitted(dp, handler)
        found.append(
            Route(
                kind=handler.kind,
                key=key_name(handler.key),
                handler=handler.qualified_name,
                location=handler.location,
                injected={name: _describe_bound(value) for name, value in handler.bound.items()},
                timeout=handler.timeout if handler.timeout is not None else dp.default_timeout,
                emits=[key_name(key) for key in emits],
                output_known=known,
                transport=routed.get(handler.key),
                middleware=[
                    callable_name(mw).removesuffix(" instance")
                    for mw in _router(dp, handler).middleware_for(handler)
                ],
                retry=_describe_retry(_router(dp, handler).retry_for(handler)),
            )
        )
    for key, name in routed.items():
        if dp.registered_kind(key) is None:
            found.append(
                Route(
                    kind="event",
                    key=key_name(key),
                    handler="-",
                    location="-",
                    injected={},
                    timeout=None,
                    emits=[],
                    output_known=True,
                    transport=name,
                )
            )
    return found


def message_flow(dp: Dispatcher) -> Flow:
    """The graph of messages and handlers."""
    flow = Flow()
    node_of: dict[object, str] = {}

    def message_node(key: object) -> str:
        if key not in node_of:
            node_of[key] = f"m{len(node_of)}"
            kind = dp.registered_kind(key) or "event"
            flow.messages[node_of[key]] = (kind, key_name(key), _handled(dp, key))
        return node_of[key]

    for index, handler in enumerate(registrations(dp)):
        node = f"h{index}"
        emits, known = emitted(dp, handler)
        flow.handlers[node] = (handler.name, known)
        flow.edges.append((message_node(handler.key), node))
        flow.edges.extend((node, message_node(key)) for key in emits)
    return flow


def _handled(dp: Dispatcher, key: object) -> bool:
    if dp.registered_kind(key) is not None:
        return True
    return isinstance(key, type) and any(base in dp.events for base in key.__mro__)
