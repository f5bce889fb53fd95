"""`import pybus` loads the in-process dispatcher only: no transport, codec or consumer
module, no optional dependency, until the application uses one. Each check runs in a
fresh interpreter, since this test process has long imported everything. (How long the
import takes is measured by tests/benchmarks/bench_import.py, not here.)

The records `import pybus` defines are plain classes, not dataclasses (`@dataclass`
compiles every method it makes at import); the tests at the end show that they behave
as the dataclasses they were: frozen, printed field by field, equal as before, copied
and pickled, and `Retry` still a dataclass for `dataclasses.replace`, `fields` and
`asdict`."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import pickle
import subprocess
import sys
import textwrap
from dataclasses import FrozenInstanceError, dataclass

import pytest

from pybus import Command, Dispatcher, ImproperlyConfigured, Retry
from pybus.handlers import Handler
from pybus.workers import EngineStatistics, Statistics

#: What `import pybus` must leave unloaded. (pybus.transport_routes is not here: every
#: Dispatcher keeps its routes in one, and `pybus.dispatcher` is a Dispatcher; it
#: imports the transport's modules only once a route exists.)
NOT_ON_IMPORT = {
    "pybus.transport",
    "pybus.consumer",
    "pybus.codec",
    "pybus.redis_streams",
    "pybus.redis_wire",
    "pybus.redis_dead_letters",
    "pybus.sqlalchemy",
    "pybus.otel",
    "pybus.cli",
    "pybus.testing",
    "redis",
    "sqlalchemy",
    "opentelemetry",
    "pydantic",
    "msgspec",
    # The standard modules pybus once pulled in for message ids and retry jitter.
    "uuid",
    "platform",
    "random",
}
TRANSPORT = {"pybus.transport", "pybus.codec", "pybus.consumer"}


def loaded_by(script: str) -> dict[str, list[str]]:
    """Run `script` in a fresh interpreter; it calls `loaded(stage)` after each step, which
    records the modules loaded since the interpreter started the script."""
    prelude = textwrap.dedent(
        """
        import json, sys
        _before = set(sys.modules)
        _stages = {}

        def loaded(stage):
            _stages[stage] = sorted(set(sys.modules) - _before)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script) + "\nprint(json.dumps(_stages))"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    stages: dict[str, list[str]] = json.loads(done.stdout.splitlines()[-1])
    return stages


def top_level(modules: list[str]) -> set[str]:
    """The modules and, for a package's submodules outside pybus, their top-level package."""
    return {name if name.startswith("pybus.") else name.split(".")[0] for name in modules}


def test_import_pybus_loads_no_transport_codec_consumer_nor_optional_dependency() -> None:
    stages = loaded_by(
        """
        import pybus
        loaded("import")
        dp = pybus.Dispatcher()
        loaded("dispatcher")
        """
    )
    for stage in ("import", "dispatcher"):
        modules = top_level(stages[stage])
        assert "pybus.dispatcher" in modules  # the dispatcher itself is there
        assert not modules & NOT_ON_IMPORT, (stage, sorted(modules & NOT_ON_IMPORT))


def test_every_public_name_imports_without_a_transport() -> None:
    stages = loaded_by(
        """
        import pybus
        for name in pybus.__all__:
            exec(f"from pybus import {name}")
        loaded("names")
        """
    )
    assert not top_level(stages["names"]) & NOT_ON_IMPORT


def test_a_transport_still_works_and_loads_its_modules_when_used() -> None:
    stages = loaded_by(
        """
        import asyncio
        from dataclasses import dataclass

        from pybus import Dispatcher, Event
        from pybus.transport import InMemoryBroker, InMemoryTransport

        @dataclass(frozen=True)
        class OrderPaid(Event):
            order_id: int

        broker = InMemoryBroker()
        shop = Dispatcher(transport=InMemoryTransport(broker))
        shop.route(OrderPaid, name="orders.paid")
        billing = Dispatcher(transport=InMemoryTransport(broker, group="billing"))
        billing.route(OrderPaid, name="orders.paid")
        heard = []

        @billing.events.register(OrderPaid)
        async def invoice(event: OrderPaid) -> None:
            heard.append(event)

        loaded("routed")

        async def main() -> None:
            async with shop, billing:
                loaded("started")
                consumer = billing.consumer(wait=0.01)
                loaded("consumer")
                reading = asyncio.create_task(consumer.run())
                await shop.publish(OrderPaid(1))
                while not heard:
                    await asyncio.sleep(0.001)
                await consumer.stop(drain_timeout=5)
                await reading

        asyncio.run(main())
        assert heard == [OrderPaid(1)], heard
        loaded("consumed")
        """
    )
    assert "pybus.transport" in stages["routed"]  # imported by the application
    assert "pybus.consumer" not in stages["started"]  # a producer needs no consumer
    assert {"pybus.transport", "pybus.codec"} <= set(stages["started"])
    assert TRANSPORT <= set(stages["consumer"])
    assert TRANSPORT <= set(stages["consumed"])


def test_import_pybus_defines_no_dataclass_but_retry() -> None:
    stages = loaded_by(
        """
        import dataclasses
        import pybus
        _stages["dataclasses"] = sorted(
            f"{name}.{value.__qualname__}"
            for name, module in list(sys.modules.items())
            if name == "pybus" or name.startswith("pybus.")
            for value in vars(module).values()
            if isinstance(value, type) and value.__module__ == name and dataclasses.is_dataclass(value)
        )
        """
    )
    assert stages["dataclasses"] == ["pybus.retry.Retry"]


@dataclass(frozen=True)
class Pay(Command[None]):
    order: int


async def pay(command: Pay) -> None:
    pass


#: Handler's fields, in the order the dataclass it was printed them.
HANDLER_FIELDS = (
    "kind", "key", "target", "name", "location", "message_param", "message_by_keyword", "bound",
    "is_class", "method", "is_async", "collects_events", "timeout", "emits", "middleware", "retry",
    "context_params",
)  # fmt: skip


def test_a_registration_record_is_frozen_printed_field_by_field_and_equal_only_to_itself() -> None:
    dp = Dispatcher()
    handler = dp.commands.bind(Pay, pay)
    with pytest.raises(FrozenInstanceError, match="cannot assign to field 'timeout'"):
        handler.timeout = 5
    with pytest.raises(FrozenInstanceError, match="cannot delete field 'name'"):
        del handler.name
    fields = ", ".join(f"{name}={getattr(handler, name)!r}" for name in HANDLER_FIELDS)
    assert repr(handler) == f"Handler({fields})"
    assert repr(handler).startswith(f"Handler(kind='command', key={Pay!r}, target={pay!r}, name='pay', ")
    twin = copy.copy(handler)
    assert isinstance(twin, Handler)
    assert all(getattr(twin, name) is getattr(handler, name) for name in HANDLER_FIELDS)
    assert twin != handler  # a registration is equal only to itself
    assert len({handler, twin}) == 2


def test_statistics_are_frozen_snapshots_equal_by_value() -> None:
    stats = Dispatcher().statistics()
    empty = "EngineStatistics(queued=0, in_flight=0, handled=0, failed=0, active_keys=0, unhandled=0)"
    assert repr(stats.commands) == empty
    assert repr(stats) == f"Statistics(events={empty}, commands={empty}, queries={empty})"
    assert stats.events == EngineStatistics(0, 0, 0, 0)
    assert stats.events == EngineStatistics(0, 0, 0, 0, active_keys=0, unhandled=0)
    assert stats.events != EngineStatistics(0, 0, 1, 0)
    assert stats.events != (0, 0, 0, 0, 0, 0)  # not a tuple
    assert hash(stats.events) == hash(EngineStatistics(0, 0, 0, 0))
    assert stats == Statistics(events=stats.events, commands=stats.events, queries=stats.events)
    assert len({stats, Dispatcher().statistics()}) == 1
    with pytest.raises(FrozenInstanceError, match="cannot assign to field 'handled'"):
        stats.events.handled = 1
    with pytest.raises(FrozenInstanceError, match="cannot delete field 'events'"):
        del stats.events
    assert pickle.loads(pickle.dumps(stats)) == stats
    assert copy.deepcopy(stats) == stats


def test_retry_is_the_frozen_dataclass_it_was() -> None:
    fields = dataclasses.fields(Retry)
    assert [field.name for field in fields] == [
        "attempts", "delay", "multiplier", "max_delay", "jitter", "on", "never"
    ]  # fmt: skip
    # The written-out __init__ takes the fields, in their order, with their defaults.
    parameters = list(inspect.signature(Retry).parameters.values())
    assert [(p.name, p.default) for p in parameters] == [(field.name, field.default) for field in fields]
    # What @dataclass(frozen=True) would have made of the same fields, to compare with.
    made = dataclasses.make_dataclass(
        "Retry", [(field.name, field.type, field.default) for field in fields], frozen=True
    )
    policy = Retry(attempts=5, delay=0.5, jitter=0.2, on=(ConnectionError, TimeoutError))
    generated = made(**dataclasses.asdict(policy))
    assert repr(policy) == repr(generated)
    assert repr(Retry()) == repr(made())
    assert hash(policy) == hash(generated)
    assert policy == Retry(attempts=5, delay=0.5, jitter=0.2, on=(ConnectionError, TimeoutError))
    assert policy != Retry(attempts=5, delay=0.5, jitter=0.2)
    assert policy != generated  # another class, as between two dataclasses
    assert dataclasses.astuple(policy) == dataclasses.astuple(generated)
    assert Retry.__match_args__ == tuple(field.name for field in fields)
    # replace() goes through __init__, which checks the new policy.
    replaced = dataclasses.replace(policy, attempts=2, never=(KeyError,))
    assert replaced == Retry(2, 0.5, 2.0, 30.0, 0.2, (ConnectionError, TimeoutError), (KeyError,))
    with pytest.raises(ImproperlyConfigured, match=r"Retry\(attempts=0\)"):
        dataclasses.replace(policy, attempts=0)
    with pytest.raises(FrozenInstanceError):
        policy.attempts = 1  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(policy)) == policy
    assert copy.copy(policy) == policy


def test_the_redis_transport_without_redis_py_names_the_extra_to_install() -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["redis"] = None  # as if redis-py were not installed
        try:
            import pybus.redis_streams
        except ModuleNotFoundError as error:
            print(error)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "pip install 'pybus-cqrs[redis]'" in done.stdout
