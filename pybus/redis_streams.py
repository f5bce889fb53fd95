"""A transport over Redis Streams with consumer groups (Redis 7.0+), at least once.

One stream per message name (`{prefix}{name}`); one consumer group per service.
How each rule of `pybus.transport` is kept on Redis (see docs/transports.md):

- receive: at start, this consumer's own pending entries first (`XREADGROUP ... 0`),
  so a restarted consumer never strands its work; then entries idle longer than
  `claim_idle` in other consumers (`XAUTOCLAIM`, every `claim_interval`, no lock:
  the idle check is atomic); then new entries (`XREADGROUP ... >`, blocking).
- ack: `XACK` after the handling succeeded, batched: one script call per stream
  records the message ids as done (a sorted set per group, scored by time) and
  acks the entries; a received message whose id is recorded is acked without
  being handled again, so a message published twice takes effect once within
  `dedupe_window`.
- entries hold three fields: `i`, the message id, `h`, the header (kind, name,
  message id, correlation and causation ids) as a JSON array, and `b`, the body;
  an entry of another shape is handed on as undecodable and dead-lettered.
- retry: the entry is claimed again at once (`XCLAIM`), which raises its delivery count.
- dead_letter: `XADD` to `{prefix}dead` and `XACK`, in one `MULTI/EXEC`.
- send: `XADD`, the sends of one turn of the event loop in one script call; the
  client's own retries are off (a retried XADD can write an entry twice), so a
  send either returns the entry id or raises `TransportError` within `timeout`.
- retention: with `max_len`, streams are trimmed with `XTRIM MINID` below the
  oldest entry any group still has pending or has not read, never above it.

redis-py is imported here only; install `pybus[redis]`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, overload

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from pybus.errors import TransportError
from pybus.transport import DeadLetter, Envelope, Transport

logger = logging.getLogger("pybus")


# Marks the ids (ARGV[3], one per line) done at time ARGV[2], acks the entries
# (ARGV[4], one per line) of stream KEYS[2] in group ARGV[1], and forgets marks
# older than ARGV[5] when given. The marks come first: a crash in between leaves a
# message that is recognised as done when it comes again, never the reverse.
# Commands take up to 1,000 arguments each (Lua's unpack has a limit).
_ACK = """
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
_ADD = """
local ids = {}
for n = 1, #KEYS do
    ids[n] = redis.call("XADD", KEYS[n], "*", "i", ARGV[3 * n - 2], "h", ARGV[3 * n - 1], "b", ARGV[3 * n])
end
return ids
"""

# Reads up to ARGV[3] new entries of the streams KEYS[2], KEYS[3]... for consumer
# ARGV[2] of group ARGV[1] (XREADGROUP without blocking), and tells for each entry
# whether its message id (field i, written first) is marked done in KEYS[1]: the read
# and the de-duplication check in one round trip, one ZMSCORE per 1,000 entries.
# Returns {XREADGROUP's reply or {}, {a score or false per entry, in order}}.
_TAKE = """
local args = {"GROUP", ARGV[1], ARGV[2], "COUNT", ARGV[3], "STREAMS"}
for n = 2, #KEYS do args[#args + 1] = KEYS[n] end
for n = 2, #KEYS do args[#args + 1] = ">" end
local reply = redis.call("XREADGROUP", unpack(args))
if not reply then return {{}, {}} end
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
return {reply, done}
"""


_SCRIPTS = {"add": _ADD, "ack": _ACK, "take": _TAKE}
_SHA = {
    name: hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()
    for name, script in _SCRIPTS.items()
}

#: Entries per script call when many sends share a turn of the event loop.
_WRITE_BATCH = 500


def _default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class RedisTransport(Transport):
    """Redis Streams transport. `group` is the service; `consumer` names this process.

    A consumer restarted under the same name handles its own pending entries
    first. Acks are sent in batches of `ack_batch` (and before every read), so a
    consumer killed between a handling and its ack leaves at most about that many
    plus its concurrency to be handled again.
    """

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        group: str = "default",
        consumer: str | None = None,
        prefix: str = "pybus:",
        claim_idle: float = 30.0,
        claim_interval: float = 1.0,
        max_len: int | None = None,
        dedupe_window: float = 3600.0,
        timeout: float = 5.0,
        ack_batch: int = 16,
    ) -> None:
        self.group = group
        self.ack_batch = ack_batch
        self.consumer = consumer or _default_consumer()
        self.prefix = prefix
        self.claim_idle = claim_idle
        self.claim_interval = claim_interval
        self.max_len = max_len
        self.dedupe_window = dedupe_window
        self.timeout = timeout
        self.dead_key = f"{prefix}dead"
        # Typed loosely: redis-py's reply types depend on decode_responses (off here:
        # replies are bytes, parsed below).
        self.client: Any = aioredis.Redis.from_url(
            url,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            socket_timeout=timeout + 30.0,  # above any block time, so an idle read is no error
            socket_connect_timeout=timeout,
        )
        self._groups_ready: set[str] = set()
        self._own_pending_read: set[str] = set()
        self._again: deque[Envelope] = deque()
        self._acks: list[Envelope] = []
        self._last_claim = 0.0
        self._sends = 0
        self._checked = False
        self._header = msgspec.json.Encoder()
        self._outbox: list[tuple[str, dict[str, Any], asyncio.Future[str]]] = []
        self._writing: set[asyncio.Task[None]] = set()
        self._in_hand: set[str] = set()  # message ids taken and not yet acked or dead-lettered
        self._done_key = f"{prefix}done:{group}"
        self._flushes = 0

    def _key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    async def _execute(self, queue: Callable[[Any], object]) -> list[Any]:
        """Send what `queue` puts in a pipeline, in one round trip, and return the replies.

        Scripts go by their hash (EVALSHA): redis-py's Script objects would ask
        SCRIPT EXISTS before every pipeline. When the server does not know them
        (first use, a restart, SCRIPT FLUSH) it ran none of them: they are loaded
        and the pipeline is sent once more.
        """
        for attempt in (1, 2):
            async with self.client.pipeline(transaction=False) as pipe:
                queue(pipe)
                try:
                    return list(await pipe.execute())
                except NoScriptError:
                    if attempt == 2:
                        raise
            async with self.client.pipeline(transaction=False) as pipe:
                for script in _SCRIPTS.values():
                    pipe.script_load(script)
                await pipe.execute()
        raise AssertionError("unreachable")  # pragma: no cover

    # -- producing ---------------------------------------------------------------------

    async def send(self, envelope: Envelope) -> str:
        """XADD the envelope; sends made in the same turn of the event loop share one script call."""
        key = self._key(envelope.name)
        fields = self._fields(envelope)
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._start_flush)
        self._outbox.append((key, fields, waiter))
        try:
            entry = await waiter
        except (RedisError, TimeoutError) as exc:
            raise TransportError(
                f"Could not write {envelope.name} (message id {envelope.message_id}) to Redis within "
                f"{self.timeout} s: {type(exc).__name__}: {exc}; it may or may not have been written, "
                "and consumers de-duplicate by message id if you send it again"
            ) from exc
        self._sends += 1
        if self.max_len is not None and self._sends % 100 == 0:
            await self.trim(key)
        return entry

    def _start_flush(self) -> None:
        batch, self._outbox = self._outbox, []
        task = asyncio.get_running_loop().create_task(self._write(batch))
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)

    async def _write(self, batch: list[tuple[str, dict[str, Any], asyncio.Future[str]]]) -> None:
        entries: list[Any] = []
        try:
            async with asyncio.timeout(self.timeout):
                for start in range(0, len(batch), _WRITE_BATCH):
                    chunk = batch[start : start + _WRITE_BATCH]
                    keys = [key for key, _, _ in chunk]
                    args = [
                        value for _, fields, _ in chunk for value in (fields["i"], fields["h"], fields["b"])
                    ]
                    (added,) = await self._execute(functools.partial(_queue_add, keys, args))
                    entries.extend(added)
        except Exception as exc:  # each unwritten send raises it (send() wraps Redis's own errors)
            for _, _, waiter in batch[len(entries) :]:
                if not waiter.done():
                    waiter.set_exception(exc)
            batch = batch[: len(entries)]
        for (_, _, waiter), entry in zip(batch, entries, strict=True):
            if not waiter.done():
                waiter.set_result(entry.decode() if isinstance(entry, bytes) else str(entry))

    async def trim(self, key: str) -> None:
        """Trim `key` to about `max_len` entries, never past what a group still needs."""
        if self.max_len is None:
            return
        try:
            newest = await self.client.xrevrange(key, "+", "-", count=self.max_len)
            if len(newest) < self.max_len:
                return
            floor = newest[-1][0]
            for group in await self.client.xinfo_groups(key):
                floor = min(floor, group["last-delivered-id"], key=_entry_order)
                if group["pending"]:
                    summary = await self.client.xpending(key, group["name"])
                    floor = min(floor, summary["min"], key=_entry_order)
            await self.client.xtrim(key, minid=floor, approximate=False)
        except RedisError as exc:
            raise TransportError(f"Could not trim {key}: {exc}") from exc

    # -- consuming ---------------------------------------------------------------------

    async def check_durability(self) -> list[str]:
        """Warn (on the `pybus` logger) when the server is configured to lose acknowledged
        entries; return the warnings. Run once, at the first read."""
        warnings = []
        config = await self.client.config_get("appendonly")
        if config.get(b"appendonly", config.get("appendonly")) in (b"no", "no"):
            warnings.append(
                "Redis runs with appendonly no: entries written since the last snapshot are lost "
                "if redis-server dies; set appendonly yes (appendfsync everysec) for durable delivery"
            )
        policy = await self.client.config_get("maxmemory-policy")
        value = policy.get(b"maxmemory-policy", policy.get("maxmemory-policy"))
        if value not in (b"noeviction", "noeviction", None):
            warnings.append(
                f"Redis evicts keys under memory pressure (maxmemory-policy {value!r}): a whole stream "
                "can disappear; use noeviction for streams"
            )
        for text in warnings:
            logger.warning("pybus: %s", text)
        return warnings

    async def _ensure_group(self, key: str) -> None:
        if key in self._groups_ready:
            return
        try:
            await self.client.xgroup_create(key, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups_ready.add(key)

    async def receive(self, names: Sequence[str], *, max_count: int, wait: float) -> list[Envelope]:
        try:
            return await self._receive([self._key(name) for name in names], max_count, wait)
        except RedisError as exc:
            raise TransportError(f"Could not read from Redis: {type(exc).__name__}: {exc}") from exc

    async def _receive(self, keys: list[str], max_count: int, wait: float) -> list[Envelope]:
        if not self._checked:
            self._checked = True
            try:
                await self.check_durability()
            except ResponseError:  # CONFIG may be disabled (managed Redis): nothing to tell
                pass
        for key in keys:
            await self._ensure_group(key)
        taken: list[Envelope] = []
        while self._again and len(taken) < max_count:
            taken.append(self._again.popleft())
        for key in keys:  # own pending entries first, once per start
            if key not in self._own_pending_read and len(taken) < max_count:
                entries = await self._read({key: "0"}, max_count - len(taken), None)
                if len(entries) < max_count - len(taken):
                    self._own_pending_read.add(key)
                taken.extend(await self._with_counts(key, entries))
        if time.monotonic() - self._last_claim >= self.claim_interval and len(taken) < max_count:
            self._last_claim = time.monotonic()
            for key in keys:
                taken.extend(await self._claim(key, max_count - len(taken)))
        if taken:
            await self._flush_acks()
            return await self._skip_done(taken)
        # The acks, a first non-blocking read and its de-duplication check share a
        # round trip; block only if that read was empty.
        reply, done = await self._flush_acks(read=(keys, max_count))
        fresh = [self._envelope(key, entry_id, fields, 1) for key, entry_id, fields in _entries(reply)]
        if fresh:
            return self._skip_done_known(fresh, done)
        if wait > 0:
            entries = await self._read(dict.fromkeys(keys, ">"), max_count, max(1, int(wait * 1000)))
            taken = [self._envelope(key, entry_id, fields, 1) for key, entry_id, fields in entries]
        return await self._skip_done(taken)

    async def _read(
        self, streams: dict[str, str], count: int, block: int | None
    ) -> list[tuple[str, bytes, dict[bytes, bytes]]]:
        reply = await self.client.xreadgroup(self.group, self.consumer, streams, count=count, block=block)
        return _entries(reply or [])

    async def _with_counts(
        self, key: str, entries: list[tuple[str, bytes, dict[bytes, bytes]]]
    ) -> list[Envelope]:
        if not entries:
            return []
        pending = await self.client.xpending_range(
            key,
            self.group,
            min=entries[0][1],
            max=entries[-1][1],
            count=len(entries),
            consumername=self.consumer,
        )
        counts = {item["message_id"]: item["times_delivered"] for item in pending}
        return [
            self._envelope(key, entry_id, fields, counts.get(entry_id, 1)) for _, entry_id, fields in entries
        ]

    async def _claim(self, key: str, count: int) -> list[Envelope]:
        if count <= 0:
            return []
        reply = await self.client.xautoclaim(
            key,
            self.group,
            self.consumer,
            min_idle_time=int(self.claim_idle * 1000),
            start_id="0-0",
            count=count,
        )
        entries = [(key, entry_id, fields) for entry_id, fields in reply[1] if fields]
        return await self._with_counts(key, entries)

    def _fields(self, envelope: Envelope) -> dict[str, str | bytes]:
        """An entry's fields: `i`, the message id (first, for the de-duplication check),
        `h`, the header as a JSON array, and `b`, the body."""
        header = (
            envelope.kind,
            envelope.name,
            envelope.message_id,
            envelope.correlation_id,
            envelope.causation_id,
        )
        return {"i": envelope.message_id, "h": self._header.encode(header), "b": envelope.body}

    def _envelope(self, key: str, entry_id: bytes, fields: dict[bytes, bytes], attempt: int) -> Envelope:
        receipt = (key, entry_id)
        try:
            kind, name, message_id, correlation_id, causation_id = msgspec.json.decode(fields[b"h"])
        except (KeyError, ValueError, msgspec.DecodeError):
            # Not written by pybus: handed on as it is, the codec dead-letters it.
            name = key.removeprefix(self.prefix)
            fallback = entry_id.decode()
            return Envelope("event", name, fields.get(b"b", b""), fallback, fallback, None, attempt, receipt)
        if kind not in ("command", "query"):
            kind = "event"
        return Envelope(
            kind, name, fields.get(b"b", b""), message_id, correlation_id, causation_id, attempt, receipt
        )

    async def _skip_done(self, envelopes: list[Envelope]) -> list[Envelope]:
        """Ack, without handling, what was already handled or is in hand (a message sent twice).

        Redis remembers the ids handled in the last `dedupe_window` seconds in one
        sorted set per group (scored by time), across processes; this process
        also knows the ids it holds, for a copy that arrives while the first is
        still being handled.
        """
        if not envelopes:
            return envelopes
        ids = [envelope.message_id for envelope in envelopes]
        (scores,) = await self._execute(lambda pipe: pipe.zmscore(self._done_key, ids))
        return self._skip_done_known(envelopes, [score is not None for score in scores])

    def _skip_done_known(self, envelopes: list[Envelope], done: Sequence[object]) -> list[Envelope]:
        fresh = []
        for envelope, seen in zip(envelopes, done, strict=True):
            retried = envelope.attempt > 1 and envelope.message_id in self._in_hand
            if not seen and (retried or envelope.message_id not in self._in_hand):
                fresh.append(envelope)
                self._in_hand.add(envelope.message_id)
            else:
                self._acks.append(envelope)
        return fresh

    # -- outcomes ----------------------------------------------------------------------

    async def ack(self, envelope: Envelope) -> None:
        self._acks.append(envelope)
        if len(self._acks) >= self.ack_batch:
            await self._flush_acks()

    async def flush(self) -> None:
        """Send the acks buffered so far."""
        await self._flush_acks()

    @overload
    async def _flush_acks(self, read: None = None) -> None: ...
    @overload
    async def _flush_acks(self, read: tuple[list[str], int]) -> tuple[list[Any], list[int]]: ...
    async def _flush_acks(
        self, read: tuple[list[str], int] | None = None
    ) -> tuple[list[Any], list[int]] | None:
        """Send the buffered acks; with `read` (keys, count), also read new entries
        without blocking and check them for duplicates in the same round trip, and
        return the reply and the done flags (see `_TAKE`)."""
        acks, self._acks = self._acks, []
        if not acks and read is None:
            return None

        def queue(pipe: Any) -> None:
            self._queue_acks(pipe, acks)
            if read is not None:
                keys, count = read
                pipe.evalsha(
                    _SHA["take"], 1 + len(keys), self._done_key, *keys, self.group, self.consumer, count
                )

        try:
            replies = await self._execute(queue)
        except RedisError as exc:
            self._acks[:0] = acks  # keep them: acked on the next flush
            raise TransportError(f"Could not ack {len(acks)} message(s): {exc}") from exc
        self._in_hand.difference_update(envelope.message_id for envelope in acks)
        if read is None:
            return None
        reply, done = replies[-1]
        return reply, done

    def _queue_acks(self, pipe: Any, acks: list[Envelope]) -> None:
        by_stream: dict[str, tuple[list[str], list[bytes]]] = {}
        for envelope in acks:
            key, entry_id = _receipt(envelope)
            ids = by_stream.get(key)
            if ids is None:
                ids = by_stream[key] = ([], [])
            ids[0].append(envelope.message_id)
            ids[1].append(entry_id)
        now = int(time.time())
        self._flushes += 1
        expire = str(now - int(self.dedupe_window)) if self._flushes % 100 == 1 else ""
        for key, (message_ids, entry_ids) in by_stream.items():
            # One script per stream: the ids travel as two arguments, not one each.
            pipe.evalsha(
                _SHA["ack"], 2, self._done_key, key,
                self.group, now, "\n".join(message_ids), b"\n".join(entry_ids), expire,
            )  # fmt: skip

    async def retry(self, envelope: Envelope, error: BaseException) -> None:
        key, entry_id = _receipt(envelope)
        try:
            claimed = await self.client.xclaim(
                key, self.group, self.consumer, min_idle_time=0, message_ids=[entry_id]
            )
        except RedisError as exc:
            raise TransportError(f"Could not hand back {envelope.name}: {exc}") from exc
        for claimed_id, fields in claimed:
            if fields:
                self._again.append(self._envelope(key, claimed_id, fields, envelope.attempt + 1))

    async def dead_letter(self, envelope: Envelope, reason: str) -> None:
        key, entry_id = _receipt(envelope)
        fields: dict[str, Any] = dict(self._fields(envelope))
        fields.update(
            reason=reason, attempt=str(envelope.attempt), stream=key, entry_id=entry_id, group=self.group
        )
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.xadd(self.dead_key, fields)
                pipe.xack(key, self.group, entry_id)
                await pipe.execute()
        except RedisError as exc:
            raise TransportError(f"Could not dead-letter {envelope.name}: {exc}") from exc
        self._in_hand.discard(envelope.message_id)

    # -- dead letters --------------------------------------------------------------------

    async def dead_letters(self, count: int = 100) -> list[tuple[str, DeadLetter]]:
        """The oldest `count` dead letters, with their ids in the dead-letter stream."""
        try:
            entries = await self.client.xrange(self.dead_key, "-", "+", count=count)
        except RedisError as exc:
            raise TransportError(f"Could not read the dead letters in {self.dead_key}: {exc}") from exc
        found = []
        for entry_id, fields in entries:
            envelope = self._envelope(
                fields[b"stream"].decode(), fields[b"entry_id"], fields, int(fields[b"attempt"])
            )
            found.append((entry_id.decode(), DeadLetter(envelope, fields[b"reason"].decode())))
        return found

    async def requeue(self, dead_id: str) -> str:
        """Send a dead letter again as a new entry (attempts start over); remove it from the dead letters."""
        for entry_id, letter in await self.dead_letters(count=10_000):
            if entry_id == dead_id:
                new_id = await self.send(letter.envelope)
                try:
                    await self.client.xdel(self.dead_key, dead_id)
                except RedisError as exc:
                    raise TransportError(
                        f"Sent dead letter {dead_id} again as {new_id} but could not remove it from "
                        f"{self.dead_key}: {exc}; consumers de-duplicate it by message id if requeued again"
                    ) from exc
                return new_id
        raise TransportError(f"No dead letter {dead_id!r} in {self.dead_key}")

    async def purge(self) -> int:
        """Delete every dead letter; return how many there were."""
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.xlen(self.dead_key)
                pipe.delete(self.dead_key)
                count, _ = await pipe.execute()
        except RedisError as exc:
            raise TransportError(f"Could not purge the dead letters in {self.dead_key}: {exc}") from exc
        return int(count)

    async def aclose(self) -> None:
        """Let the writes in flight finish, send the buffered acks, close the connections."""
        try:
            if self._writing:
                await asyncio.wait(self._writing)
            await self._flush_acks()
        finally:
            await self.client.aclose()


def _receipt(envelope: Envelope) -> tuple[str, bytes]:
    receipt = envelope.receipt
    assert isinstance(receipt, tuple)  # (stream key, entry id), set by RedisTransport
    key, entry_id = receipt
    return key, entry_id


def _queue_add(keys: list[str], args: list[str | bytes], pipe: Any) -> None:
    pipe.evalsha(_SHA["add"], len(keys), *keys, *args)


def _entries(reply: list[Any]) -> list[tuple[str, bytes, dict[bytes, bytes]]]:
    """XREADGROUP's reply as entries (stream key, entry id, fields).

    redis-py gives the fields as a dict; a script returns them as a flat list.
    An entry without fields (deleted while pending) is left out.
    """
    found: list[tuple[str, bytes, dict[bytes, bytes]]] = []
    for stream, entries in reply:
        key = stream.decode() if isinstance(stream, bytes) else stream
        for entry_id, fields in entries:
            if isinstance(fields, list):
                fields = dict(zip(fields[::2], fields[1::2], strict=True))
            if fields:
                found.append((key, entry_id, fields))
    return found


def _entry_order(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    milliseconds, _, sequence = text.partition("-")
    return int(milliseconds), int(sequence or 0)
