"""Routing through a transport, with the in-memory broker (Redis Streams works the
same way: see examples/redis_worker.py). A shop publishes OrderPaid and sends
ShipOrder; a billing service and a warehouse service, each a consumer group,
handle them with their own dispatchers.

Run: `uv run python examples/transport_in_memory.py` (needs pybus-cqrs[transport])
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from pybus import Dispatcher, Event
from pybus.consumer import current_envelope
from pybus.transport import InMemoryBroker, InMemoryTransport


@dataclass(frozen=True)
class OrderPaid(Event):
    order_id: int
    amount: float


@dataclass(frozen=True)
class ShipOrder:
    order_id: int


# --8<-- [start:routes]
def shop(broker: InMemoryBroker) -> Dispatcher:
    dp = Dispatcher(transport=InMemoryTransport(broker))  # RedisTransport(...) in production
    # The names the messages travel under; every process routing them uses the same.
    dp.route(OrderPaid, name="orders.paid")  # an event: every service gets it
    dp.route(ShipOrder, name="orders.ship", kind="command")  # a command handled by another process
    return dp


def service(broker: InMemoryBroker, group: str) -> Dispatcher:
    dp = Dispatcher(transport=InMemoryTransport(broker, group=group))  # the group is the service
    dp.route(OrderPaid, name="orders.paid")
    dp.route(ShipOrder, name="orders.ship", kind="command")
    return dp


# --8<-- [end:routes]


async def main() -> None:
    broker = InMemoryBroker()
    billing, warehouse = service(broker, "billing"), service(broker, "warehouse")
    done = asyncio.Event()

    @billing.events.register(OrderPaid)
    async def invoice(event: OrderPaid) -> None:
        envelope = current_envelope.get()
        attempt = envelope.attempt if envelope else 0
        print(f"[billing]   invoice for order {event.order_id}: {event.amount} (delivery {attempt})")

    @warehouse.events.register(OrderPaid)
    async def pick(event: OrderPaid) -> None:
        print(f"[warehouse] picking order {event.order_id}")

    @warehouse.commands.register(ShipOrder)
    async def ship(cmd: ShipOrder) -> None:
        print(f"[warehouse] shipped order {cmd.order_id}")
        done.set()

    # --8<-- [start:consume]
    async with shop(broker) as producer, billing, warehouse:
        consumers = [dp.consumer(concurrency=4, prefetch=2, wait=0.05) for dp in (billing, warehouse)]
        reading = [asyncio.create_task(consumer.run()) for consumer in consumers]
        await producer.publish(OrderPaid(1, 25.0))  # returns once the transport has it
        await producer.send(ShipOrder(1))
        await done.wait()
        for consumer in consumers:
            await consumer.stop(drain_timeout=10)  # stop reading, finish what is in flight
        await asyncio.gather(*reading)
    # --8<-- [end:consume]


if __name__ == "__main__":
    asyncio.run(main())
