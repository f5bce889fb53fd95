"""Stateful property tests: random interleavings of everything a user can do to a dispatcher.

Hypothesis drives a dispatcher (and, in the second machine, workers consuming
from the in-memory transport) through random sequences of start, execute,
publish, send with and without ordering keys, handlers that fail, cancel their
own task, raise CancelledError or block, overrides, join, stop with and without
a timeout, and the cancellation of any operation still running. After every
step it checks the invariants; at the end it stops everything and checks that
nothing is left.

Invariants:
- every message accepted is handled, failed or unhandled, exactly once
  (sent = handled + failed + unhandled + queued + in flight, per kind);
- messages with the same ordering key start in send order, one at a time;
- nothing is accepted once the dispatcher is stopped;
- the Singleton is made at most once and torn down exactly once, at stop;
- no task is left pending when the loop closes;
- through a transport: nothing is lost (each message ends acked or
  dead-lettered), a message that never failed is never dead-lettered, and a
  message is handled at most `max_deliveries` times.

The budget is fixed (`PYBUS_STATEFUL_EXAMPLES`, default 200 examples per machine),
and a failure prints the seed to rerun it with (`PYBUS_HYPOTHESIS_SEED`).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections import defaultdict
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    get_state_machine_test,
    initialize,
    invariant,
    precondition,
    rule,
)

from pybus import Dispatcher, DispatcherClosed, DispatcherNotStarted, Singleton, State
from pybus.consumer import current_envelope
from pybus.transport import InMemoryBroker, InMemoryTransport
from tests.cancelling import cancel_own_task

EXAMPLES = int(os.environ.get("PYBUS_STATEFUL_EXAMPLES", "200"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=50,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

BEHAVIOURS = (
    "ok",
    "fail",
    "cancel-self",
    "cancel-and-return",
    "raise-cancelled",
    "slow",
    "block",
    "send-more",
)
#: Behaviours whose handling fails; the others must never be reported as failed.
FAILING = ("fail", "cancel-self", "cancel-and-return", "raise-cancelled")


@dataclass(frozen=True)
class Job:
    seq: int
    behaviour: str
    key: str | None = None


@dataclass(frozen=True)
class Tick:
    seq: int
    behaviour: str


class Boom(Exception):
    pass


def run_machine(machine: type[RuleBasedStateMachine]) -> None:
    """Run `machine` with the fixed budget; a failure says which seed reproduces it."""
    chosen = os.environ.get("PYBUS_HYPOTHESIS_SEED")
    value = int(chosen) if chosen else random.randrange(2**32)
    test = get_state_machine_test(machine, settings=SETTINGS)
    try:
        hypothesis_seed(value)(test)()
    except BaseException as exc:
        exc.add_note(f"hypothesis seed {value}: rerun with PYBUS_HYPOTHESIS_SEED={value}")
        raise


class Resource:
    pass


class LoopMachine(RuleBasedStateMachine):
    """A machine that owns an event loop and runs it a few turns at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()

    def advance(self, turns: int) -> None:
        async def turn() -> None:
            for _ in range(turns):
                await asyncio.sleep(0)

        self.loop.run_until_complete(turn())

    @rule(turns=st.integers(1, 10))
    def run_the_loop(self, turns: int) -> None:
        self.advance(turns)


class DispatcherMachine(LoopMachine):
    """One dispatcher, driven from a loop this machine owns, step by step."""

    def __init__(self) -> None:
        super().__init__()
        self.made = 0
        self.torn_down = 0
        self.gate = asyncio.Event()
        self.seq = 0
        self.accepted: dict[str, int] = defaultdict(int)  # per kind, sends that returned
        self.inner_sends = 0  # events sent by handlers (accepted)
        self.keyed: dict[str, list[int]] = defaultdict(list)  # key -> seqs in send order
        self.started_by_key: dict[str, list[int]] = defaultdict(list)
        self.running_by_key: dict[str, int] = defaultdict(int)
        self.sends_after_stop = 0
        self.tasks: list[asyncio.Task[Any]] = []
        self.overrides: list[Any] = []
        self.wrongly_failed: list[tuple[object, BaseException]] = []
        self.dp = self._build()

    def _build(self) -> Dispatcher:
        machine = self

        def make_resource() -> Iterator[Resource]:
            machine.made += 1
            yield Resource()
            machine.torn_down += 1

        resource = Singleton(make_resource)
        self.resource = resource
        dp = Dispatcher(workers=2, queue_size=2, on_error=self.report)

        @dp.commands.register(Job, resource=resource)
        async def job(cmd: Job, resource: Resource) -> None:
            key = cmd.key
            if key is not None:
                machine.started_by_key[key].append(cmd.seq)
                machine.running_by_key[key] += 1
                assert machine.running_by_key[key] == 1, f"two messages of key {key} at once"
            try:
                await machine.behave(cmd.behaviour)
            finally:
                if key is not None:
                    machine.running_by_key[key] -= 1

        @dp.events.register(Tick)
        async def tick(event: Tick) -> None:
            await machine.behave(event.behaviour)

        @dp.events.register(Tick)
        def tick_too(event: Tick) -> None:
            pass

        return dp

    def report(self, error: BaseException, message: object) -> None:
        if getattr(message, "behaviour", "?") not in FAILING:
            self.wrongly_failed.append((message, error))

    async def behave(self, behaviour: str) -> None:
        if behaviour == "fail":
            raise Boom
        if behaviour == "cancel-self":
            cancel_own_task()
            await asyncio.sleep(0)
        elif behaviour == "cancel-and-return":
            cancel_own_task()  # asked for, and never awaited here: it must not reach the next handling
        elif behaviour == "raise-cancelled":
            raise asyncio.CancelledError
        elif behaviour == "slow":
            for _ in range(3):
                await asyncio.sleep(0)
        elif behaviour == "block":
            await self.gate.wait()
        elif behaviour == "send-more":
            try:
                await self.dp.events.send(Tick(-1, "ok"))
            except DispatcherClosed:
                pass
            else:
                self.inner_sends += 1

    # -- driving the loop ----------------------------------------------------------------

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = self.loop.create_task(coroutine)
        self.tasks.append(task)
        return task

    # -- rules ---------------------------------------------------------------------------

    @initialize(started=st.sampled_from([True, True, True, True, False]))
    def begin(self, started: bool) -> None:
        if started:
            self.dp.start()

    @rule()
    def start(self) -> None:
        if self.dp.state is State.NEW:
            self.dp.start()

    @rule(
        behaviours=st.lists(st.sampled_from(BEHAVIOURS), min_size=1, max_size=4),
        key=st.sampled_from([None, "a", "b"]),
    )
    def send(self, behaviours: list[str], key: str | None) -> None:
        for behaviour in behaviours:
            self.send_one(behaviour, key)
        self.advance(1)

    def send_one(self, behaviour: str, key: str | None) -> None:
        self.seq += 1
        job = Job(self.seq, behaviour, key)
        stopped_before = self.dp.state is State.STOPPED

        async def send() -> None:
            try:
                await self.dp.commands.send(job, key=key)
            except (DispatcherClosed, DispatcherNotStarted, asyncio.CancelledError):
                return
            self.accepted["command"] += 1
            if stopped_before:
                self.sends_after_stop += 1
            if key is not None:
                self.keyed[key].append(job.seq)

        self.spawn(send())

    @rule(behaviour=st.sampled_from(BEHAVIOURS))
    def send_event(self, behaviour: str) -> None:
        self.seq += 1

        async def send() -> None:
            try:
                await self.dp.events.send(Tick(self.seq, behaviour))
            except (DispatcherClosed, DispatcherNotStarted, asyncio.CancelledError):
                return
            self.accepted["event"] += 1

        self.spawn(send())
        self.advance(1)

    @rule(behaviour=st.sampled_from(BEHAVIOURS), publish=st.booleans())
    def call_inline(self, behaviour: str, publish: bool) -> None:
        self.seq += 1

        async def call() -> None:
            try:
                if publish:
                    await self.dp.publish(Tick(self.seq, behaviour))
                else:
                    await self.dp.execute(Job(self.seq, behaviour))
            except (Exception, asyncio.CancelledError):
                pass  # inline outcomes reach the caller; only the background is counted

        self.spawn(call())
        self.advance(2)

    @rule()
    def release_blocked(self) -> None:
        self.gate.set()
        self.advance(2)
        self.gate = asyncio.Event()

    @rule(index=st.integers(0, 50))
    def cancel_an_operation(self, index: int) -> None:
        pending = [task for task in self.tasks if not task.done()]
        if pending:
            pending[index % len(pending)].cancel()
            self.advance(1)

    @rule(enter=st.booleans())
    def override(self, enter: bool) -> None:
        if enter:
            block = self.dp.override(self.resource, Resource())
            block.__enter__()
            self.overrides.append(block)
        elif self.overrides:
            self.overrides.pop().__exit__(None, None, None)

    @precondition(lambda self: self.dp.state is not State.NEW)
    @rule()
    def join(self) -> None:
        self.gate.set()  # blocked handlings would make a join wait for ever

        async def join() -> None:
            await asyncio.wait_for(self.dp.join(), 10)

        self.loop.run_until_complete(join())
        self.gate = asyncio.Event()

    @precondition(lambda self: self.seq >= 10)  # let some work happen first
    @rule(timeout=st.sampled_from([None, 0]))  # no wall-clock timing: a seed replays the same run
    def stop(self, timeout: float | None) -> None:
        self.spawn(self.dp.stop(timeout))
        self.advance(2)

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def every_accepted_message_is_accounted_for(self) -> None:
        stats = self.dp.statistics()
        for kind, counts in (("command", stats.commands), ("event", stats.events)):
            expected = self.accepted[kind] + (self.inner_sends if kind == "event" else 0)
            total = counts.handled + counts.failed + counts.unhandled + counts.queued + counts.in_flight
            assert total == expected, (kind, counts, expected)

    @invariant()
    def keyed_messages_start_in_send_order(self) -> None:
        for key, started in self.started_by_key.items():
            assert started == sorted(started), (key, started)
            assert set(started) <= set(self.keyed[key])

    @invariant()
    def only_failing_handlers_fail(self) -> None:
        assert self.wrongly_failed == []

    @invariant()
    def nothing_is_accepted_after_stop(self) -> None:
        assert self.sends_after_stop == 0

    @invariant()
    def the_singleton_is_made_once_at_most(self) -> None:
        assert self.made <= 1
        assert self.torn_down <= self.made

    def teardown(self) -> None:
        try:
            while self.overrides:
                self.overrides.pop().__exit__(None, None, None)
            self.gate.set()

            async def finish() -> int:
                return await asyncio.wait_for(self.dp.stop(timeout=0), 10)

            self.loop.run_until_complete(finish())
            for task in self.tasks:
                task.cancel()
            self.loop.run_until_complete(asyncio.wait(self.tasks) if self.tasks else asyncio.sleep(0))
            self.every_accepted_message_is_accounted_for()
            stats = self.dp.statistics()
            for counts in (stats.commands, stats.events):
                assert (counts.queued, counts.in_flight) == (0, 0)
            assert self.torn_down == self.made  # torn down exactly once
            left = [task for task in asyncio.all_tasks(self.loop) if not task.done()]
            assert left == [], left
        finally:
            self.loop.close()


def test_a_dispatcher_keeps_its_invariants_under_any_interleaving() -> None:
    run_machine(DispatcherMachine)


# -- through the in-memory transport ------------------------------------------------------


class TransportMachine(LoopMachine):
    """A producer and restartable workers sharing an in-memory broker."""

    MAX_DELIVERIES = 3

    def __init__(self) -> None:
        super().__init__()
        self.broker = InMemoryBroker()
        self.gate = asyncio.Event()
        self.seq = 0
        self.behaviours: dict[int, str] = {}
        self.handlings: dict[int, int] = defaultdict(int)
        self.attempts: dict[int, list[int]] = defaultdict(list)
        self.succeeded: set[int] = set()
        self.producer = Dispatcher(transport=InMemoryTransport(self.broker))
        self.producer.route(Job, kind="command")
        self.producer.start()
        self.worker: Dispatcher | None = None
        self.serving: asyncio.Task[Any] | None = None
        self.tasks: list[asyncio.Task[Any]] = []

    def build_worker(self) -> Dispatcher:
        machine = self
        dp = Dispatcher(transport=InMemoryTransport(self.broker), on_error=lambda error, message: None)
        dp.route(Job)

        @dp.commands.register(Job)
        async def job(cmd: Job) -> None:
            machine.handlings[cmd.seq] += 1
            envelope = current_envelope.get()
            assert envelope is not None
            machine.attempts[cmd.seq].append(envelope.attempt)
            if cmd.behaviour == "fail":
                raise Boom
            if cmd.behaviour == "cancel-self":
                cancel_own_task()
                await asyncio.sleep(0)
            if cmd.behaviour == "block":
                await machine.gate.wait()
            machine.succeeded.add(cmd.seq)

        return dp

    @rule(behaviour=st.sampled_from(("ok", "ok", "fail", "cancel-self", "block")))
    def send(self, behaviour: str) -> None:
        self.seq += 1
        self.behaviours[self.seq] = behaviour
        self.loop.run_until_complete(self.producer.send(Job(self.seq, behaviour)))

    @precondition(lambda self: self.serving is None)
    @rule(concurrency=st.integers(1, 3))
    def start_worker(self, concurrency: int) -> None:
        self.worker = self.build_worker()
        self.serving = self.loop.create_task(
            self.worker.serve(
                stop_signals=(),
                concurrency=concurrency,
                max_deliveries=self.MAX_DELIVERIES,
                wait=0.001,
                drain_timeout=0.01,
            )
        )
        self.advance(3)

    @precondition(lambda self: self.serving is not None)
    @rule(how=st.sampled_from(("stop", "stop-now", "cancel")))
    def stop_worker(self, how: str) -> None:
        assert self.worker is not None
        assert self.serving is not None
        if how == "cancel":
            self.serving.cancel()
        else:
            self.tasks.append(self.loop.create_task(self.worker.stop(0 if how == "stop-now" else 0.01)))
        self.loop.run_until_complete(asyncio.wait([self.serving], timeout=5))
        assert self.serving.done(), "serve() did not return"
        self.worker, self.serving = None, None

    @rule()
    def release_blocked(self) -> None:
        self.gate.set()
        self.advance(3)
        self.gate = asyncio.Event()

    @invariant()
    def a_message_is_handled_at_most_max_deliveries_times_unless_released(self) -> None:
        for seq, count in self.handlings.items():
            if self.behaviours[seq] in ("fail", "cancel-self"):
                assert count <= self.MAX_DELIVERIES, (seq, count)

    @invariant()
    def giving_back_at_a_stop_is_not_a_delivery_attempt(self) -> None:
        for seq, attempts in self.attempts.items():
            if self.behaviours[seq] in ("ok", "block"):
                assert set(attempts) == {1}, (seq, attempts)
            else:
                assert attempts == sorted(attempts), (seq, attempts)

    @invariant()
    def a_message_that_never_failed_is_never_dead_lettered(self) -> None:
        for letter in self.broker.dead_letters:
            body = letter.envelope.body
            assert b'"fail"' in body or b'"cancel-self"' in body, letter

    def teardown(self) -> None:
        try:
            if self.serving is not None:
                self.serving.cancel()
                self.loop.run_until_complete(asyncio.wait([self.serving]))
            # A last worker with nothing blocking drains whatever is left in the broker.
            self.gate.set()
            worker = self.build_worker()
            serving = self.loop.create_task(
                worker.serve(stop_signals=(), max_deliveries=self.MAX_DELIVERIES, wait=0.001)
            )

            async def drained() -> None:
                while True:
                    dead = {json.loads(letter.envelope.body)["seq"] for letter in self.broker.dead_letters}
                    if all(seq in self.succeeded or seq in dead for seq in self.behaviours):
                        return
                    await asyncio.sleep(0.001)

            self.loop.run_until_complete(asyncio.wait_for(drained(), 10))
            self.loop.run_until_complete(worker.stop())
            self.loop.run_until_complete(serving)
            self.loop.run_until_complete(self.producer.stop())
            if self.tasks:
                self.loop.run_until_complete(asyncio.wait(self.tasks))
            for seq, behaviour in self.behaviours.items():
                if behaviour in ("ok", "block"):
                    assert seq in self.succeeded, (seq, behaviour)  # nothing lost
            for group in self.broker.groups.values():
                assert group.pending == {}
            left = [task for task in asyncio.all_tasks(self.loop) if not task.done()]
            assert left == [], left
        finally:
            self.loop.close()


def test_workers_on_a_transport_keep_their_invariants_under_any_interleaving() -> None:
    run_machine(TransportMachine)
