"""Consuming routed messages: receive, decode, handle, then ack, retry or dead-letter.

A `Consumer` reads the routed messages this process has handlers for and
handles each exactly as `publish`/`execute` would, follow-ups included. It
acks an envelope only when that handling succeeded, routed follow-ups having
been written to the transport by then. A failed handling goes back to the
transport (`retry`) and comes again with a higher `attempt`, until
`max_deliveries`, after which it is dead-lettered with the error and its
traceback. An envelope that cannot be decoded is dead-lettered at once: it
never stops the consumer and never blocks the messages behind it.
"""

from __future__ import annotations

import asyncio
import contextvars
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from pybus.codec import JsonCodec
from pybus.errors import DecodeError, ImproperlyConfigured, Kind, whole_number
from pybus.transport import Envelope, Transport
from pybus.workers import start_in

#: The envelope being handled in this context: routed sends made while handling
#: it carry its correlation id, and its message id as their causation id.
current_envelope: ContextVar[Envelope | None] = ContextVar("pybus_envelope", default=None)

#: How a message of each kind is handled: the engines' deliver/handle methods.
Handlers = Mapping[Kind, Callable[[Any], Awaitable[object]]]
Report = Callable[[BaseException, object], None]


class Consumer:
    """Reads `names` from `transport` and handles up to `concurrency` envelopes at a time.

    It holds at most `concurrency` envelopes (received and not yet acked or given
    back) and reads at most `prefetch` at once (default: half the concurrency),
    so that the next read is on its way while a batch is being handled.
    """

    def __init__(
        self,
        transport: Transport,
        codec: JsonCodec,
        handlers: Handlers,
        names: Sequence[str],
        *,
        report: Report,
        concurrency: int = 4,
        prefetch: int | None = None,
        max_deliveries: int = 5,
        wait: float = 1.0,
    ) -> None:
        self.transport = transport
        self.codec = codec
        self.names = list(names)
        self._handlers = handlers
        self._report = report
        concurrency = whole_number("concurrency", concurrency, 1)
        prefetch = whole_number("prefetch", max(1, concurrency // 2) if prefetch is None else prefetch, 1)
        if prefetch > concurrency:
            raise ImproperlyConfigured(
                f"prefetch={prefetch} is more than concurrency={concurrency}: a consumer never holds more "
                "than its concurrency, so it cannot read more at once; lower prefetch or raise concurrency"
            )
        self.concurrency = concurrency
        self.prefetch = prefetch
        self.max_deliveries = max_deliveries
        self.wait = wait
        self.pause_after_error = 0.5
        self._in_flight: set[asyncio.Task[None]] = set()  # handlings that had to wait
        self._refill = max(1, concurrency // 2)
        self._slot_freed = asyncio.Event()
        self._receiving: asyncio.Task[list[Envelope]] | None = None
        self._stopping = asyncio.Event()
        self._batch_started = asyncio.Event()  # clear while the reader starts a batch
        self._batch_started.set()
        self.handled = 0
        self.failed = 0
        self.dead_lettered = 0

    async def run(self) -> None:
        """Receive and handle until `stop()`; returns once reading has stopped.

        The reading task starts each message's handling itself, in a context of
        its own; a handling that finishes without waiting (the common case) costs
        no task, one that waits is finished by a task. A read asks for at most
        `prefetch` messages, and only when half the `concurrency` slots are free;
        when the batch just received leaves room for another, the next read is
        sent before the batch is handled, so the broker's work and this
        process's overlap. The consumer never holds more than `concurrency`
        messages.
        """
        loop = asyncio.get_running_loop()
        if not self.names:  # no routed message has a handler here: nothing to read
            await self._stopping.wait()
            return
        reading: asyncio.Task[list[Envelope]] | None = None
        try:
            while not self._stopping.is_set():
                if reading is None:
                    free = self.concurrency - len(self._in_flight)
                    if free < self._refill:
                        self._slot_freed.clear()
                        await self._slot_freed.wait()
                        continue
                    reading = self._read(loop, free)
                try:
                    envelopes = await reading
                except asyncio.CancelledError:
                    if self._stopping.is_set() and not asyncio.current_task().cancelling():  # type: ignore[union-attr]
                        break  # stop() interrupted a blocking read: what it had taken stays pending
                    raise
                except Exception as exc:  # the broker is away: report, wait a little, read again
                    reading = None
                    self._report(exc, None)
                    await asyncio.sleep(self.pause_after_error)
                    continue
                reading = None
                room = self.concurrency - len(self._in_flight) - len(envelopes)
                if envelopes and room >= self._refill:
                    reading = self._read(loop, room)  # read ahead
                await self._start_batch(envelopes, reading is not None)
        finally:
            if reading is not None:
                await self._give_back(reading)

    def _read(self, loop: asyncio.AbstractEventLoop, room: int) -> asyncio.Task[list[Envelope]]:
        count = min(room, self.prefetch)
        self._receiving = loop.create_task(
            self.transport.receive(self.names, max_count=count, wait=self.wait)
        )
        return self._receiving

    async def _start_batch(self, envelopes: list[Envelope], reading_ahead: bool) -> None:
        self._batch_started.clear()
        try:
            for index, envelope in enumerate(envelopes):
                if reading_ahead and index % 16 == 0:
                    # Handlings that finish without waiting keep the loop busy: let the
                    # read ahead go out first, and other tasks run now and then.
                    await asyncio.sleep(0)
                self._start(envelope)
        finally:
            self._batch_started.set()

    async def _give_back(self, reading: asyncio.Task[list[Envelope]]) -> None:
        """End a read ahead that will not be handled; what it took goes back to the transport.

        A failure (of the read, or of giving one back) goes to the error hook; what
        could not be given back stays pending in the broker, delivered again later.
        """
        reading.cancel()
        await asyncio.wait([reading])
        if reading.cancelled():
            return
        error = reading.exception()
        if error is not None:
            self._report(error, None)
            return
        for envelope in reading.result():
            try:
                await asyncio.shield(self.transport.retry(envelope, asyncio.CancelledError()))
            except Exception as exc:
                self._report(exc, envelope)

    def _start(self, envelope: Envelope) -> None:
        rest = start_in(contextvars.copy_context(), self._process(envelope))
        if rest is None:
            return  # handled without waiting
        task = asyncio.ensure_future(rest)
        self._in_flight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if self.concurrency - len(self._in_flight) >= self._refill:
            self._slot_freed.set()  # the reader waits for half the slots, not each one

    async def stop(self, drain_timeout: float | None = None) -> int:
        """Stop reading, let handlings in flight finish (at most `drain_timeout` s),
        cancel the rest, which go back to the transport, and send the acks.
        Returns how many were given back."""
        self._stopping.set()
        if self._receiving is not None:
            self._receiving.cancel()
        await self._batch_started.wait()  # a batch in hand is started, then counted below
        cancelled: set[asyncio.Task[None]] = set()
        if self._in_flight:
            _, cancelled = await asyncio.wait(set(self._in_flight), timeout=drain_timeout)
            for task in cancelled:
                task.cancel()
            if cancelled:
                await asyncio.wait(cancelled)
        await self.transport.flush()
        return len(cancelled)

    async def _process(self, envelope: Envelope) -> None:
        # Runs in a context of its own (see _start): setting current_envelope needs no reset.
        try:
            try:
                message = self.codec.decode(envelope.name, envelope.body)
            except DecodeError as exc:
                await self.transport.dead_letter(envelope, str(exc))
                self.dead_lettered += 1  # counted once written, so a reader of it finds the letter
                self._report(exc, envelope)
                return
            current_envelope.set(envelope)
            try:
                await self._handlers[envelope.kind](message)
            except asyncio.CancelledError:
                # Stopped mid-handling: not handled, so not acked; give it back.
                await asyncio.shield(self.transport.retry(envelope, asyncio.CancelledError()))
                raise
            except Exception as exc:
                await self._failed(envelope, message, exc)
            else:
                self.handled += 1
                await self.transport.ack(envelope)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an ack, retry or dead-letter the broker refused
            # Not acked: the transport delivers it again (a broker reclaims it).
            self._report(exc, envelope)

    async def _failed(self, envelope: Envelope, message: object, exc: Exception) -> None:
        self.failed += 1
        exc.add_note(f"delivery {envelope.attempt} of {envelope.name} (message id {envelope.message_id})")
        self._report(exc, message)
        if envelope.attempt >= self.max_deliveries:
            reason = "".join(traceback.format_exception(exc))
            await self.transport.dead_letter(envelope, f"failed {envelope.attempt} times; last: {reason}")
            self.dead_lettered += 1
        else:
            await self.transport.retry(envelope, exc)
