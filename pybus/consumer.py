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
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from pybus.codec import DecodeError, JsonCodec
from pybus.errors import Kind
from pybus.transport import Envelope, Transport
from pybus.workers import InContext

#: The envelope being handled in this context: routed sends made while handling
#: it carry its correlation id, and its message id as their causation id.
current_envelope: ContextVar[Envelope | None] = ContextVar("pybus_envelope", default=None)

#: How a message of each kind is handled: the engines' deliver/handle methods.
Handlers = Mapping[Kind, Callable[[Any], Awaitable[object]]]
Report = Callable[[BaseException, object], None]


class Consumer:
    """Reads `names` from `transport` and handles up to `concurrency` envelopes at a time."""

    def __init__(
        self,
        transport: Transport,
        codec: JsonCodec,
        handlers: Handlers,
        names: Sequence[str],
        *,
        report: Report,
        concurrency: int = 4,
        max_deliveries: int = 5,
        wait: float = 1.0,
    ) -> None:
        self.transport = transport
        self.codec = codec
        self.names = list(names)
        self._handlers = handlers
        self._report = report
        self.concurrency = concurrency
        self.max_deliveries = max_deliveries
        self.wait = wait
        self.pause_after_error = 0.5
        self._in_flight: set[asyncio.Task[None]] = set()  # handlings that had to wait
        self._refill = max(1, concurrency // 2)
        self._slot_freed = asyncio.Event()
        self._receiving: asyncio.Task[list[Envelope]] | None = None
        self._stopping = asyncio.Event()
        self.handled = 0
        self.failed = 0
        self.dead_lettered = 0

    async def run(self) -> None:
        """Receive and handle until `stop()`; returns once reading has stopped.

        The reading task starts each message's handling itself, in a context of
        its own; a handling that finishes without waiting (the common case) costs
        no task, one that waits is finished by a task. The loop reads again when
        half the `concurrency` slots are free, so the consumer never holds more
        than `concurrency` messages.
        """
        loop = asyncio.get_running_loop()
        if not self.names:  # no routed message has a handler here: nothing to read
            await self._stopping.wait()
            return
        while not self._stopping.is_set():
            free = self.concurrency - len(self._in_flight)
            if free < self._refill:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            self._receiving = loop.create_task(
                self.transport.receive(self.names, max_count=free, wait=self.wait)
            )
            try:
                envelopes = await self._receiving
            except asyncio.CancelledError:
                if self._stopping.is_set() and not asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    break  # stop() interrupted a blocking read: what it had taken stays pending
                raise
            except Exception as exc:  # the broker is away: report, wait a little, read again
                self._report(exc, None)
                await asyncio.sleep(self.pause_after_error)
                continue
            for envelope in envelopes:
                self._start(envelope)

    def _start(self, envelope: Envelope) -> None:
        context = contextvars.copy_context()
        coroutine = self._process(envelope)
        try:
            step = context.run(coroutine.send, None)
        except StopIteration:
            return  # handled without waiting
        task = asyncio.get_running_loop().create_task(self._finish(coroutine, context, step))
        self._in_flight.add(task)
        task.add_done_callback(self._done)

    async def _finish(
        self, coroutine: Coroutine[Any, Any, None], context: contextvars.Context, step: object
    ) -> None:
        await InContext(coroutine, context, step)

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
                self.dead_lettered += 1
                await self.transport.dead_letter(envelope, str(exc))
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
            self.dead_lettered += 1
            reason = "".join(traceback.format_exception(exc))
            await self.transport.dead_letter(envelope, f"failed {envelope.attempt} times; last: {reason}")
        else:
            await self.transport.retry(envelope, exc)
