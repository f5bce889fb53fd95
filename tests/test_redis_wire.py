"""The Redis transport's entry reading: the positional fast path for entries laid out as
pybus writes them (`redis_wire.new_envelopes`) and the general one, by field name
(`redis_wire.entry_envelope`), give the same envelope for every entry; the header check
done by msgspec accepts and refuses exactly what the earlier hand-written check did; a
round trip through a client without a socket timeout is bounded as a whole."""

from __future__ import annotations

import dataclasses
import signal
from typing import Any

import msgspec
import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from pybus import redis_wire as wire
from pybus.transport import Envelope
from tests.redis_server import redis_server

KEY = "pybus:orders.paid"
ID = b"1700000000000-0"


def old_read_header(data: bytes) -> list[Any]:
    """The header check the transport made before msgspec did it (pybus 0.1's, verbatim)."""
    header = msgspec.json.Decoder(list[str | dict[str, str] | None]).decode(data)
    ids, more = header[:5], header[5:]
    if (
        len(ids) != 5
        or not all(isinstance(item, str) for item in ids[:4])
        or not isinstance(ids[4], str | None)
        or len(more) > 1
        or (more and not isinstance(more[0], dict))
    ):
        raise ValueError("not a pybus header")
    return header


HEADERS = [
    b'["event","orders.paid","m1","c1",null]',
    b'["command","orders.pay","m1","c1","p1"]',
    b'["query","orders.get","m1","c1",null]',
    b'["signal","orders.paid","m1","c1",null]',  # an unknown kind is an event
    b'["event","orders.paid","m1","c1","p1",{"traceparent":"00-ab-cd-01"}]',
    b'["event","orders.paid","m1","c1","p1",{}]',
    b'["event","orders.paid","","",null]',
    b'["event","orders.paid","m1","c1","p1",null]',  # headers must be an object
    b'["event","orders.paid","m1","c1"]',  # too short
    b'["event","orders.paid","m1","c1",null,{},{}]',  # too long
    b'[1,"orders.paid","m1","c1",null]',
    b'["event","orders.paid","m1",null,null]',
    b'["event","orders.paid","m1","c1",7]',
    b'["event","orders.paid","m1","c1",null,{"a":1}]',
    b'["event","orders.paid","m1","c1",null,"x"]',
    b'{"kind":"event"}',
    b"not json",
    b"",
]


@pytest.mark.parametrize("data", HEADERS)
def test_the_header_check_accepts_and_refuses_what_it_did_before(data: bytes) -> None:
    try:
        expected: list[Any] | None = old_read_header(data)
    except (ValueError, msgspec.DecodeError):
        expected = None
    try:
        found = wire.read_header(data)
    except msgspec.DecodeError:
        assert expected is None, data
        return
    assert expected is not None, data
    assert [found.kind, found.name, found.message_id, found.correlation_id, found.causation_id] == expected[
        :5
    ]
    assert found.headers == (expected[5] if len(expected) > 5 else {})


def fields_of(header: bytes, body: bytes = b'{"n":1}') -> list[bytes]:
    return [b"i", b"m1", b"h", header, b"b", body]


ENTRIES: list[list[bytes] | None] = [
    *(fields_of(header) for header in HEADERS),
    fields_of(HEADERS[0], b""),
    [b"h", HEADERS[0], b"i", b"m1", b"b", b"{}"],  # another order: read by name
    [b"i", b"m1", b"h", HEADERS[0], b"b", b"{}", b"g", b"billing"],  # requeued for one group
    [b"i", b"m1", b"h", HEADERS[0], b"x", b"{}"],  # no body field
    [b"kind", b"event", b"name", b"x", b"body", b"{}"],  # another writer's
    [b"b", b"{}"],
    [],
    None,  # deleted while pending
]


def as_tuple(envelope: Envelope) -> tuple[object, ...]:
    values = [getattr(envelope, field.name) for field in dataclasses.fields(envelope)]
    return (*values[:-1], dict(envelope.headers))


@pytest.mark.parametrize("fields", ENTRIES)
def test_the_positional_read_gives_the_envelope_the_read_by_name_gives(fields: list[bytes] | None) -> None:
    ((receipt, fast, group),) = wire.new_envelopes(KEY, "pybus:", [[ID, fields]], 3)
    named = wire.pairs(fields)
    general = wire.entry_envelope(KEY, "pybus:", ID, named, 3)
    assert receipt == (KEY, ID) == fast.receipt
    assert as_tuple(fast) == as_tuple(general)
    assert group == named.get(b"g")
    assert fast.attempt == 3


def test_a_pybus_entry_is_read_as_it_was_written() -> None:
    sent = Envelope(
        "command", "orders.pay", b'{"n":1}', "m1", "c1", "p1", headers={"traceparent": "00-ab-cd-01"}
    )
    fields = wire.entry_fields(sent)
    raw = [value for name, value in fields.items() for value in (name.encode(), value)]
    raw = [value.encode() if isinstance(value, str) else value for value in raw]
    ((_, envelope, group),) = wire.new_envelopes("pybus:orders.pay", "pybus:", [[ID, raw]], 1)
    assert group is None
    assert as_tuple(envelope) == as_tuple(
        dataclasses.replace(sent, receipt=("pybus:orders.pay", ID), headers=dict(sent.headers))
    )


async def test_a_round_trip_without_a_socket_timeout_is_bounded_as_a_whole() -> None:
    """The transport's scripts and reads go through a client without a socket timeout;
    `execute` bounds each round trip instead, and closes a connection it gave up on, so
    that a late reply is never read as the answer to the next command."""
    with redis_server() as (url, process):
        client = wire.connect(url, timeout=None, connect_timeout=1)
        assert await wire.execute(client, [("ECHO", "up")], timeout=1) == [b"up"]
        process.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(RedisTimeoutError, match=r"^Redis did not answer within 0.2 s$"):
                await wire.execute(client, [("ECHO", "stale")], timeout=0.2)
        finally:
            process.send_signal(signal.SIGCONT)
        assert await wire.execute(client, [("ECHO", "fresh")], timeout=1) == [b"fresh"]
        await client.aclose()
