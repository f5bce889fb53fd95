"""A transport over Redis Streams with consumer groups (Redis 7.0+), at least once.

One stream per message name (`{prefix}{name}`), one consumer group per service; the
entry format and the scripts are in `pybus.redis_wire`. How each rule of
`pybus.transport` is kept on Redis (see docs/transports.md):

- receive: this consumer's own pending entries first, after a start, so a restarted
  consumer never strands its work; then entries idle longer than `claim_idle`
  (`XPENDING ... IDLE` and `XCLAIM` in one atomic script, every `claim_interval`, no
  lock); then new entries, never blocking: from one stream `XREADGROUP ... >`, then
  the check of their message ids against those handled in a second round trip (a
  script reading them would make Redis copy every entry into Lua and back); from
  several, one script reads and checks. When there are none, `XREAD BLOCK`, outside
  the group, waits for one, no later than the next claim.
- cancellation: every round trip that takes entries (delivery counted) or records an
  outcome runs in a task of its own and to its end, whatever happens to its caller,
  and what it brings is recorded here; only the `XREAD` wait, which takes nothing, is
  cut short. So nothing this consumer received or claimed is left pending untracked.
- a stream or group gone (Redis restarted without its data): the read that meets
  `NOGROUP` raises once, and the next one creates them again.
- holding: this process knows each entry it holds by entry id and never hands one out
  twice; a background task resets their idle time (`XCLAIM ... JUSTID`, which counts
  no delivery) every `claim_idle / 4`, so no live consumer's work is claimed.
- ack: `XACK` after the handling succeeded, with the message ids of successful
  handlings recorded as done (a sorted set per group). Acks are buffered and go with
  the check of the next read or in a round trip of their own (one at a time): at once
  when nothing else is in hand, else once `_ACK_BATCH` are waiting or the oldest has
  waited `_ACK_DELAY` (5 ms); `flush()` and `aclose()` send them at once. A copy of a
  message done, or in hand here under another entry, is acked unhandled and
  unrecorded: a message sent twice takes effect once within `dedupe_window`, and no
  copy hides another's failure.
- retry: the entry stays here and comes again at once, its delivery count one higher.
- release: `XCLAIM ... RETRYCOUNT <attempt - 1> IDLE <a day> JUSTID`: the next delivery,
  here or by any consumer's next claim, has the same attempt.
- dead_letter: `XADD` to `{prefix}dead` (with the error on one line, read from the
  reason once) and `XACK`, in one `MULTI/EXEC` (`pybus.redis_dead_letters` lists,
  requeues and purges them).
- send: `XADD`, the sends of one turn of the event loop in one script call, without the
  client's own retries (a retried XADD can write an entry twice): it returns the entry
  id or raises `TransportError` within `timeout`, whose `maybe_written` says whether
  the entry may exist.
- retention: with `max_len`, `XTRIM MINID` below the oldest entry any group still has
  pending or has not read, in the background every 100 sends (a failure is logged).

redis-py is imported by the `pybus.redis_*` modules only; install `pybus-cqrs[redis]`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, cast

try:
    from redis.exceptions import RedisError, ResponseError
except ModuleNotFoundError as missing:
    raise ModuleNotFoundError(
        f"The Redis transport needs redis-py, which is not installed ({missing}): "
        "pip install 'pybus-cqrs[redis]'",
        name=missing.name,
    ) from missing

from pybus import redis_wire as wire
from pybus.errors import ImproperlyConfigured, TransportError
from pybus.redis_dead_letters import error_line
from pybus.redis_wire import SHA, Entry, Receipt
from pybus.transport import Envelope, Transport

__all__ = ["RedisTransport", "TransportError"]

logger = logging.getLogger("pybus")


#: Seconds between tries of acks whose round trip failed.
_ACK_PAUSE = 0.5
#: The longest an ack waits (seconds) for a round trip to share while this consumer has
#: other entries in hand: the check of the next read, or more acks. With nothing else in
#: hand, acks go at once.
_ACK_DELAY = 0.005
#: Acks that go at once, whatever is in hand.
_ACK_BATCH = 200
#: Entries per script call when many sends share a turn of the event loop.
_WRITE_BATCH = 500
#: Entries per claim; while a claim comes back full, the next one is made at once.
_CLAIM_BATCH = 500
#: Claimed entries held and not yet handed out, at most (about): no claim past it.
_BACKLOG = 1_000
#: The idle time a released entry gets: past any consumer's `claim_idle`, so the next
#: claim anywhere takes it at once.
_RELEASED_IDLE_MS = 24 * 3600 * 1000


def _default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class _Read:
    """A read in progress: its answer to the caller, whether the caller is gone, whether it
    waits for new entries."""

    __slots__ = ("abandoned", "reply", "waiting")

    def __init__(self, reply: asyncio.Future[list[Envelope]]) -> None:
        self.reply = reply
        self.abandoned = False
        self.waiting = False


class _Unsent(Exception):
    """A write failed before anything was sent (no connection): nothing was written."""


class RedisTransport(Transport):
    """Redis Streams transport. `group` is the service; `consumer` names this process.

    A consumer restarted under the same name handles its own pending entries
    first. Acks are buffered: they go with the check of the next read, or on their
    own, one round trip at a time, at once when nothing else is in hand and else
    within 5 ms (`_ACK_DELAY`) or as 200 (`_ACK_BATCH`) are waiting; so a consumer
    killed between a handling and its ack leaves few to be handled again. Call `aclose()`
    when done: it sends the acks and gives back, without counting a delivery, what
    was received and not handed out (also what a cancelled read took). Raises
    `ImproperlyConfigured` for a `max_len` below 1. Making one connects to nothing:
    the first send or read does.

    Args:
        url: The Redis server (`redis://host:port/db`, `rediss://` for TLS).
        group: The consumer group, i.e. the service: every group gets every message, one consumer
            of the group handles it.
        consumer: This process's name in the group; `None`: `host-pid`. A consumer restarted under
            the same name handles its own pending entries first.
        prefix: Starts every key the transport writes: streams `<prefix><name>`, dead letters
            `<prefix>dead`.
        claim_idle: Seconds a consumer must be silent (killed, or its loop stalled) before another
            claims its entries.
        claim_interval: Seconds between looks for entries to claim.
        max_len: Retention: each stream is trimmed to about this many entries (>= 1), never past what
            a group still needs; `None`: nothing is trimmed.
        dedupe_window: Seconds a handled message id is remembered: a copy sent within it is acked
            without being handled again.
        timeout: Seconds within which a send, a give-back, a retry, a dead letter, the last acks and
            `aclose()` return or raise `TransportError`.
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
    ) -> None:
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
            raise ImproperlyConfigured(
                f"max_len must be None (no trimming) or a whole number of entries >= 1, not {max_len!r}"
            )
        self.url = url
        self.group = group
        self.consumer = consumer or _default_consumer()
        self.prefix = prefix
        self.claim_idle = claim_idle
        self.claim_interval = claim_interval
        self.max_len = max_len
        self.dedupe_window = dedupe_window
        self.timeout = timeout
        self.dead_key = f"{prefix}dead"
        # The socket timeout is above any block time, so an idle read is no error.
        self.client = wire.connect(url, timeout=timeout + 30.0, connect_timeout=timeout)
        # The scripts and reads of `_execute` go through a client of their own, without a
        # socket timeout (redis-py would make a task per write): each round trip is bounded
        # as a whole, by the same time. aclose() closes both.
        self._rounds = wire.connect(url, timeout=None, connect_timeout=timeout)
        self._groups_ready: set[str] = set()
        self._own_from: dict[str, bytes] = {}  # stream key -> own pending entries are read after this id
        self._held: set[Receipt] = set()  # entries pending here that this process has not finished
        self._handling: dict[str, object] = {}  # message id -> the receipt of the entry handed out for it
        self._again: deque[Envelope] = deque()  # failed, to be handed out again (held)
        self._claimed: deque[Envelope] = deque()  # claimed, not handed out yet (held)
        self._acks: list[tuple[Envelope, bool]] = []  # (envelope, whether it was handled)
        self._acks_due = 0.0  # loop time by which the oldest buffered ack goes out
        self._acks_sent = 0  # acks in a round trip in flight
        # Done when the acks a read's round trip carries (with its check) have landed or failed.
        self._carried: asyncio.Future[None] | None = None
        self._acks_now = False  # flush() or aclose(): the buffered acks go without waiting
        self._ack_wakeup: asyncio.Future[None] | None = None  # the ack task waits for the acks to be due
        self._acking: asyncio.Task[None] | None = None  # sends the acks in the background
        self._ack_failure: TransportError | None = None  # raised by the next ack() or flush()
        self._ack_pausing = False  # the ack task waits to try again after a failure
        self._closed = False  # aclose() closed the connections
        self._next_claim = 0.0
        self._keeper: asyncio.Task[None] | None = None
        self._reading: asyncio.Task[None] | None = None  # the last receive's own task
        self._read_state: _Read | None = None  # and its state
        self._steps: set[asyncio.Task[None]] = set()  # outcomes (retry, release, dead letter) in flight
        self._releasing: tuple[list[Envelope], asyncio.Task[None]] | None = None  # this turn's give-backs
        self._unheard: set[asyncio.Future[None]] = set()  # tasks whose failure is logged, nobody waiting
        self._sends = 0
        self._checked = False
        self._outbox: list[tuple[str, dict[str, Any], asyncio.Future[str]]] = []
        self._writing: set[asyncio.Task[None]] = set()
        self._trims: dict[str, asyncio.Task[None]] = {}
        self._done_key = f"{prefix}done:{group}"
        self._flushes = 0
        self._takes = 0

    def _key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    async def _execute(
        self, commands: Sequence[Sequence[Any]], connected: Callable[[], None] | None = None
    ) -> list[Any]:
        return await wire.execute(self._rounds, commands, connected, timeout=self.timeout + 30.0)

    # -- producing ---------------------------------------------------------------------

    async def send(self, envelope: Envelope) -> str:
        """XADD the envelope and return its entry id; sends made in the same turn of the
        event loop share one script call.

        Raises `TransportError` within `timeout` when Redis cannot be reached or
        refuses: its `maybe_written` is False when nothing reached Redis (the entry
        does not exist), True when the command may have reached it (the entry may
        exist and be delivered). A send that returned wrote its entry, whatever
        happens after (a failed trim is logged, never raised here).
        """
        key = self._key(envelope.name)
        fields = wire.entry_fields(envelope)
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._start_flush)
        self._outbox.append((key, fields, waiter))
        what = f"{envelope.name} (message id {envelope.message_id})"
        try:
            entry = await waiter
        except _Unsent as unsent:
            cause = unsent.__cause__
            raise TransportError(
                f"Could not write {what} to Redis: {_describe(cause)}; "
                "no connection was made, so nothing was sent and it was not written",
                maybe_written=False,
            ) from cause
        except (RedisError, TimeoutError) as exc:
            raise TransportError(
                f"Could not write {what} to Redis within {self.timeout} s: {_describe(exc)}; "
                "the command may have reached Redis, so it may have been written and be delivered",
                maybe_written=True,
            ) from exc
        self._sends += 1
        if self.max_len is not None and self._sends % 100 == 0 and key not in self._trims:
            task = asyncio.get_running_loop().create_task(self._trim_quietly(key))
            self._trims[key] = task
            task.add_done_callback(lambda _: self._trims.pop(key, None))
        return entry

    def _start_flush(self) -> None:
        batch, self._outbox = self._outbox, []
        task = asyncio.get_running_loop().create_task(self._write(batch))
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)

    async def _write(self, batch: list[tuple[str, dict[str, Any], asyncio.Future[str]]]) -> None:
        entries: list[Any] = []
        connected = False
        expired = False

        def sending() -> None:
            nonlocal connected
            connected = True

        def fail(exc: BaseException) -> None:
            error = exc
            if not connected and isinstance(exc, RedisError | TimeoutError | OSError):
                error = _Unsent()
                error.__cause__ = exc
            for _, _, waiter in batch[len(entries) :]:
                if not waiter.done():
                    waiter.set_exception(error)

        def expire() -> None:
            # The deadline answers the senders itself, whatever becomes of the cancellation
            # below: redis-py can swallow one that lands as a socket write completes.
            nonlocal expired
            expired = True
            fail(TimeoutError())
            cancel()

        writing = asyncio.current_task()
        assert writing is not None
        cancel = writing.cancel
        timer = asyncio.get_running_loop().call_later(self.timeout, expire)
        try:
            for start in range(0, len(batch), _WRITE_BATCH):
                if expired:  # its senders were told: nothing more may be written
                    break
                connected = False
                chunk = batch[start : start + _WRITE_BATCH]
                keys = [key for key, _, _ in chunk]
                args = [value for _, fields, _ in chunk for value in (fields["i"], fields["h"], fields["b"])]
                (added,) = await self._execute([("EVALSHA", SHA["add"], len(keys), *keys, *args)], sending)
                entries.extend(added)
        except asyncio.CancelledError:
            if not expired:  # cancelled by someone else (the loop closing): so are its senders
                for _, _, waiter in batch[len(entries) :]:
                    waiter.cancel()
                raise
            # Timed out: the senders have their answer.
        except Exception as exc:  # each unwritten send raises it (send() wraps Redis's own errors)
            fail(exc)
        finally:
            timer.cancel()
            for (_, _, waiter), entry in zip(batch, entries, strict=False):
                if not waiter.done():
                    waiter.set_result(entry.decode() if isinstance(entry, bytes) else str(entry))

    async def _trim_quietly(self, key: str) -> None:
        try:
            await self.trim(key)
        except TransportError as exc:
            logger.warning("pybus: %s; the sends were written, and trimming is tried again later", exc)

    async def trim(self, key: str) -> None:
        """Trim `key` to about `max_len` entries, never past what a group still needs.

        Raises `TransportError` when Redis refuses."""
        if self.max_len is None:
            return
        try:
            await wire.trim(self.client, key, self.max_len)
        except RedisError as exc:
            raise TransportError(f"Could not trim {key}: {exc}") from exc

    # -- consuming ---------------------------------------------------------------------

    async def check_durability(self) -> list[str]:
        """Warn (on the `pybus` logger) when the server is configured to lose acknowledged
        entries; return the warnings. Run once, at the first read."""
        warnings = await wire.durability_warnings(self.client)
        for text in warnings:
            logger.warning("pybus: %s", text)
        return warnings

    async def _prepare(self, keys: list[str]) -> None:
        if not self._checked:
            self._checked = True
            try:
                await self.check_durability()
            except ResponseError:  # CONFIG may be disabled (managed Redis): nothing to tell
                pass
        for key in keys:
            if key in self._groups_ready:
                continue
            try:
                await self.client.xgroup_create(key, self.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._groups_ready.add(key)
            self._own_from[key] = b"0"

    async def receive(self, names: Sequence[str], *, max_count: int, wait: float) -> list[Envelope]:
        """Up to `max_count` envelopes, never one this process already holds; blocks at most
        `wait` seconds, and never past the next claim.

        The reading runs in a task of its own, which a cancellation of the caller does
        not interrupt in the middle of a round trip that takes entries (Redis would have
        counted their delivery): what it takes then waits here, to be handed out by the
        next read or given back by `aclose()`. Only the wait for new entries, which
        takes nothing, is cut short. Raises `TransportError` when Redis cannot be
        reached or refuses."""
        keys = [self._key(name) for name in names]
        previous = self._reading
        if previous is not None and not previous.done():
            await asyncio.wait([previous])  # an abandoned read ends at its next step
        loop = asyncio.get_running_loop()
        state = _Read(loop.create_future())
        self._read_state = state
        reading = self._reading = loop.create_task(self._read(keys, max_count, wait, state))
        try:
            # The task answers through this future itself: the caller wakes at the next turn
            # of the loop (a done callback, as asyncio.shield uses, would take two).
            return await state.reply
        except asyncio.CancelledError:
            state.abandoned = True
            if state.waiting:
                reading.cancel()  # waiting for new entries, which takes nothing
            elif state.reply.done() and not state.reply.cancelled():
                self._keep(state.reply)  # answered as the cancellation came
            raise
        except RedisError as exc:
            if "NOGROUP" in str(exc):
                # The stream or the group is gone (Redis restarted without its data, or they
                # were deleted): the next read creates them again.
                self._groups_ready.difference_update(keys)
                raise TransportError(
                    f"Could not read from Redis: {_describe(exc)}; the stream or its consumer group "
                    f"{self.group!r} no longer exists (Redis lost its data, or they were deleted): "
                    "they are created again at the next read"
                ) from exc
            raise TransportError(f"Could not read from Redis: {_describe(exc)}") from exc

    async def _read(self, keys: list[str], max_count: int, wait: float, state: _Read) -> None:
        """Run `_receive` and answer `state.reply`; when the caller is gone, what it took
        waits in `_claimed`."""
        try:
            found = await self._receive(keys, max_count, wait, state)
        except asyncio.CancelledError:
            # Cancelled while it waited for new entries (nothing taken), its caller gone; or
            # by someone else (the loop closing): the caller is told so.
            state.reply.cancel()
            raise
        except Exception as exc:
            if not state.reply.done():
                state.reply.set_exception(exc)
            else:  # the caller is gone: nobody else would hear of it
                logger.warning(
                    "pybus: a read from Redis whose caller was cancelled failed (%s); what it may have "
                    "taken stays pending and is claimed again after claim_idle",
                    _describe(exc),
                )
            return
        except BaseException as exc:
            if not state.reply.done():
                state.reply.set_exception(exc)
            raise
        if state.reply.done():
            self._claimed.extendleft(reversed(found))
        else:
            state.reply.set_result(found)

    @property
    def _read_waiting(self) -> bool:
        return self._read_state is not None and self._read_state.waiting

    def _keep(self, reply: asyncio.Future[list[Envelope]]) -> None:
        """What a read whose caller was cancelled as it answered took waits to be handed out
        or given back."""
        error = reply.exception()
        if error is not None:
            logger.warning(
                "pybus: a read from Redis whose caller was cancelled failed (%s); what it may have taken "
                "stays pending and is claimed again after claim_idle",
                _describe(error),
            )
            return
        self._claimed.extendleft(reversed(reply.result()))

    async def _receive(self, keys: list[str], max_count: int, wait: float, state: _Read) -> list[Envelope]:
        await self._prepare(keys)
        deadline = time.monotonic() + wait
        self._takes += 1  # the stream each read of several starts at turns
        while True:
            fresh = await self._take(keys, max_count)
            if fresh:
                return fresh
            if len(keys) == 1:
                fresh, newest = await self._read_stream(keys[0], max_count)
            else:
                fresh, newest = await self._read_streams(keys, max_count)
            if fresh:
                return fresh
            now = time.monotonic()
            if now >= deadline or state.abandoned:
                return []
            if not newest:
                continue  # what it read was all skipped: there may be more to read at once
            # Wait for an entry newer than the newest there was (XREAD, outside the group: it
            # takes nothing, so cutting it short loses nothing), then take it above.
            block_ms = max(1, int((min(deadline, self._next_claim) - now) * 1000))
            state.waiting = True
            try:
                await self.client.xread(dict(zip(keys, newest, strict=True)), count=1, block=block_ms)
            finally:
                state.waiting = False
            if state.abandoned:
                # redis-py can swallow a cancellation that lands as a blocking read ends.
                return []

    async def _read_stream(self, key: str, count: int) -> tuple[list[Envelope], list[bytes]]:
        """New entries of one stream: `XREADGROUP ... >` on its own (a script would make Redis
        copy every entry into Lua and back, which costs it three times the read), then
        the de-duplication check, with the buffered acks, in a second round trip. Returns
        (the envelopes to handle, []), or ([], [the stream's newest entry id]) when there
        was nothing new: that id is read before a second read, so an entry added after
        it has a greater id."""
        read = ("XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", count, "STREAMS", key, ">")
        (reply,) = await self._execute([read])
        if reply is None:
            latest, reply = await self._execute([("XREVRANGE", key, "+", "-", "COUNT", 1), read])
            if reply is None:
                return [], [latest[0][0] if latest else b"0-0"]
        # One stream's reply: a map of it to its entries (RESP3), or a list of one pair (RESP2).
        (items,) = reply.values() if isinstance(reply, dict) else (item for _, item in reply)
        return await self._skip_done(self._accept_new(key, items)), []

    async def _read_streams(self, keys: list[str], count: int) -> tuple[list[Envelope], list[bytes]]:
        """New entries of several streams: `redis_wire.TAKE` reads up to `count` over all of
        them, starting at another stream each time, and checks them against the handled
        ones, in the round trip of the buffered acks. Returns what `_read_stream` does."""
        take = (
            "EVALSHA", SHA["take"], 1 + len(keys), self._done_key, *keys,
            self.group, self.consumer, count, self._takes,
        )  # fmt: skip
        ((reply, done, newest),) = await self._flush_acks([take])
        found: list[Envelope | None] = []
        for stream, items in reply:
            found.extend(self._accept_new(stream.decode(), items))
        fresh = self._hand_out(
            [(env, seen) for env, seen in zip(found, done, strict=True) if env is not None]
        )
        return fresh, newest

    async def _take(self, keys: list[str], max_count: int) -> list[Envelope]:
        """What can be handed out without waiting: entries to try again, this consumer's own
        pending entries after a start, and entries claimed from consumers that stopped."""
        for key in keys:
            if key in self._own_from and len(self._claimed) < _BACKLOG:
                await self._read_own(key)
        # A stream's claims wait until its own pending entries are read: a claim taking one
        # of those first would make the read count a second delivery.
        claimable = [key for key in keys if key not in self._own_from]
        if claimable and time.monotonic() >= self._next_claim and len(self._claimed) < _BACKLOG:
            await self._claim(claimable)
        taken: list[Envelope] = []
        while self._again and len(taken) < max_count:
            taken.append(self._again.popleft())
        while self._claimed and len(taken) < max_count:
            taken.append(self._claimed.popleft())
        return await self._skip_done(taken)

    async def _read_own(self, key: str) -> None:
        """Read this consumer's pending entries after the last one read (left by an earlier
        process of the same name) into `_claimed`; each such read counts a delivery."""
        start, count = self._own_from[key], _CLAIM_BATCH
        reply = await self.client.xreadgroup(self.group, self.consumer, {key: start}, count=count)
        entries = wire.entries(reply or [], with_deleted=True)
        if len(entries) < count:
            del self._own_from[key]  # all read: from now on, only claims and new entries
        else:
            self._own_from[key] = entries[-1][1]
        entries = [entry for entry in entries if entry[2] and (key, entry[1]) not in self._held]
        if not entries:
            return
        pending = await self.client.xpending_range(
            key, self.group, min=entries[0][1], max=entries[-1][1], count=count, consumername=self.consumer
        )
        counts = {item["message_id"]: item["times_delivered"] for item in pending}
        for entry in entries:
            envelope = self._accept(entry, counts.get(entry[1], 1))
            if envelope is not None:
                self._claimed.append(envelope)

    async def _claim(self, keys: list[str]) -> None:
        """Claim entries idle for `claim_idle` in any consumer (one that stopped: the live
        ones keep theirs fresh), except those held here; they wait in `_claimed`."""
        held: dict[str, list[bytes]] = {key: [] for key in keys}
        for key, entry_id in self._held:
            if key in held:
                held[key].append(entry_id)
        idle = int(self.claim_idle * 1000)
        claims = [
            ("EVALSHA", SHA["claim"], 1, key, self.group, self.consumer, idle, _CLAIM_BATCH, b"\n".join(skip))
            for key, skip in held.items()
        ]
        full = False
        for key, (claimed, attempts) in zip(keys, await self._execute(claims), strict=True):
            for (entry_id, fields), attempt in zip(claimed, attempts, strict=True):
                envelope = self._accept((key, entry_id, wire.pairs(fields)), attempt)
                if envelope is not None:
                    self._claimed.append(envelope)
            full = full or len(claimed) == _CLAIM_BATCH
        # A full claim may have left more behind: claim again at the next read.
        self._next_claim = time.monotonic() + (0.0 if full else self.claim_interval)

    def _accept(self, entry: Entry, attempt: int) -> Envelope | None:
        """An entry received from Redis, now held here; None when it is not to be handled
        here (it was already held, or it was requeued for another group: then acked)."""
        key, entry_id, fields = entry
        receipt = (key, entry_id)
        if receipt in self._held:
            return None
        self._held.add(receipt)
        self._keep_held()
        envelope = wire.entry_envelope(key, self.prefix, entry_id, fields, attempt)
        target = fields.get(b"g")
        if target is not None and target.decode() != self.group:
            self._queue_ack(envelope, False)
            return None
        return envelope

    def _accept_new(self, key: str, items: list[Any]) -> list[Envelope | None]:
        """`_accept` for each raw entry of stream `key` that XREADGROUP ... > delivered
        (`items`, [entry id, fields]: attempt 1), in a loop of its own (see
        `redis_wire.new_envelopes`); in the order of `items`."""
        held = self._held
        accepted: list[Envelope | None] = []
        for receipt, envelope, target in wire.new_envelopes(key, self.prefix, items, 1):
            if receipt in held:
                accepted.append(None)
                continue
            held.add(receipt)
            if target is not None and target.decode() != self.group:
                self._queue_ack(envelope, False)
                accepted.append(None)
                continue
            accepted.append(envelope)
        self._keep_held()
        return accepted

    def _keep_held(self) -> None:
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.get_running_loop().create_task(self._keep_alive())

    async def _skip_done(self, envelopes: Sequence[Envelope | None]) -> list[Envelope]:
        """Send the buffered acks and check the message ids against those handled, in one
        round trip; see `_hand_out`. If that fails (or is cancelled), the envelopes wait
        in `_claimed`: handed out by the next read, or given back by `aclose()`."""
        found = [envelope for envelope in envelopes if envelope is not None]
        if not found:
            return []
        try:
            ids = "\n".join([envelope.message_id for envelope in found])
            if ids.count("\n") == len(found) - 1:
                check: tuple[Any, ...] = ("EVALSHA", SHA["check"], 1, self._done_key, ids)
            else:  # an id with a line break (not pybus's): one argument each
                check = ("EVAL", _CHECK_EACH, 1, self._done_key, *[envelope.message_id for envelope in found])
            (done,) = await self._flush_acks([check])
        except BaseException:
            self._claimed.extendleft(reversed(found))
            raise
        return self._hand_out(list(zip(found, done, strict=True)))

    def _hand_out(self, checked: list[tuple[Envelope, object]]) -> list[Envelope]:
        """The envelopes to handle; the others are acked without being handled: a copy of a
        message handled already (recorded in Redis for `dedupe_window` seconds, across
        processes) or being handled here under another entry (a message sent twice).

        Those acks record nothing: only a successful handling marks a message done, so a
        skipped copy never makes the retry of a failed first copy look done.
        """
        fresh = []
        handling = self._handling
        for envelope, seen in checked:
            receipt = envelope.receipt
            if seen or handling.setdefault(envelope.message_id, receipt) != receipt:
                self._queue_ack(envelope, False)
            else:
                fresh.append(envelope)
        return fresh

    # -- holding -------------------------------------------------------------------------

    async def _keep_alive(self) -> None:
        """Reset the idle time of the entries held here every `claim_idle / 4` seconds while
        there are any, so that no live consumer's claim takes work in progress."""
        while self._held:
            await asyncio.sleep(max(self.claim_idle / 4, 0.01))
            by_key: dict[str, list[bytes]] = {}
            for key, entry_id in self._held:
                by_key.setdefault(key, []).append(entry_id)
            if not by_key:
                break
            try:
                # An entry given back meanwhile (idle a day) is not refreshed: it stays claimable.
                kept = str(_RELEASED_IDLE_MS // 2)
                lost = await self._hold([(key, ids, "", "") for key, ids in by_key.items()], kept)
            except RedisError as exc:
                logger.warning(
                    "pybus: could not refresh the %d entries held by %s (%s: %s); past claim_idle another "
                    "consumer may claim them and handle them again",
                    len(self._held), self.consumer, type(exc).__name__, exc,
                )  # fmt: skip
                continue
            for receipt in lost:  # acked or claimed elsewhere while this process stalled
                self._held.discard(receipt)
                for waiting in (self._again, self._claimed):
                    for envelope in [e for e in waiting if wire.receipt(e) == receipt]:
                        waiting.remove(envelope)  # not handed out: the other consumer has it
                        self._forget(envelope)

    async def _hold(self, calls: list[tuple[str, list[bytes], str, str]], limit: str = "") -> list[Receipt]:
        """Run `redis_wire.HOLD` for each (key, entry ids, retry count or "", idle ms or "") in
        one round trip; return the entries that are no longer this consumer's to keep."""

        commands = [
            ("EVALSHA", SHA["hold"], 1, key, self.group, self.consumer, count, idle, b"\n".join(ids), limit)
            for key, ids, count, idle in calls
        ]
        replies = await self._execute(commands)
        return [
            (key, entry_id) for (key, _, _, _), lost in zip(calls, replies, strict=True) for entry_id in lost
        ]

    def _forget(self, envelope: Envelope) -> None:
        """The entry is no longer this process's to keep alive."""
        receipt = wire.receipt(envelope)
        self._held.discard(receipt)
        if self._handling.get(envelope.message_id) == receipt:
            del self._handling[envelope.message_id]

    # -- outcomes ----------------------------------------------------------------------

    async def ack(self, envelope: Envelope) -> None:
        """Buffer the ack; it goes to Redis with the check of the next read, or with the other
        acks made meanwhile, within `_ACK_DELAY` (at once when nothing else is in hand).
        Raises the `TransportError` of an earlier ack round trip that failed (its acks are
        kept and sent again), so that the failure reaches the consumer's error hook."""
        self._queue_ack(envelope, True)
        if self._ack_failure is not None:
            failure, self._ack_failure = self._ack_failure, None
            raise failure

    def _queue_ack(self, envelope: Envelope, handled: bool) -> None:
        acks = self._acks
        if not acks:
            self._acks_due = asyncio.get_running_loop().time() + _ACK_DELAY
        acks.append((envelope, handled))
        if self._acking is None:
            self._start_acking()
        elif self._ack_wakeup is not None and (
            len(acks) >= _ACK_BATCH or len(self._held) <= len(acks) + self._acks_sent
        ):
            self._wake_acks()

    def _acks_ready(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether the buffered acks go now: asked for (flush, aclose), enough of them,
        nothing else in hand (every entry held here is being acked: no read's check is
        coming soon to take them along), or the oldest has waited `_ACK_DELAY`."""
        waiting = len(self._acks)
        return (
            self._acks_now
            or waiting >= _ACK_BATCH
            or len(self._held) <= waiting + self._acks_sent
            or loop.time() >= self._acks_due
        )

    def _wake_acks(self) -> None:
        wakeup = self._ack_wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    def _acks_at_once(self) -> asyncio.Task[None] | None:
        """Have the buffered acks sent without waiting; the task that sends them, if any."""
        if self._acks or self._acking is not None:
            self._acks_now = True
            self._wake_acks()
            if self._acking is None:
                self._start_acking()
        return self._acking

    def _start_acking(self) -> asyncio.Task[None]:
        task = self._acking = asyncio.get_running_loop().create_task(
            self._send_acks(), name="pybus-redis-acks"
        )
        return task

    async def _send_acks(self) -> None:
        """Send the buffered acks until none are left: one round trip at a time, each once the
        acks are due (`_acks_ready`; a read's check may take them along meanwhile). After a
        failure, which the next `ack()` or `flush()` raises, it tries again every
        `_ACK_PAUSE` seconds (and a read sends them too) until they are sent."""
        loop = asyncio.get_running_loop()
        try:
            while self._acks and not self._closed:
                if not self._acks_ready(loop):
                    wakeup = self._ack_wakeup = loop.create_future()
                    timer = loop.call_at(self._acks_due, _wake, wakeup)
                    try:
                        await wakeup
                    finally:
                        timer.cancel()
                        self._ack_wakeup = None
                    continue
                try:
                    await self._flush_acks()
                except Exception as exc:
                    if not isinstance(exc, TransportError):  # _flush_acks wraps Redis's own errors
                        exc = TransportError(f"Could not ack messages: {_describe(exc)}")
                    self._ack_failure = exc
                    self._ack_pausing = True
                    try:
                        await asyncio.sleep(_ACK_PAUSE)
                    finally:
                        self._ack_pausing = False
        finally:
            self._acking = None
            self._acks_now = False

    async def flush(self) -> None:
        """Send the acks buffered so far, waiting at most `timeout`; raise the failure of an
        ack round trip since the last ack() (the acks are kept and sent again). Acks that a
        read's check took along are waited for, and sent again here if that round trip
        failed (the read's caller hears of its failure)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        carried = self._carried
        try:
            if carried is not None and not carried.done():
                await self._bounded(carried, "the acks a read's check carries")
            acking = self._acks_at_once()
            if acking is not None:
                await self._bounded(acking, f"{len(self._acks)} ack(s)", deadline - loop.time())
        except TransportError as cut:
            failure, self._ack_failure = self._ack_failure, None
            raise failure or cut from None
        failure, self._ack_failure = self._ack_failure, None
        if failure is not None:
            raise failure

    async def _flush_acks(self, then: Sequence[Sequence[Any]] = ()) -> list[Any]:
        """Send the buffered acks, and the commands `then` after them in the same round trip
        (they see the acks' marks); return the replies to `then`."""
        acks, self._acks = self._acks, []
        if not acks and not then:
            return []
        carried = None
        if acks and then:  # a read's round trip: flush() waits for the acks it takes along
            carried = self._carried = asyncio.get_running_loop().create_future()
        self._acks_sent += len(acks)
        try:
            replies = await self._execute([*self._ack_commands(acks), *then])
        except BaseException as exc:
            self._acks[:0] = acks  # keep them: acked on the next flush
            if isinstance(exc, RedisError) and not then:  # else the caller tells what failed
                raise TransportError(
                    f"Could not ack {len(acks)} message(s): {_describe(exc)}; they stay pending in Redis "
                    "and the acks are sent again with the next ones (or by aclose())"
                ) from exc
            raise
        finally:
            self._acks_sent -= len(acks)
            if carried is not None:
                carried.set_result(None)  # those that failed are back in the buffer
        self._acked(acks)
        return replies[len(replies) - len(then) :]

    def _acked(self, acks: list[tuple[Envelope, bool]]) -> None:
        """`_forget` each acked entry, inline: this runs once per message."""
        held, handling = self._held, self._handling
        for envelope, _ in acks:
            receipt = cast("Receipt", envelope.receipt)
            held.discard(receipt)
            if handling.get(envelope.message_id) == receipt:
                del handling[envelope.message_id]

    def _ack_commands(self, acks: list[tuple[Envelope, bool]]) -> list[tuple[Any, ...]]:
        """The commands that ack `acks`: one `redis_wire.ACK` script per stream."""
        if not acks:
            return []
        by_stream: dict[str, tuple[list[str], list[bytes]]] = {}
        for envelope, handled in acks:
            key, entry_id = cast("Receipt", envelope.receipt)
            ids = by_stream.get(key)
            if ids is None:
                ids = by_stream[key] = ([], [])
            if handled:
                ids[0].append(envelope.message_id)
            ids[1].append(entry_id)
        now = int(time.time())
        self._flushes += 1
        expire = str(now - int(self.dedupe_window)) if self._flushes % 100 == 1 else ""
        # One script per stream: the ids travel as two arguments, not one each.
        script = ("EVALSHA", SHA["ack"], 2, self._done_key)
        commands: list[tuple[Any, ...]] = []
        for key, (message_ids, entry_ids) in by_stream.items():
            marks = "\n".join(message_ids)
            if message_ids and (marks.count("\n") != len(message_ids) - 1 or "" in message_ids):
                # An id with a line break, or an empty one (not pybus's): marked on its own,
                # first, as the script would.
                odd = [message_id for message_id in message_ids if not message_id or "\n" in message_id]
                commands.append(("ZADD", self._done_key, "NX", *[v for i in odd for v in (now, i)]))
                marks = "\n".join(
                    message_id for message_id in message_ids if message_id and "\n" not in message_id
                )
            commands.append((*script, key, self.group, now, marks, b"\n".join(entry_ids), expire))
        return commands

    async def _through(self, step: Coroutine[Any, Any, None], what: str) -> None:
        """Run `step`, an outcome's round trips, to its end even if the caller is cancelled
        meanwhile: Redis may have applied it already, and what it changes (the entry to try
        again, the entries no longer held) must be recorded here. `aclose()` waits for it."""
        await self._bounded(self._step(step), what)

    def _log_unheard(self, task: asyncio.Future[None]) -> None:
        if task not in self._unheard:
            self._unheard.add(task)
            task.add_done_callback(_log_failure)
            task.add_done_callback(self._unheard.discard)

    def _step(self, step: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(step)
        self._steps.add(task)
        task.add_done_callback(self._steps.discard)
        return task

    async def _bounded(self, task: asyncio.Future[None], what: str, timeout: float | None = None) -> None:
        """Wait for `task`, at most `timeout` (what is left of the transport's), and raise
        what it raised. Neither the caller's cancellation nor the timeout interrupts the
        task: the caller stops waiting, which no cancellation swallowed inside redis-py can
        delay (it waits on `asyncio.wait`), and the task's failure is logged (once) when
        nobody else hears of it."""
        try:
            await asyncio.wait([task], timeout=self.timeout if timeout is None else max(timeout, 0.0))
        except asyncio.CancelledError:
            self._log_unheard(task)  # the caller is gone: nobody else would hear of it
            raise
        if not task.done():
            self._log_unheard(task)
            raise TransportError(
                f"Redis did not answer within {self.timeout} s to {what}; it is still sent, and "
                "what Redis has not applied stays pending, claimed again after claim_idle"
            )
        task.result()

    async def retry(self, envelope: Envelope, error: BaseException) -> None:
        """Hand the envelope out again from here, its delivery count (Redis's too) one higher.

        If another consumer claimed the entry meanwhile (or it was acked), it is theirs:
        it is not handed out here. Raises `TransportError` when Redis refuses; the entry
        is then claimed again after `claim_idle`. A cancellation of the caller does not
        interrupt it: the failure counts, and the entry waits here (given back by
        `aclose()` with that count)."""
        await self._through(self._retry(envelope), f"the retry of {_named(envelope)}")

    async def _retry(self, envelope: Envelope) -> None:
        key, entry_id = wire.receipt(envelope)
        try:
            lost = await self._hold([(key, [entry_id], str(envelope.attempt + 1), "")])
        except RedisError as exc:
            self._forget(envelope)
            raise TransportError(
                f"Could not hand back {envelope.name} (message id {envelope.message_id}) for another "
                f"attempt: {exc}; it stays pending and is claimed again after claim_idle"
            ) from exc
        if lost:
            self._forget(envelope)
        else:
            self._again.append(dataclasses.replace(envelope, attempt=envelope.attempt + 1))

    async def release(self, envelope: Envelope) -> None:
        """Give the envelope back without counting a delivery: its delivery count goes back to
        `attempt - 1` and its idle time past any `claim_idle`, so any consumer's next claim
        (or this consumer's next start) delivers it again with the same `attempt`. A
        cancellation of the caller does not interrupt it."""
        if self._releasing is None:  # the first of this turn: the give-backs of the turn go together
            task = self._step(self._release_soon())
            self._releasing = ([], task)
        envelopes, task = self._releasing
        envelopes.append(envelope)
        await self._bounded(task, f"the give-back of {_named(envelope)}")

    async def _release_soon(self) -> None:
        # The first step runs once the turn that made this task is over.
        assert self._releasing is not None
        envelopes, _ = self._releasing
        self._releasing = None
        await self._release(envelopes)

    async def _release(self, envelopes: list[Envelope]) -> None:
        if not envelopes:
            return
        idle = str(_RELEASED_IDLE_MS)
        calls = [(*wire.receipt(envelope), str(envelope.attempt - 1)) for envelope in envelopes]
        try:
            await self._hold([(key, [entry_id], count, idle) for key, entry_id, count in calls])
        except RedisError as exc:
            raise TransportError(
                f"Could not give back {len(envelopes)} message(s) ({envelopes[0].name}, ...): {exc}; "
                "they stay pending and are claimed again after claim_idle, which counts a delivery"
            ) from exc
        finally:
            for envelope in envelopes:
                self._forget(envelope)

    async def dead_letter(self, envelope: Envelope, reason: str) -> None:
        """Move the envelope to the dead-letter stream with `reason`, and ack it, in one
        `MULTI/EXEC`; a cancellation of the caller does not interrupt it. Raises
        `TransportError` when Redis refuses (the entry stays pending)."""
        await self._through(self._dead_letter(envelope, reason), f"the dead letter of {_named(envelope)}")

    async def _dead_letter(self, envelope: Envelope, reason: str) -> None:
        key, entry_id = wire.receipt(envelope)
        fields: dict[str, Any] = dict(wire.entry_fields(envelope))
        fields.update(
            reason=reason,
            error=error_line(reason),
            attempt=str(envelope.attempt),
            stream=key,
            entry_id=entry_id,
            group=self.group,
        )
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.xadd(self.dead_key, fields)
                pipe.xack(key, self.group, entry_id)
                await pipe.execute()
        except RedisError as exc:
            raise TransportError(f"Could not dead-letter {envelope.name}: {exc}") from exc
        finally:
            self._forget(envelope)

    async def aclose(self) -> None:
        """Let the writes, trims, reads and outcomes in flight finish, send the buffered acks,
        give back what was received and not handed out (retries, claimed entries, what a
        cancelled read took) without counting a delivery, close the connections.

        Returns within about `timeout`, also when Redis does not answer: past it the
        connections are closed, which ends the round trips still waiting, and it raises
        `TransportError`; what was not acked or given back stays pending in Redis and
        is claimed again after `claim_idle`. It never relies on one cancellation being
        delivered (redis-py can swallow one): a wait is cancelled again until it ends. A
        second call, after one that was cancelled or timed out, sends and gives back what
        is left: the connections open again for it, and close at its end."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        self._closed = False  # the acks a close cut short left are sent below
        left: set[asyncio.Task[Any]] = set()
        unclean: BaseException | None = None
        failure: BaseException | None = None  # the give-back's, else an ack round trip's
        try:
            busy: set[asyncio.Task[Any]] = {*self._writing, *self._trims.values(), *self._steps}
            acking = self._acks_at_once()  # the acks waiting to be due go now
            if acking is not None:
                busy.add(acking)
            if self._reading is not None:
                busy.add(self._reading)
            if self._keeper is not None:
                busy.add(self._keeper)
            left = await self._settle(busy, deadline)
            if not left:
                acking = self._acks_at_once()
                left = await self._settle({acking} if acking is not None else set(), deadline)
            if not left:
                waiting = [*self._again, *self._claimed]
                self._again.clear()
                self._claimed.clear()
                if waiting:
                    giving_back = self._step(self._release(waiting))
                    left = await self._settle({giving_back}, deadline)
                    if not left and not giving_back.cancelled() and giving_back.exception() is not None:
                        failure = giving_back.exception()  # raised below, after the close
        finally:
            self._closed = True  # acks that fail now are not tried again
            for client in (self.client, self._rounds):
                try:
                    await client.aclose()  # ends what still waits on a connection
                except (RedisError, OSError) as exc:  # a socket that would not close in time: closed anyway
                    unclean = unclean or exc
            if left:
                await self._settle(left, loop.time() + 1.0)
        ack_failure, self._ack_failure = self._ack_failure, None
        failure = failure or ack_failure
        if left:
            raise TransportError(
                f"Redis did not answer within {self.timeout} s while the transport closed: the "
                "entries it had not acked or given back stay pending in Redis and are delivered "
                "again after claim_idle"
            ) from unclean
        if unclean is not None:
            raise TransportError(
                f"The connections to Redis did not close cleanly: {_describe(unclean)}"
            ) from unclean
        if failure is not None:
            raise failure

    async def _settle(self, tasks: set[asyncio.Task[Any]], deadline: float) -> set[asyncio.Task[Any]]:
        """Wait until `tasks` end or `deadline` (loop time) passes; return those still running.
        The keep-alive, and a read waiting for new entries (which takes nothing), are
        cancelled, again at each turn: redis-py can swallow a cancellation."""
        loop = asyncio.get_running_loop()
        pending = {task for task in tasks if not task.done()}
        while pending:
            for task in pending:
                if (
                    task is self._keeper
                    or (task is self._reading and self._read_waiting)
                    or (task is self._acking and self._ack_pausing)  # aclose() sends them next
                ):
                    task.cancel()
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            _, pending = await asyncio.wait(pending, timeout=min(remaining, 0.05))
        return pending


def _log_failure(task: asyncio.Future[None]) -> None:
    error = None if task.cancelled() else task.exception()
    if error is not None:
        logger.warning("pybus: %s", _describe(error))


def _named(envelope: Envelope) -> str:
    return f"{envelope.name} (message id {envelope.message_id})"


def _describe(error: BaseException | None) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


#: `redis_wire.CHECK` for ids given one argument each.
_CHECK_EACH = """
local done = {}
for first = 1, #ARGV, 1000 do
    local scores = redis.call("ZMSCORE", KEYS[1], unpack(ARGV, first, math.min(first + 999, #ARGV)))
    for _, score in ipairs(scores) do done[#done + 1] = score and 1 or 0 end
end
return done
"""


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
