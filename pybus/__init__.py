"""pybus: an asyncio dispatcher for commands, queries and events."""

from pybus.context import HandlingContext, current_context
from pybus.dispatcher import Dispatcher
from pybus.engines import EventEngine, RequestEngine
from pybus.errors import (
    CascadeDepthExceeded,
    ComingFromIambus,
    DecodeError,
    DispatcherClosed,
    DispatcherFrozen,
    DispatcherNotStarted,
    ForeignEventLoop,
    HandlerAlreadyRegistered,
    HandlerFailures,
    HandlerNotFound,
    HandlerSignatureError,
    ImproperlyConfigured,
    InvalidMessage,
    ProviderError,
    PyBusError,
    QueueFull,
    TrackingTimeout,
    TransportError,
    WouldDeadlock,
)
from pybus.handlers import HandlerProtocol
from pybus.lifecycle import State
from pybus.messages import Command, Event, EventCollector, Query
from pybus.middleware import CallNext, Middleware
from pybus.providers import Factory, Singleton
from pybus.retry import Retry
from pybus.routers import EventRouter, RequestRouter
from pybus.unit_of_work import UnitOfWork

__version__ = "0.1.0"

_IAMBUS_NAMES = {
    "AbstractHandler": "subclass pybus.EventCollector (add_event/dump_events), or write a plain "
    "class with a handle() method",
    "EventHandlerMap": "pybus has no handler maps to build: register handlers with "
    "@dp.events.register(Key) or dp.events.bind(Key, handler); dp.events.handlers shows them",
    "RequestHandlerMap": "pybus has no handler maps to build: register command and query handlers "
    "with @dp.commands.register(Key) / @dp.queries.register(Key) or dp.commands.bind(Key, handler); "
    "dp.commands.handlers shows them",
}


def __getattr__(name: str) -> object:
    if name in _IAMBUS_NAMES:
        raise ComingFromIambus(f"pybus.{name} is iambus's; in pybus: {_IAMBUS_NAMES[name]}")
    raise AttributeError(f"module 'pybus' has no attribute {name!r}")


#: A ready dispatcher for applications that need one: `from pybus import dispatcher as dp`.
dispatcher = Dispatcher()

__all__ = [
    "CallNext",
    "CascadeDepthExceeded",
    "ComingFromIambus",
    "Command",
    "DecodeError",
    "Dispatcher",
    "DispatcherClosed",
    "DispatcherFrozen",
    "DispatcherNotStarted",
    "Event",
    "EventCollector",
    "EventEngine",
    "EventRouter",
    "Factory",
    "ForeignEventLoop",
    "HandlerAlreadyRegistered",
    "HandlerFailures",
    "HandlerNotFound",
    "HandlerProtocol",
    "HandlerSignatureError",
    "HandlingContext",
    "ImproperlyConfigured",
    "InvalidMessage",
    "Middleware",
    "ProviderError",
    "PyBusError",
    "Query",
    "QueueFull",
    "RequestEngine",
    "RequestRouter",
    "Retry",
    "Singleton",
    "State",
    "TrackingTimeout",
    "TransportError",
    "UnitOfWork",
    "WouldDeadlock",
    "__version__",
    "current_context",
    "dispatcher",
]
