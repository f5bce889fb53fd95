"""`pybus.__all__` is the public API: sorted, complete, and every name importable."""

from __future__ import annotations

import subprocess
import sys

import pybus


def test_all_is_sorted() -> None:
    assert pybus.__all__ == sorted(pybus.__all__)


def test_all_equals_the_public_names() -> None:
    public = {
        name
        for name, value in vars(pybus).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith("pybus")
    }
    public |= {"__version__", "dispatcher", "Middleware"}  # Middleware: a type alias
    assert set(pybus.__all__) == public


def test_every_exported_name_is_importable() -> None:
    for name in pybus.__all__:
        assert getattr(pybus, name) is not None, name


def test_design_card_names_are_exported() -> None:
    core = {
        "Dispatcher", "dispatcher", "EventRouter", "RequestRouter", "EventEngine", "RequestEngine",
        "HandlerProtocol", "Command", "Query", "Event", "PyBusError", "ImproperlyConfigured",
        "HandlerNotFound", "HandlerAlreadyRegistered", "HandlerSignatureError", "DispatcherFrozen",
        "DispatcherNotStarted", "CascadeDepthExceeded", "Singleton", "Factory", "QueueFull",
        "DispatcherClosed",
    }  # fmt: skip
    assert core <= set(pybus.__all__)


def test_default_dispatcher_is_a_dispatcher() -> None:
    assert isinstance(pybus.dispatcher, pybus.Dispatcher)
    assert not pybus.dispatcher.started


def test_import_has_no_side_effects() -> None:
    # A fresh interpreter: importing pybus configures no logging, installs no
    # signal handler and starts nothing.
    code = (
        "import logging, signal, threading\n"
        "before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))\n"
        "import pybus\n"
        "from pybus import dispatcher as dp\n"
        "assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before\n"
        "assert logging.getLogger().handlers == []\n"
        "assert logging.getLogger('pybus').handlers == []\n"
        "assert logging.getLogger('pybus').level == logging.NOTSET\n"
        "assert threading.active_count() == 1\n"
        "assert not dp.started\n"
        "print('clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "clean"
