"""`import pybus` loads the in-process dispatcher only: no transport, codec or consumer
module, no optional dependency, until the application uses one. Each check runs in a
fresh interpreter, since this test process has long imported everything. (How long the
import takes is measured by tests/benchmarks/bench_import.py, not here.)"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

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
