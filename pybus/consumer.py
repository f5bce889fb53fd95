"""Consuming routed messages: receive, decode, handle, then ack, retry or dead-letter.

A `Consumer` reads the routed messages this process has handlers for and
handles each exactly as `publish`/`execute` would, follow-ups included. It
acks an envelope only when that handling succeeded, routed follow-ups having
been written to the transport by then. A failed handling goes back to the
transport (`retry`) and comes again with a higher `attempt`, until
`max_deliveries`, after which it is dead-lettered with the error and its
traceback. An envelope that cannot be decoded is dead-lettered at once: it
never stops the consumer and never blocks the messages behind it.

One task reads; `concurrency` lanes (see `pybus.lanes`) handle, each envelope
from its first step to its last in the lane that took it, so a handler's
`asyncio.timeout()` or `cancel()` acts on its own handling, never on the reader.
"""

from __future__ import annotations

import asyncio
import contextvars
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from pybus.cleanup import CleanupTask
from pybus.context import current_delivery
from pybus.errors import (
    DecodeError,
    ImproperlyConfigured,
    Kind,
    TransportError,
    WouldDeadlock,
    drain_seconds,
    each_failure,
    whole_number,
)
from pybus.handlers import positive_seconds
from pybus.lanes import LaneTask, current_lane, running_in, start_in
from pybus.transport import Envelope, Transport
from pybus.workers import Supervisor, wake_first

#: The envelope being handled in this context (`pybus.context.current_delivery`, under
#: the name the transports use): routed sends made while handling it carry its
#: correlation id, and its message id as their causation id.
current_envelope = current_delivery

#: How a message of each kind is handled: the engines' deliver methods, given the
#: message and the envelope it came in.
Handlers = Mapping[Kind, Callable[[Any, Envelope], Awaitable[object]]]


def check_sizes(concurrency: object, prefetch: object, max_deliveries: object, wait: object) -> None:
    """Raise `ImproperlyConfigured` for consumer sizes that cannot work."""
    whole_number("concurrency", concurrency, 1)
    whole_number("prefetch", prefetch, 1)
    if not positive_seconds(wait):
        raise ImproperlyConfigured(f"wait must be a number of seconds > 0, not {wait!r}")
    whole_number("max_deliveries", max_deliveries, 1)


class Consumer:
    """Reads `names` from `transport` and handles up to `concurrency` envelopes at a time.

    Besides those in flight it holds up to `prefetch` envelopes read ahead, so that
    a lane that finishes finds the next one in hand: it holds at most `concurrency
    + prefetch` (received and not yet finished), reads at most `prefetch` at once,
    and reads again as soon as half of `prefetch` is free, so that reading and
    handling overlap.
    Counters: `handled`, `failed` (handlings that raised; the envelope was
    retried or dead-lettered), `dead_lettered` (after `max_deliveries`, or not
    decodable), `released` (given back unhandled when the consumer stopped) and
    `unreleased` (not handled, and the transport refused to take them back: they
    stay pending in the broker, which delivers them again later).

    Made by `dp.consumer()` (which `dp.serve()` and `pybus worker` call), which
    passes the first five arguments; an application chooses the last four.

    Args:
        transport: Where the envelopes come from, and where their outcomes go.
        codec: Decodes an envelope's body into its message (`pybus.codec`).
        handlers: How a message of each kind is handled: the engines' deliver methods.
        names: The routed names to read.
        supervisor: The dispatcher's supervisor: its error hook hears every failure.
        concurrency: Messages handled at a time (>= 1).
        prefetch: Messages held besides those being handled, read ahead (>= 1).
        max_deliveries: Failed deliveries after which a message is dead-lettered (>= 1).
        wait: Seconds a read waits when there is nothing to read (> 0); a new message ends it at once.
    """

    def __init__(
        self,
        transport: Transport,
        codec: Any,
        handlers: Handlers,
        names: Sequence[str],
        *,
        supervisor: Supervisor,
        concurrency: int = 4,
        prefetch: int = 100,
        max_deliveries: int = 5,
        wait: float = 1.0,
    ) -> None:
        self.transport = transport
        self.codec = codec
        self.names = list(names)
        self._handlers = handlers
        #: The dispatcher's supervisor: its error hook, and what `running_in` leads to.
        self.supervisor = supervisor
        check_sizes(concurrency, prefetch, max_deliveries, wait)
        self.concurrency = concurrency
        self.prefetch = prefetch
        self.max_deliveries = max_deliveries
        self.wait = float(wait)
        self.pause_after_error = 0.5
        self._capacity = concurrency + prefetch  # envelopes held at most: in flight and read ahead
        self._refill = max(1, prefetch // 2)
        self._ready: deque[Envelope] = deque()
        self._idle_lanes: deque[asyncio.Future[None]] = deque()
        self._lanes: set[LaneTask] = set()
        self._held = 0  # received and not finished: ready or in flight
        self._busy = 0  # in flight
        self._reader_wakeup: asyncio.Future[None] | None = None
        self._all_done: asyncio.Future[None] | None = None
        self._receiving: asyncio.Task[list[Envelope]] | None = None
        self._context = contextvars.Context()
        # new -> running -> stopping -> stopped (new -> stopped when stopped before it ran)
        self._state = "new"
        self._stop_requested = False
        self._deadline: float | None = None
        self._drain: asyncio.Timeout | None = None
        self._finished: asyncio.Future[int] | None = None
        self.handled = 0
        self.failed = 0
        self.dead_lettered = 0
        self.released = 0
        self.unreleased = 0  # not handled, and the transport refused them back: still pending there
        self._ending: asyncio.Task[None] | None = None  # a strong reference: the loop holds tasks weakly

    # -- running -------------------------------------------------------------------

    async def run(self) -> None:
        """Receive and handle until `stop()`, then finish: returns once every envelope
        received has been acked, retried, dead-lettered or given back.

        Cancelling the task that runs it stops the consumer at once: handlings in
        flight are cancelled and their envelopes given back.
        """
        if self._state != "new":
            if self._state == "stopped":
                return
            raise ImproperlyConfigured("This consumer is already running; a consumer runs once")
        loop = self.supervisor.bind("consume from the transport")
        self._state = "running"
        self._finished = loop.create_future()
        self._context = contextvars.copy_context()
        # running_in is this consumer in every handling's context (a copy of this one): they
        # are inside the dispatcher (its supervisor), and consumer.stop() can tell its own.
        self._context.run(running_in.set, self)
        try:
            if self.names:
                self._add_lanes(loop)
                await self._read(loop)
            else:  # no routed message has a handler here: nothing to read
                while not self._stop_requested:
                    await self._sleep(loop, None)
            await self._drain_in_flight(loop)
        finally:
            # The ending runs in a task of its own: cancelling run() again while it ends
            # interrupts only run()'s wait for it, never the giving back.
            ending = self._ending = CleanupTask(self._end(), loop=loop, name="pybus-consumer-end")
            await asyncio.wait([ending])

    def _add_lanes(self, loop: asyncio.AbstractEventLoop) -> None:
        for number in range(len(self._lanes), self.concurrency):
            lane = LaneTask(self._lane(), loop=loop, name=f"pybus-consumer-{number}")
            self._lanes.add(lane)
            lane.add_done_callback(self._lanes.discard)

    async def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        reader = asyncio.current_task()
        while not self._stop_requested:
            receiving = self._receiving
            if receiving is None:
                if self._capacity - self._held < self._refill:
                    await self._sleep(loop, None)  # woken when half the read-ahead is free, or by stop()
                    continue
                receiving = self._read_ahead(loop)
            try:
                envelopes = await receiving
            except asyncio.CancelledError:
                if reader is not None and reader.cancelling():
                    raise  # run() itself is cancelled: _end() waits for the read
                self._receiving = None
                if self._stop_requested:
                    return  # stop() interrupted a blocking read: what it had taken stays pending
                error: BaseException = TransportError(
                    f"A read from the transport was cancelled by {type(self.transport).__name__} itself"
                )
                await self._report(error, None)
                await self._sleep(loop, self.pause_after_error)
                continue
            except Exception as exc:  # the broker is away: report, wait a little, read again
                self._receiving = None
                await self._report(exc, None)
                await self._sleep(loop, self.pause_after_error)
                continue
            self._receiving = None
            if self._stop_requested:  # received as stop() came: never started
                await asyncio.gather(*(self._give_back(envelope) for envelope in envelopes))
                return
            self._held += len(envelopes)
            self._ready.extend(envelopes)
            if envelopes and self._capacity - self._held >= self._refill:
                # Room for another batch: its read is scheduled before any lane runs, so
                # the broker works on it while this batch is handled.
                self._read_ahead(loop)
            if len(self._lanes) < self.concurrency:
                self._add_lanes(loop)  # some ended, cancelled from outside
            if self._idle_lanes:
                # One lane is woken; a lane whose handling waits wakes the next (see _lane):
                # handlings that never wait are done by one lane, back to back, and those
                # that wait spread over as many lanes as they need.
                wake_first(self._idle_lanes)

    def _read_ahead(self, loop: asyncio.AbstractEventLoop) -> asyncio.Task[list[Envelope]]:
        count = min(self._capacity - self._held, self.prefetch)
        receiving = loop.create_task(self.transport.receive(self.names, max_count=count, wait=self.wait))
        self._receiving = receiving
        return receiving

    async def _sleep(self, loop: asyncio.AbstractEventLoop, seconds: float | None) -> None:
        """Wait until woken (room, or stop()) or `seconds` passed."""
        wakeup = self._reader_wakeup = loop.create_future()
        try:
            if seconds is None:
                await wakeup
            else:
                await asyncio.wait([wakeup], timeout=seconds)
        finally:
            self._reader_wakeup = None

    def _wake_reader(self) -> None:
        if self._reader_wakeup is not None and not self._reader_wakeup.done():
            self._reader_wakeup.set_result(None)

    async def _lane(self) -> None:
        lane = current_lane()
        assert lane is not None  # started as a LaneTask by run()
        ready = self._ready
        loop = lane.get_loop()
        in_a_row = 0  # handlings done without the lane yielding to the loop
        while True:
            while not ready:
                if self._stop_requested:
                    return
                waiter = loop.create_future()
                self._idle_lanes.append(waiter)
                in_a_row = 0
                await waiter  # a cancellation here ends the lane: nothing is in hand
            if in_a_row >= 16:
                # Handlings that never wait would keep the loop to themselves: let it deliver
                # the read ahead's reply (and run other tasks) now and then.
                in_a_row = 0
                await asyncio.sleep(0)
                continue
            if self._stop_requested:
                return  # what is still ready was never started: run() gives it back
            envelope = ready.popleft()
            self._busy += 1
            try:
                rest = start_in(self._context.copy(), self._process(envelope, lane))
                if rest is None:
                    in_a_row += 1
                else:
                    in_a_row = 0
                    if ready and self._idle_lanes:
                        wake_first(self._idle_lanes)  # this one waits: another lane takes the next
                    await rest
            finally:
                self._busy -= 1
                self._held -= 1
                if self._reader_wakeup is not None and self._capacity - self._held >= self._refill:
                    self._wake_reader()  # the reader waits for half the read-ahead, not each slot
                if not self._busy and self._all_done is not None and not self._all_done.done():
                    self._all_done.set_result(None)
            if lane.dirty and not await lane.settle():
                return

    async def _process(self, envelope: Envelope, lane: LaneTask) -> None:
        # Runs in `lane`, in a context of its own (a copy per envelope): nothing set here
        # needs a reset.
        current_envelope.set(envelope)
        try:
            try:
                message = self.codec.decode(envelope.name, envelope.body)
            except DecodeError as exc:
                await self.transport.dead_letter(envelope, str(exc))
                self.dead_lettered += 1  # counted once written, so a reader of it finds the letter
                await self._report(exc, envelope)
                return
            error: BaseException | None = None
            try:
                await self._handlers[envelope.kind](message, envelope)
            except asyncio.CancelledError as exc:
                if self._state == "stopping" or lane.cancelled_from_outside():
                    await self._give_back(envelope)  # stopped mid-handling: not a failed delivery
                    raise
                error = exc  # the handling cancelled itself
            except Exception as exc:
                error = exc
            # A cancellation asked for during the handling must not interrupt its ack,
            # retry or dead letter: let it arrive first. One from outside ends the lane,
            # once the outcome is recorded.
            alive = not lane.dirty or await lane.settle()
            if error is None:
                self.handled += 1
                await self.transport.ack(envelope)
            elif not await self._failed(envelope, message, error, lane):
                alive = False
            if not alive:
                raise asyncio.CancelledError
        except Exception as exc:  # an ack, retry or dead-letter the broker refused
            # Not acked: the transport delivers it again (a broker reclaims it).
            await self._report(exc, envelope)

    async def _failed(self, envelope: Envelope, message: object, exc: BaseException, lane: LaneTask) -> bool:
        """Retry or dead-letter `envelope`, then report each failure; False when a
        cancellation from outside arrived meanwhile (the lane ends)."""
        # The broker learns the outcome first: what the error hook does cannot delay or
        # interrupt it.
        self.failed += 1
        alive = True
        failures = each_failure(exc, message)  # each failing handler's own exception
        delivery = f"delivery {envelope.attempt} of {envelope.name} (message id {envelope.message_id})"
        for failure in failures:
            failure.add_note(delivery)
        try:
            if envelope.attempt >= self.max_deliveries:
                reason = f"failed {envelope.attempt} times; last error: {type(exc).__name__}: {exc}\n"
                await self.transport.dead_letter(envelope, reason + "".join(traceback.format_exception(exc)))
                self.dead_lettered += 1
            else:
                await self.transport.retry(envelope, exc)
        finally:
            for failure in failures:
                await self._report(failure, message)
                # The hook's own cancel() must not reach its next call.
                alive = (not lane.dirty or await lane.settle()) and alive
        return alive

    async def _give_back(self, envelope: Envelope) -> None:
        """Release an envelope that was not handled; if the transport refuses, it stays
        pending in the broker and comes again later (the failure goes to the error hook)."""
        try:
            await self.transport.release(envelope)
        except Exception as exc:
            self.unreleased += 1
            await self._report(exc, envelope)
        else:
            self.released += 1

    async def _flush(self) -> None:
        try:
            await self.transport.flush()
        except Exception as exc:
            await self._report(exc, None)

    async def _report(self, error: BaseException, message: object) -> None:
        await self.supervisor.report(error, message, contextvars.copy_context())

    # -- stopping -------------------------------------------------------------------

    def begin_stop(self, deadline: float | None) -> None:
        """Stop reading now; let handlings in flight finish until `deadline` (loop time,
        None: no limit), then cancel them. A later call may only bring the deadline closer."""
        if not self._stop_requested:
            self._stop_requested = True
            self._deadline = deadline
            if self._receiving is not None:
                self._receiving.cancel()
            self._wake_reader()
            for waiter in self._idle_lanes:
                if not waiter.done():
                    waiter.set_result(None)
            if self._state == "new":
                self._state = "stopped"
        elif deadline is not None and (self._deadline is None or deadline < self._deadline):
            self._deadline = deadline
            if self._drain is not None:
                self._drain.reschedule(deadline)

    async def stopped(self) -> int:
        """Wait until the consumer has ended; return how many envelopes it held and did
        not handle (given back, or refused by the transport and left pending there)."""
        if self._finished is None:
            return self.released + self.unreleased
        return await asyncio.shield(self._finished)

    async def stop(self, drain_timeout: float | None = None) -> int:
        """Stop reading, let handlings in flight finish (at most `drain_timeout` s),
        cancel the rest, which go back to the transport, and send the acks.

        Returns how many envelopes it held and did not handle: given back, or (if
        the transport refused) left pending in the broker. Calling it again, or
        while it runs, waits for the same stop (a shorter `drain_timeout` shortens
        it); cancelling the call does not interrupt the stop.
        """
        seconds = drain_seconds("drain_timeout", drain_timeout)
        if running_in.get() is self:  # a handling of this consumer, or a task it started
            raise WouldDeadlock("consumer.stop()")
        deadline = None
        if seconds is not None:
            deadline = asyncio.get_running_loop().time() + seconds
        self.begin_stop(deadline)
        return await self.stopped()

    async def _drain_in_flight(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._busy:
            return
        try:
            async with asyncio.timeout_at(self._deadline) as drain:
                self._drain = drain
                while self._busy:
                    self._all_done = loop.create_future()
                    await self._all_done
        except TimeoutError:
            pass
        finally:
            self._drain = None

    async def _end(self) -> None:
        """Whatever ended the reading: cancel what still runs, give back what never
        started, send the buffered acks. `stopped()` returns once it ends, however."""
        self._stop_requested = True
        self._state = "stopping"
        unstarted = list(self._ready)
        self._ready.clear()
        self._held -= len(unstarted)
        lanes = list(self._lanes)
        for lane in lanes:  # at once, before anything is awaited
            lane.cancel()
        receiving, self._receiving = self._receiving, None
        if receiving is not None:  # run() was cancelled in the middle of a read
            receiving.cancel()
        try:
            if receiving is not None:
                await asyncio.wait([receiving])
                if not receiving.cancelled() and receiving.exception() is None:
                    unstarted.extend(receiving.result())
            # All at once: the give-backs of the cancelled handlings (in their lanes), those
            # of the envelopes never started and the last acks. With the broker stalled,
            # the stop waits for the transport's own timeout once, not once per step or
            # per envelope (a broker transport sends the give-backs of a turn together).
            await asyncio.gather(
                *(self._give_back(envelope) for envelope in unstarted),
                asyncio.wait(lanes) if lanes else asyncio.sleep(0),
                self._flush(),
            )
        finally:
            self._state = "stopped"
            if self._finished is not None and not self._finished.done():
                self._finished.set_result(self.released + self.unreleased)
