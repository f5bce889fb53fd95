"""What the Redis Streams transport keeps in Redis and runs there, and how it reads
the server's state (trimming, durability).

An entry of a message stream holds `i`, the message id (first, so a script can read
it), `h`, the header (kind, name, message id, correlation and causation ids) as a
JSON array, `b`, the body, and `g`, the one group it is for, when a dead letter was
requeued for that group. The Lua scripts do in one round trip, and atomically, what
would otherwise take several; they are sent by hash (EVALSHA) and loaded when the
server does not know them.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pybus.errors import Kind
from pybus.transport import NO_HEADERS, Envelope

Entry = tuple[str, bytes, dict[bytes, bytes]]  # stream key, entry id, fields
Receipt = tuple[str, bytes]  # stream key, entry id

_header = msgspec.json.Encoder()


class Header(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """An entry's `h` field: kind, name, message id, correlation id, causation id and, when
    the envelope has any, its headers (a JSON array of five or six items)."""

    kind: str
    name: str
    message_id: str
    correlation_id: str
    causation_id: str | None
    headers: dict[str, str] = {}


#: Decodes and checks a header in one call (msgspec.ValidationError, a DecodeError, when
#: it is not a pybus header).
read_header = msgspec.json.Decoder(Header).decode


# Marks the ids (ARGV[3], one per line) done at time ARGV[2], acks the entries
# (ARGV[4], one per line) of stream KEYS[2] in group ARGV[1], and forgets marks
# older than ARGV[5] when given. The marks come first: a crash in between leaves a
# message that is recognised as done when it comes again, never the reverse.
# Commands take up to 1,000 arguments each (Lua's unpack has a limit).
ACK = """
local marks = {}
for id in string.gmatch(ARGV[3], "[^\\n]+") do
    marks[#marks + 1] = ARGV[2]
    marks[#marks + 1] = id
    if #marks >= 1000 then
        redis.call("ZADD", KEYS[1], "NX", unpack(marks))
        marks = {}
    end
end
if #marks > 0 then
    redis.call("ZADD", KEYS[1], "NX", unpack(marks))
end
local entries = {}
local acked = 0
for entry in string.gmatch(ARGV[4], "[^\\n]+") do
    entries[#entries + 1] = entry
    if #entries >= 1000 then
        acked = acked + redis.call("XACK", KEYS[2], ARGV[1], unpack(entries))
        entries = {}
    end
end
if #entries > 0 then
    acked = acked + redis.call("XACK", KEYS[2], ARGV[1], unpack(entries))
end
if ARGV[5] ~= "" then
    redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", ARGV[5])
end
return acked
"""

# XADDs one entry per key: KEYS[n] gets the fields i, h and b = ARGV[3n-2], ARGV[3n-1],
# ARGV[3n]. Returns the entry ids. One command for a batch instead of one per entry:
# the client packs and parses one command, the server runs one script.
ADD = """
local ids = {}
for n = 1, #KEYS do
    ids[n] = redis.call("XADD", KEYS[n], "*", "i", ARGV[3 * n - 2], "h", ARGV[3 * n - 1], "b", ARGV[3 * n])
end
return ids
"""

# Reads up to ARGV[3] new entries in all of the streams KEYS[2], KEYS[3]... for
# consumer ARGV[2] of group ARGV[1] (XREADGROUP without blocking, one stream after the
# other, starting at the stream ARGV[4] modulo their number, so that no stream waits
# behind a busy one: XREADGROUP over several streams would take up to COUNT from each),
# and tells for each entry whether its message id (field i, written first) is marked
# done in KEYS[1]: the read and the de-duplication check in one round trip, one
# ZMSCORE per 1,000 entries. Returns {XREADGROUP's reply or {}, {a score or false per
# entry, in order}, newest}, where, when nothing was read, newest holds each stream's
# newest entry id ("0-0" for none): any entry added after this call has a greater id,
# so an XREAD (which takes nothing) blocking from those ids wakes for it.
TAKE = """
local streams = #KEYS - 1
local left = tonumber(ARGV[3])
local reply = {}
for step = 0, streams - 1 do
    if left <= 0 then break end
    local key = KEYS[2 + (tonumber(ARGV[4]) + step) % streams]
    local got = redis.call("XREADGROUP", "GROUP", ARGV[1], ARGV[2], "COUNT", left, "STREAMS", key, ">")
    if got then
        reply[#reply + 1] = got[1]
        left = left - #got[1][2]
    end
end
if #reply == 0 then
    local newest = {}
    for n = 2, #KEYS do
        local last = redis.call("XREVRANGE", KEYS[n], "+", "-", "COUNT", 1)
        newest[n - 1] = last[1] and last[1][1] or "0-0"
    end
    return {{}, {}, newest}
end
local ids = {}
for _, stream in ipairs(reply) do
    for _, entry in ipairs(stream[2]) do
        local fields = entry[2]
        ids[#ids + 1] = fields[1] == "i" and fields[2] or ""
    end
end
local done = {}
for first = 1, #ids, 1000 do
    local scores = redis.call("ZMSCORE", KEYS[1], unpack(ids, first, math.min(first + 999, #ids)))
    for _, score in ipairs(scores) do done[#done + 1] = score and 1 or 0 end
end
return {reply, done, {}}
"""

# Tells for each message id of ARGV[1] (one per line, an empty line an empty id) whether
# it is marked done in KEYS[1]: 1 or 0, in order. The ids travel as one argument: packing
# one argument per id costs the client more than this script costs Redis.
CHECK = """
local ids = {}
for id in string.gmatch(ARGV[1] .. "\\n", "([^\\n]*)\\n") do ids[#ids + 1] = id end
local done = {}
for first = 1, #ids, 1000 do
    local scores = redis.call("ZMSCORE", KEYS[1], unpack(ids, first, math.min(first + 999, #ids)))
    for _, score in ipairs(scores) do done[#done + 1] = score and 1 or 0 end
end
return done
"""

# Claims for consumer ARGV[2] of group ARGV[1] up to ARGV[4] entries of stream KEYS[1]
# that have been idle for ARGV[3] ms or more in any consumer, except the entries
# ARGV[5] (one per line: those this process holds). Finding them (XPENDING ... IDLE)
# and claiming them (XCLAIM, which counts a delivery) is one atomic step, and it looks
# at the whole pending list, not at a window of it. XCLAIM drops entries deleted by
# trimming from the pending list. Returns {XCLAIM's reply, {each entry's delivery count}}.
CLAIM = """
local skip, held = {}, 0
for id in string.gmatch(ARGV[5], "[^\\n]+") do
    skip[id] = true
    held = held + 1
end
local wanted = tonumber(ARGV[4])
local pending = redis.call("XPENDING", KEYS[1], ARGV[1], "IDLE", ARGV[3], "-", "+", wanted + held)
local ids, counts = {}, {}
for _, item in ipairs(pending) do
    if not skip[item[1]] and #ids < wanted then
        ids[#ids + 1] = item[1]
        counts[item[1]] = item[4]
    end
end
if #ids == 0 then return {{}, {}} end
local claimed = redis.call("XCLAIM", KEYS[1], ARGV[1], ARGV[2], ARGV[3], unpack(ids))
local attempts = {}
for n, entry in ipairs(claimed) do attempts[n] = counts[entry[1]] + 1 end
return {claimed, attempts}
"""

# Keeps the entries ARGV[5] (one per line) of stream KEYS[1] that are still pending for
# consumer ARGV[2] of group ARGV[1]: XCLAIM ... JUSTID resets their idle time (or sets
# it to ARGV[4] ms) and counts no delivery; with ARGV[3], their delivery count becomes
# that. Entries acked or claimed by another consumer meanwhile, and with ARGV[6] those
# idle that long or longer (given back, so not to be kept), are left alone and returned.
HOLD = """
local mine, lost = {}, {}
local limit = tonumber(ARGV[6])
for id in string.gmatch(ARGV[5], "[^\\n]+") do
    local found = redis.call("XPENDING", KEYS[1], ARGV[1], id, id, 1)
    if found[1] and found[1][2] == ARGV[2] and not (limit and found[1][3] >= limit) then
        mine[#mine + 1] = id
    else
        lost[#lost + 1] = id
    end
end
local options = {"JUSTID"}
if ARGV[3] ~= "" then
    options[#options + 1] = "RETRYCOUNT"
    options[#options + 1] = ARGV[3]
end
if ARGV[4] ~= "" then
    options[#options + 1] = "IDLE"
    options[#options + 1] = ARGV[4]
end
for first = 1, #mine, 500 do
    local args = {KEYS[1], ARGV[1], ARGV[2], 0}
    for n = first, math.min(first + 499, #mine) do args[#args + 1] = mine[n] end
    for _, option in ipairs(options) do args[#args + 1] = option end
    redis.call("XCLAIM", unpack(args))
end
return lost
"""


SCRIPTS = {"add": ADD, "ack": ACK, "take": TAKE, "check": CHECK, "claim": CLAIM, "hold": HOLD}
SHA = {
    name: hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest() for name, script in SCRIPTS.items()
}


def connect(url: str, *, timeout: float | None, connect_timeout: float) -> Any:
    """A client of `url` that never retries a command by itself: a retried XADD can write
    an entry twice, a retried requeue would find its letter gone. Typed loosely: reply
    types depend on decode_responses (off: replies are bytes). `timeout` is the socket
    timeout of each write and read; None for a client whose calls are bounded by their
    caller (`execute` with its `timeout`): redis-py writes in an `asyncio.wait_for`, a
    task and two turns of the event loop per write, only when a socket timeout is set.

    Its pool checks a connection before handing it out, and connects again, before
    anything is written, when the server has closed it (a restart of redis-server): a
    command is never sent into a dead connection, where it would fail after being
    written and leave unknown whether Redis ran it. redis-py skips that check while
    maintenance notifications (a Redis Cloud feature, RESP3 only) are "auto", its
    default since 7.0: they are turned off.
    """
    options: dict[str, Any] = {}
    try:
        from redis.maint_notifications import MaintNotificationsConfig
    except ImportError:  # redis-py < 7: no such notifications, the check is always made
        pass
    else:
        options["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    return aioredis.Redis.from_url(
        url,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        socket_timeout=timeout,
        socket_connect_timeout=connect_timeout,
        **options,
    )


async def execute(
    client: Any,
    commands: Sequence[Sequence[Any]],
    connected: Callable[[], None] | None = None,
    *,
    timeout: float | None = None,
) -> list[Any]:
    """Send `commands` in one round trip, on one connection of `client`'s pool, and return
    their replies as the server sent them (bytes, lists, None: no redis-py response
    callbacks). An error reply raises, once every reply has been read (the connection
    stays in step with the server). With `timeout`, a round trip not answered within
    it raises redis-py's `TimeoutError` and closes its connection, as a socket timeout
    does.

    The connection is taken here, before anything is sent, and `connected` is called
    once it is: a failure before that call sent nothing. Scripts go by their hash:
    redis-py's Script objects would ask SCRIPT EXISTS before every pipeline. When the
    server does not know them (first use, a restart, SCRIPT FLUSH), the scripts are
    loaded and the commands from the first that failed on are sent once more; those
    before it ran and are not sent again, so a command that must not run twice (an
    `XREADGROUP ... >`) goes before any script.
    """
    if timeout is None:
        return await _execute(client, commands, connected)
    try:
        async with asyncio.timeout(timeout):
            return await _execute(client, commands, connected)
    except TimeoutError:  # the cancellation closed the connection mid-way (redis-py does)
        raise RedisTimeoutError(f"Redis did not answer within {timeout} s") from None


async def _execute(
    client: Any, commands: Sequence[Sequence[Any]], connected: Callable[[], None] | None
) -> list[Any]:
    pool = client.connection_pool
    connection = await pool.get_connection()
    try:
        if connected is not None:
            connected()
        replies = await _round_trip(connection, commands)
        for index, reply in enumerate(replies):
            if isinstance(reply, NoScriptError):
                loaded = await _round_trip(
                    connection, [("SCRIPT", "LOAD", script) for script in SCRIPTS.values()]
                )
                _raise_first(loaded)
                replies[index:] = await _round_trip(connection, commands[index:])
                break
        _raise_first(replies)
        return replies
    finally:
        await pool.release(connection)


async def _round_trip(connection: Any, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """Write `commands` at once and read a reply to each; an error reply is returned, not
    raised. A failure of the connection (or a cancellation) mid-way closes it (redis-py
    does), so that a later user never reads the replies meant for these."""
    await connection.send_packed_command(connection.pack_commands(commands))
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(await connection.read_response())
        except ResponseError as error:
            replies.append(error)
    return replies


def _raise_first(replies: list[Any]) -> None:
    for reply in replies:
        if isinstance(reply, ResponseError):
            raise reply


async def trim(client: Any, key: str, max_len: int) -> None:
    """Trim `key` to about `max_len` entries with `XTRIM MINID`, never past the oldest
    entry a group has pending or has not read (Redis 7.0 cannot trim around them)."""
    newest = await client.xrevrange(key, "+", "-", count=max_len)
    if len(newest) < max_len:
        return
    floor = newest[-1][0]
    for group in await client.xinfo_groups(key):
        floor = min(floor, group["last-delivered-id"], key=entry_order)
        if group["pending"]:
            summary = await client.xpending(key, group["name"])
            floor = min(floor, summary["min"], key=entry_order)
    await client.xtrim(key, minid=floor, approximate=False)


async def durability_warnings(client: Any) -> list[str]:
    """What in the server's configuration can lose acknowledged entries."""
    warnings = []
    config = await client.config_get("appendonly")
    if config.get(b"appendonly", config.get("appendonly")) in (b"no", "no"):
        warnings.append(
            "Redis runs with appendonly no: entries written since the last snapshot are lost "
            "if redis-server dies; set appendonly yes (appendfsync everysec) for durable delivery"
        )
    policy = await client.config_get("maxmemory-policy")
    value = policy.get(b"maxmemory-policy", policy.get("maxmemory-policy"))
    if value not in (b"noeviction", "noeviction", None):
        warnings.append(
            f"Redis evicts keys under memory pressure (maxmemory-policy {value!r}): a whole stream "
            "can disappear; use noeviction for streams"
        )
    return warnings


def entry_fields(envelope: Envelope) -> dict[str, str | bytes]:
    """An entry's fields: `i`, the message id (first, for the de-duplication check),
    `h`, the header as a JSON array (kind, name, message id, correlation id, causation
    id, and the envelope's headers as an object when it has any), and `b`, the body."""
    header: tuple[object, ...] = (
        envelope.kind,
        envelope.name,
        envelope.message_id,
        envelope.correlation_id,
        envelope.causation_id,
    )
    if envelope.headers:
        header = (*header, dict(envelope.headers))
    return {"i": envelope.message_id, "h": _header.encode(header), "b": envelope.body}


def entry_envelope(
    key: str, prefix: str, entry_id: bytes, fields: dict[bytes, bytes], attempt: int
) -> Envelope:
    """The envelope of an entry of stream `key`, delivered `attempt` times."""
    header = fields.get(b"h")
    body = fields.get(b"b", b"")
    if header is not None:
        try:
            return _envelope(read_header(header), body, attempt, (key, entry_id))
        except msgspec.DecodeError:
            pass
    # Not written by pybus: handed on as it is, the codec dead-letters it.
    fallback = entry_id.decode()
    name = key.removeprefix(prefix)
    return Envelope("event", name, body, fallback, fallback, None, attempt, (key, entry_id))


#: The kinds an entry's header can give; any other is an event.
_KINDS: dict[str, Kind] = {"command": "command", "query": "query"}


def _envelope(header: Header, body: bytes, attempt: int, handle: Receipt) -> Envelope:
    headers = header.headers
    return Envelope(
        _KINDS.get(header.kind, "event"), header.name, body,
        header.message_id, header.correlation_id, header.causation_id,
        attempt, handle, MappingProxyType(headers) if headers else NO_HEADERS,
    )  # fmt: skip


def new_envelopes(
    key: str, prefix: str, items: list[Any], attempt: int
) -> list[tuple[Receipt, Envelope, bytes | None]]:
    """The raw entries `items` of stream `key` ([entry id, [field, value, ...]], as
    XREADGROUP sends them), each as (its receipt, its envelope, the group it is for: field
    `g`, set when a dead letter was requeued for one group, else None).

    An entry laid out as pybus writes it (`i`, `h`, `b`, in that order) is read by
    position; any other (another writer's, a requeued one) by name, as `entry_envelope`
    reads it. Both give the same envelope.
    """
    found: list[tuple[Receipt, Envelope, bytes | None]] = []
    append = found.append
    for entry_id, fields in items:
        handle = (key, entry_id)
        if (
            fields is not None
            and len(fields) == 6
            and fields[0] == b"i"
            and fields[2] == b"h"
            and fields[4] == b"b"
        ):
            try:
                append((handle, _envelope(read_header(fields[3]), fields[5], attempt, handle), None))
                continue
            except msgspec.DecodeError:
                pass
        named = pairs(fields)
        append((handle, entry_envelope(key, prefix, entry_id, named, attempt), named.get(b"g")))
    return found


def receipt(envelope: Envelope) -> Receipt:
    """The envelope's (stream key, entry id)."""
    handle = envelope.receipt
    assert isinstance(handle, tuple)  # set by entry_envelope
    key, entry_id = handle
    return key, entry_id


def pairs(fields: Any) -> dict[bytes, bytes]:
    """Fields as a dict: redis-py gives a dict, a script a flat list; a deleted entry none."""
    if isinstance(fields, list):
        return dict(zip(fields[::2], fields[1::2], strict=True))
    return fields or {}


def entries(reply: list[Any], *, with_deleted: bool = False) -> list[Entry]:
    """XREADGROUP's reply as entries (stream key, entry id, fields). An entry deleted
    while pending (no fields) is left out unless `with_deleted`."""
    found: list[Entry] = []
    for stream, items in reply:
        key = stream.decode() if isinstance(stream, bytes) else stream
        for entry_id, raw in items:
            fields = pairs(raw)
            if fields or with_deleted:
                found.append((key, entry_id, fields))
    return found


def entry_order(entry_id: bytes | str) -> tuple[int, int]:
    """An entry id as a sortable (milliseconds, sequence)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    milliseconds, _, sequence = text.partition("-")
    return int(milliseconds), int(sequence or 0)
