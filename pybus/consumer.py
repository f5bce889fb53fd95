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
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar

from pybus.codec import DecodeError, JsonCodec
from pybus.errors import Kind
from pybus.transport import Envelope, Transport

#: The envelope being handled in this context: routed sends made while handling
#: it carry its correlation id, and its message id as their causation id.
current_envelope: ContextVar[Envelope | None] = ContextVar("pybus_envelope", default=None)

Handle = Callable[[Kind, object], Awaitable[object]]
Report = Callable[[BaseException, object], None]


class Consumer:
    """Reads `names` from `transport` and handles up to `concurrency` envelopes at a time."""

    def __init__(
        self,
        transport: Transport,
        codec: JsonCodec,
        handle: Handle,
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
        self._handle = handle
        self._report = report
        self.concurrency = concurrency
        self.max_deliveries = max_deliveries
        self.wait = wait
        self.pause_after_error = 0.5
        self._queue: deque[Envelope] = deque()  # read, not started
        self._idle: deque[asyncio.Future[None]] = deque()  # workers waiting for an envelope
        self._workers: list[asyncio.Task[None]] = []
        self._busy = 0
        self._refill = max(1, concurrency // 2)
        self._slot_freed = asyncio.Event()
        self._all_idle = asyncio.Event()
        self._receiving: asyncio.Task[list[Envelope]] | None = None
        self._stopping = asyncio.Event()
        self.handled = 0
        self.failed = 0
        self.dead_lettered = 0

    async def run(self) -> None:
        """Receive and handle until `stop()`; returns once reading has stopped.

        `concurrency` long-lived tasks handle what a reading loop puts in a local
        queue; the loop reads again when half the slots are free (one round trip
        per batch, not per message), so the consumer never holds more than
        `concurrency` messages.
        """
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._work()) for _ in range(self.concurrency)]
        while not self._stopping.is_set():
            free = self.concurrency - len(self._queue) - self._busy
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
            self._queue.extend(envelopes)
            for _ in envelopes:
                self._wake_one()

    def _wake_one(self) -> None:
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _work(self) -> None:
        queue = self._queue
        while True:
            while not queue:
                waiter = asyncio.get_running_loop().create_future()
                self._idle.append(waiter)
                await waiter
            envelope = queue.popleft()
            self._busy += 1
            try:
                await self._process(envelope)
            finally:
                self._busy -= 1
                if self.concurrency - len(queue) - self._busy >= self._refill:
                    self._slot_freed.set()  # the reader waits for half the slots, not each one
                if self._busy == 0 and not queue:
                    self._all_idle.set()

    async def stop(self, drain_timeout: float | None = None) -> int:
        """Stop reading, give back what was read but not started, let handlings in flight
        finish (at most `drain_timeout` s), cancel the rest, which go back to the
        transport too, and send the acks. Returns how many were given back."""
        self._stopping.set()
        if self._receiving is not None:
            self._receiving.cancel()
        given_back = len(self._queue)
        while self._queue:
            await self.transport.retry(self._queue.popleft(), asyncio.CancelledError())
        if self._busy:
            self._all_idle.clear()
            try:
                async with asyncio.timeout(drain_timeout):
                    await self._all_idle.wait()
            except TimeoutError:
                given_back += self._busy
        for worker in self._workers:
            worker.cancel()
        if self._workers:
            await asyncio.wait(self._workers)
        await self.transport.flush()
        return given_back

    async def _process(self, envelope: Envelope) -> None:
        try:
            await self._handle_one(envelope)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an ack, retry or dead-letter the broker refused
            # Not acked: the transport delivers it again (a broker reclaims it).
            self._report(exc, envelope)

    async def _handle_one(self, envelope: Envelope) -> None:
        try:
            message = self.codec.decode(envelope.name, envelope.body)
        except DecodeError as exc:
            self.dead_lettered += 1
            await self.transport.dead_letter(envelope, str(exc))
            self._report(exc, envelope)
            return
        token = current_envelope.set(envelope)
        try:
            await self._handle(envelope.kind, message)
        except asyncio.CancelledError:
            # Stopped mid-handling: not handled, so not acked; give it back.
            await asyncio.shield(self.transport.retry(envelope, asyncio.CancelledError()))
            raise
        except Exception as exc:
            self.failed += 1
            exc.add_note(f"delivery {envelope.attempt} of {envelope.name} (message id {envelope.message_id})")
            self._report(exc, message)
            if envelope.attempt >= self.max_deliveries:
                self.dead_lettered += 1
                reason = "".join(traceback.format_exception(exc))
                await self.transport.dead_letter(envelope, f"failed {envelope.attempt} times; last: {reason}")
            else:
                await self.transport.retry(envelope, exc)
        else:
            self.handled += 1
            await self.transport.ack(envelope)
        finally:
            current_envelope.reset(token)
