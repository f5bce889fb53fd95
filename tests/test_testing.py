"""pybus.testing: tracked sessions wait for everything they caused, and only that."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from pybus import Dispatcher, Event, ImproperlyConfigured, TrackingTimeout
from pybus.testing import TrackedSession, track
from tests.cancelling import cancel_own_task


@dataclass(frozen=True)
class Step(Event):
    name: str


@dataclass(frozen=True)
class Start:
    pass


@dataclass(frozen=True)
class Child(Event):
    n: int


class Boom(Exception):
    pass


def chain_dispatcher(log: list[str]) -> Dispatcher:
    """A -> B -> C through background sends; C takes a second."""
    dp = Dispatcher()

    @dp.events.register(Step)
    async def step(event: Step) -> None:
        if event.name == "C":
            await asyncio.sleep(0.2)
        log.append(event.name)
        if event.name != "C":
            await dp.events.send(Step(chr(ord(event.name) + 1)))

    return dp


async def test_a_chain_of_background_sends_is_waited_for_to_the_end() -> None:
    log: list[str] = []
    async with chain_dispatcher(log) as dp:
        async with track(dp) as session:
            await dp.events.send(Step("A"))
        assert log == ["A", "B", "C"]  # C, 0.2 s later, had finished when the block ended
        assert [e.name for e in session.handled.of_type(Step)] == ["A", "B", "C"]


async def test_a_fan_out_of_100_cascaded_events_completes_exactly_once() -> None:
    rng = random.Random(3)
    handled: list[int] = []
    dp = Dispatcher(workers=8)

    @dp.commands.register(Start)
    async def start(cmd: Start) -> Step:
        return Step("fan out")

    @dp.events.register(Step)
    async def fan_out(event: Step) -> None:
        for n in range(100):
            await dp.events.send(Child(n))

    @dp.events.register(Child)
    async def child(event: Child) -> Child | None:
        await asyncio.sleep(rng.random() / 100)
        handled.append(event.n)
        return None

    async with dp:
        session = await track(dp).execute(Start())
    assert sorted(handled) == list(range(100))
    assert sorted(c.n for c in session.handled.of_type(Child)) == list(range(100))
    assert session.handled.handlers().count("child") == 100
    assert session.handled.single(Step) == Step("fan out")


async def test_a_failing_background_handler_raises_at_exit() -> None:
    dp = Dispatcher(on_error=lambda error, message: None)

    @dp.events.register(Child)
    async def child(event: Child) -> None:
        if event.n == 2:
            raise Boom("child 2 failed")

    async def send_four() -> None:
        async with track(dp):
            for n in range(4):
                await dp.events.send(Child(n))

    async with dp:
        with pytest.raises(ExceptionGroup) as info:
            await send_four()
        assert info.value.message.startswith("1 handler(s) failed during the tracked session")
        assert [str(e) for e in info.value.exceptions] == ["child 2 failed"]


async def test_concurrent_event_handlers_are_recorded() -> None:
    dp = Dispatcher(concurrent_events=True)

    @dp.events.register(Child)
    async def ok(event: Child) -> None:
        return None

    @dp.events.register(Child)
    async def bad(event: Child) -> None:
        raise Boom("bad")

    async with dp:
        async with track(dp, allow_errors=True) as session:
            with pytest.raises(ExceptionGroup):
                await dp.publish(Child(1))
    assert session.handled.handlers() == ["ok"]
    assert session.failed.handlers() == ["bad"]


async def test_allowed_failures_are_recorded() -> None:
    dp = Dispatcher()

    @dp.commands.register(Start)
    async def start(cmd: Start) -> None:
        raise Boom("no")

    async with dp:
        async with track(dp, allow_errors=True) as session:
            with pytest.raises(Boom):
                await dp.execute(Start())
    (record,) = session.failed
    assert (record.kind, record.message, record.handler) == ("command", Start(), "start")
    assert isinstance(record.error, Boom)
    assert session.failed.single(Start) == Start()


async def test_a_timeout_names_what_is_still_outstanding() -> None:
    dp = Dispatcher()
    release = asyncio.Event()

    @dp.events.register(Child)
    async def stuck(event: Child) -> None:
        await release.wait()

    dp.start()
    with pytest.raises(TrackingTimeout) as info:
        async with track(dp, timeout=0.05):
            await dp.events.send(Child(42))
    text = str(info.value)
    # A queued message that started running is one handling, reported as running.
    assert text.startswith("The tracked session's work did not finish within 0.05 s; 1 handling(s)")
    assert "  event Child(n=42) (running)" in text
    assert "(queued)" not in text
    assert "s running event Child" in text  # the activity lines
    assert isinstance(info.value, TimeoutError)
    release.set()
    await dp.stop()


async def test_work_started_before_the_session_is_not_counted() -> None:
    dp = Dispatcher()
    stop_producing = asyncio.Event()

    @dp.events.register(Child)
    async def child(event: Child) -> None:
        await asyncio.sleep(0.001)

    async def producer() -> None:
        n = 0
        while not stop_producing.is_set():
            await dp.events.send(Child(-n))
            n += 1
            await asyncio.sleep(0.002)

    async with dp:
        background = asyncio.create_task(producer())
        await asyncio.sleep(0.01)
        async with track(dp) as session:
            await dp.events.send(Child(1))
            await asyncio.sleep(0.02)  # the producer keeps sending meanwhile
        stop_producing.set()
        await background
    assert [c.n for c in session.handled.of_type(Child)] == [1]


async def run_scenario() -> tuple[int, int, int]:
    dp = Dispatcher()

    @dp.commands.register(Start)
    async def start(cmd: Start) -> Step:
        await dp.events.send(Child(1))
        return Step("started")

    @dp.events.register(Child)
    async def child(event: Child) -> str:
        return "nobody listens to this"

    async with dp:
        session = await track(dp).execute(Start())
    return len(session.handled), len(session.failed), len(session.no_handler)


async def test_the_same_scenario_twice_records_the_same_counts() -> None:
    first = await run_scenario()
    second = await run_scenario()
    assert first == second == (2, 0, 2)  # Step and the string reach no handler


async def test_sessions_do_not_leak_into_each_other() -> None:
    dp = Dispatcher()
    dp.events.bind(Child, lambda event: None)
    async with dp:
        async with track(dp) as one:
            await dp.events.send(Child(1))
        async with track(dp) as two:
            await dp.publish(Child(2))
    assert one.handled.messages == [Child(1)]
    assert two.handled.messages == [Child(2)]


async def test_no_handler_records_and_one_shot_forms() -> None:
    dp = Dispatcher()
    dp.queries.bind("answer", lambda: 42)
    async with dp:
        published = await track(dp).publish(Step("unheard"))
        assert published.no_handler.single(Step) == Step("unheard")
        asked = await track(dp).query("answer")
        assert asked.result == 42
        assert asked.handled[0].result == 42
        sent = await track(dp).send("answer")
        assert sent.handled.messages == ["answer"]


def test_single_and_of_type_explain_a_mismatch() -> None:
    session = TrackedSession(Dispatcher(), 1.0, False)
    with pytest.raises(AssertionError) as info:
        session.handled.single(Step)
    assert (
        str(info.value)
        == "Expected exactly one Step in session.handled, found 0; session.handled holds: nothing"
    )
    assert repr(session.handled) == "<handled: []>"
    assert session.handled[0:] == []


async def test_a_session_needs_a_started_dispatcher_and_runs_once() -> None:
    dp = Dispatcher()
    with pytest.raises(ImproperlyConfigured, match=r"Cannot attach an observer before dp.start\(\)"):
        async with track(dp):
            pass
    async with dp:
        session = track(dp)
        async with session:
            pass
        with pytest.raises(ImproperlyConfigured, match=r"A tracked session runs once"):
            async with session:
                pass


async def test_fast_paths_come_back_after_the_session() -> None:
    dp = Dispatcher()
    dp.commands.bind(Start, lambda cmd: None)
    async with dp:
        engine = dp.commands.engine
        assert engine is not None
        async with track(dp):
            assert engine.observer is not None
        assert engine.observer is None
        assert await dp.execute(Start()) is None


# -- override_handler ---------------------------------------------------------------


async def test_override_handler_stubs_a_command_and_an_event_for_a_block() -> None:
    calls: list[str] = []
    dp = Dispatcher()
    dp.commands.bind(Start, lambda cmd: calls.append("real command"))
    dp.events.bind(Step, lambda event: calls.append("real event"))
    async with dp:
        with dp.override_handler(Start, lambda cmd: calls.append("fake command")) as fake:
            await dp.execute(Start())
            assert fake.kind == "command"

        async def async_fake(cmd: Start) -> None:
            calls.append("async fake command")

        with dp.override_handler(Start, async_fake):
            await dp.execute(Start())
        with dp.override_handler(Step, lambda event, tag: calls.append(f"fake event {tag}"), tag="x"):
            await dp.publish(Step("s"))
        await dp.execute(Start())
        await dp.publish(Step("s"))
    assert calls == ["fake command", "async fake command", "fake event x", "real command", "real event"]


async def test_override_handler_refuses_unknown_keys_and_unstarted_dispatchers() -> None:
    dp = Dispatcher()
    dp.commands.bind(Start, lambda cmd: None)
    with pytest.raises(ImproperlyConfigured, match=r"before dp.start\(\)"), dp.override_handler(Start, print):
        pass
    async with dp:
        with pytest.raises(ImproperlyConfigured) as info, dp.override_handler(Child, print):
            pass
    assert str(info.value) == (
        "Cannot override the handler of Child: nothing is registered for it; override_handler "
        "replaces a registered handler, so register one first"
    )


# -- the pytest plugin ----------------------------------------------------------------


@pytest.fixture
def pybus_dispatcher_factory() -> Callable[[], Dispatcher]:
    def build() -> Dispatcher:
        dp = Dispatcher()
        dp.commands.bind(Start, lambda cmd: Step("from the app"))
        dp.events.bind(Step, lambda event: None)
        return dp

    return build


async def test_the_plugin_fixtures_give_a_started_dispatcher_and_track(
    pybus_dispatcher: Dispatcher, pybus_track: Callable[..., TrackedSession]
) -> None:
    assert pybus_dispatcher.started
    async with pybus_track() as session:
        await pybus_dispatcher.execute(Start())
    assert session.handled.single(Step) == Step("from the app")


def test_the_plugin_is_registered_for_pytest(tmp_path: object) -> None:
    import subprocess
    import sys
    from pathlib import Path

    folder = Path(str(tmp_path))
    (folder / "test_app.py").write_text(
        "from pybus import Dispatcher\n"
        "async def test_fixture(pybus_dispatcher: Dispatcher) -> None:\n"
        "    assert pybus_dispatcher.started\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "asyncio_mode=auto",
            str(folder),
        ],
        capture_output=True,
        text=True,
        cwd=folder,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


async def test_a_background_handler_failing_with_cancelled_error_is_a_recorded_failure() -> None:
    dp = Dispatcher(on_error=lambda error, message: None)

    @dp.events.register(Child)
    async def cancels_itself(event: Child) -> None:
        cancel_own_task()
        await asyncio.sleep(0)

    dp.start()
    async with track(dp, allow_errors=True) as session:
        await dp.events.send(Child(1))
    assert session.failed.single(Child) == Child(1)
    assert isinstance(session.failed[0].error, asyncio.CancelledError)
    with pytest.raises(BaseExceptionGroup):
        async with track(dp):
            await dp.events.send(Child(2))
    await dp.stop()
