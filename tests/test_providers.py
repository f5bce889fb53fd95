"""Singleton and Factory: lazy, per dispatcher, torn down in order, overridable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from pybus import Dispatcher, Factory, HandlerSignatureError, ImproperlyConfigured, Singleton
from pybus.providers import Provider


@dataclass
class Log:
    events: list[str] = field(default_factory=list)
    made: int = 0


@dataclass(frozen=True)
class Work:
    n: int = 0
    fail: bool = False


class Boom(Exception):
    pass


def session_factory(log: Log) -> Factory:
    async def open_session() -> AsyncIterator[str]:
        log.made += 1
        name = f"session-{log.made}"
        log.events.append(f"open {name}")
        try:
            yield name
        finally:
            log.events.append(f"close {name}")

    return Factory(open_session)


async def test_factory_makes_a_value_per_handling_and_tears_it_down_after_each() -> None:
    log, dp = Log(), Dispatcher()

    @dp.commands.register(Work, session=session_factory(log))
    async def work(cmd: Work, session: str) -> str:
        log.events.append(f"use {session}")
        if cmd.fail:
            raise Boom(session)
        return session

    dp.start()
    assert await dp.execute(Work()) == "session-1"
    with pytest.raises(Boom, match="session-2"):
        await dp.execute(Work(fail=True))
    assert await dp.execute(Work()) == "session-3"
    assert log.events == [
        "open session-1", "use session-1", "close session-1",
        "open session-2", "use session-2", "close session-2",
        "open session-3", "use session-3", "close session-3",
    ]  # fmt: skip


async def test_factory_teardown_sees_the_handler_exception() -> None:
    seen: list[BaseException] = []

    def transaction() -> Iterator[str]:
        try:
            yield "tx"
        except Exception as exc:
            seen.append(exc)
            raise

    dp = Dispatcher()

    @dp.commands.register(Work, tx=Factory(transaction))
    def work(cmd: Work, tx: str) -> None:
        raise Boom("rollback")

    dp.start()
    with pytest.raises(Boom):
        await dp.execute(Work())
    assert [str(e) for e in seen] == ["rollback"]


async def test_singleton_is_made_once_under_100_concurrent_handlings_and_torn_down_once() -> None:
    log = Log()

    async def make_pool() -> AsyncIterator[str]:
        log.made += 1
        await asyncio.sleep(0.01)  # every handling arrives while this one is still being made
        yield "pool"
        log.events.append("pool closed")

    dp = Dispatcher()

    @dp.queries.register(Work, pool=Singleton(make_pool))
    async def use(query: Work, pool: str) -> str:
        return f"{pool}-{query.n}"

    async with dp:
        results = await asyncio.gather(*(dp.query(Work(i)) for i in range(100)))
        assert results == [f"pool-{i}" for i in range(100)]
        assert log.made == 1
        assert log.events == []
    assert log.events == ["pool closed"]


async def test_two_dispatchers_do_not_share_a_singleton() -> None:
    made: list[object] = []

    def make_cache() -> object:
        made.append(cache := object())
        return cache

    cache = Singleton(make_cache)
    first, second = Dispatcher(), Dispatcher()
    for dp in (first, second):
        dp.queries.bind(Work, lambda q, cache: cache, cache=cache)
        dp.start()
    one, two = await first.query(Work()), await second.query(Work())
    assert one is not two
    assert await first.query(Work()) is one
    assert made == [one, two]


async def test_nothing_is_resolved_at_registration_or_start() -> None:
    calls: list[str] = []

    def make(name: str) -> Any:
        def provider() -> str:
            calls.append(name)
            return name

        return provider

    dp = Dispatcher()
    dp.queries.bind(
        Work,
        lambda q, a, b: (a, b),
        a=Singleton(make("singleton")),
        b=Factory(make("factory")),
    )
    dp.start()
    assert calls == []
    assert await dp.query(Work()) == ("singleton", "factory")
    assert calls == ["singleton", "factory"]


async def test_async_provider_never_blocks_the_loop() -> None:
    ticks: list[int] = []

    async def slow_connect() -> str:
        await asyncio.sleep(0.1)
        return "connection"

    async def ticker() -> None:
        for i in range(5):
            ticks.append(i)
            await asyncio.sleep(0.005)

    dp = Dispatcher()
    dp.queries.bind(Work, lambda q, conn: conn, conn=Singleton(slow_connect))
    dp.start()
    ticking = asyncio.create_task(ticker())
    assert await dp.query(Work()) == "connection"
    assert ticks == [0, 1, 2, 3, 4]  # the ticker ran while the connection was being made
    await ticking


async def test_provider_values_can_be_providers() -> None:
    log = Log()

    def make_engine() -> str:
        log.events.append("engine")
        return "engine"

    def open_session(engine: str, schema: str) -> str:
        log.made += 1
        return f"{schema} session {log.made} on {engine}"

    session = Factory(open_session, engine=Singleton(make_engine), schema="public")
    dp = Dispatcher()
    dp.queries.bind(Work, lambda q, session: session, session=session)
    dp.start()
    assert await dp.query(Work()) == "public session 1 on engine"
    assert await dp.query(Work()) == "public session 2 on engine"
    assert log.events == ["engine"]


async def test_a_failing_provider_fails_the_handling_and_a_failed_singleton_is_not_cached() -> None:
    attempts: list[int] = []
    called: list[Work] = []

    async def flaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("database is down")
        return "connected"

    dp = Dispatcher()

    @dp.queries.register(Work, conn=Singleton(flaky))
    async def use(query: Work, conn: str) -> str:
        called.append(query)
        return conn

    dp.start()
    with pytest.raises(ConnectionError, match="database is down"):
        await dp.query(Work(1))
    assert called == []
    assert await dp.query(Work(2)) == "connected"
    assert await dp.query(Work(3)) == "connected"
    assert len(attempts) == 2


async def test_singletons_are_torn_down_in_reverse_creation_order() -> None:
    log = Log()

    def resource(name: str) -> Any:
        def provide() -> Iterator[str]:
            log.events.append(f"open {name}")
            yield name
            log.events.append(f"close {name}")

        return Singleton(provide)

    dp = Dispatcher()
    dp.queries.bind(
        "a", lambda a, first, second: None, argname="a", first=resource("first"), second=resource("second")
    )
    dp.queries.bind("b", lambda b, third: third, argname="b", third=resource("third"))
    async with dp:
        await dp.query("b")
        await dp.query("a")
    assert log.events == [
        "open third", "open first", "open second",
        "close second", "close first", "close third",
    ]  # fmt: skip


async def test_stop_runs_every_teardown_even_when_some_fail() -> None:
    closed: list[str] = []

    def failing(name: str) -> Any:
        def provide() -> Iterator[str]:
            yield name
            raise Boom(f"{name} teardown failed")

        return Singleton(provide)

    async def fine() -> AsyncIterator[str]:
        yield "fine"
        closed.append("fine")  # runs: another teardown's failure is not thrown into this one

    def build() -> Dispatcher:
        dp = Dispatcher()
        dp.queries.bind("one", lambda q, a, b: None, argname="q", a=Singleton(fine), b=failing("b"))
        dp.queries.bind("two", lambda q, c: None, argname="q", c=failing("c"))
        dp.start()
        return dp

    dp = build()
    await dp.query("one")
    with pytest.raises(Boom, match="b teardown failed"):
        await dp.stop()
    assert closed == ["fine"]
    dp = build()
    await dp.query("one")
    await dp.query("two")
    with pytest.raises(ExceptionGroup) as info:
        await dp.stop()
    assert info.value.message == "2 Singleton teardowns failed"
    assert [str(e) for e in info.value.exceptions] == ["c teardown failed", "b teardown failed"]


def test_slice_syntax_labels_a_provider() -> None:
    def get_repo() -> str:
        return "repo"

    repo: Provider = Singleton["repo":get_repo]
    assert repo.label == "repo"
    assert repo.factory is get_repo
    assert repr(repo) == "Singleton['repo': test_slice_syntax_labels_a_provider.<locals>.get_repo]"
    assert repo.identity == Singleton["repo":get_repo].identity
    assert repo.identity != Factory["repo":get_repo].identity
    assert repr(Factory(get_repo)) == "Factory(test_slice_syntax_labels_a_provider.<locals>.get_repo)"


async def test_same_label_is_the_same_singleton_within_a_dispatcher() -> None:
    made: list[int] = []

    def get_repo() -> int:
        made.append(len(made))
        return len(made)

    dp = Dispatcher()
    dp.queries.bind("a", lambda a, repo: repo, argname="a", repo=Singleton["repo":get_repo])
    dp.queries.bind("b", lambda b, repo: repo, argname="b", repo=Singleton["repo":get_repo])
    dp.start()
    assert await dp.query("a") == await dp.query("b") == 1
    assert made == [0]


def test_same_label_with_another_callable_is_refused_at_registration() -> None:
    def get_repo() -> str:
        return "repo"

    def get_other_repo() -> str:
        return "other"

    dp = Dispatcher()
    dp.queries.bind("a", lambda a, repo: repo, argname="a", repo=Singleton["repo":get_repo])
    with pytest.raises(ImproperlyConfigured) as info:
        dp.queries.bind("b", lambda b, repo: repo, argname="b", repo=Singleton["repo":get_other_repo])
    assert str(info.value) == (
        "Singleton['repo': test_same_label_with_another_callable_is_refused_at_registration.<locals>."
        "get_other_repo] reuses the label 'repo', which this dispatcher already gave to "
        "Singleton['repo': test_same_label_with_another_callable_is_refused_at_registration.<locals>."
        "get_repo]; the same label means the same provider, so use another label for another callable"
    )
    Dispatcher().queries.bind("b", lambda b, repo: repo, argname="b", repo=Singleton["repo":get_other_repo])


def test_provider_construction_is_checked() -> None:
    def open_session(url: str) -> str:
        return url

    with pytest.raises(ImproperlyConfigured) as info:
        Factory(open_session)
    assert str(info.value) == (
        "Factory(test_provider_construction_is_checked.<locals>.open_session) cannot call "
        "test_provider_construction_is_checked.<locals>.open_session with the values given "
        "(missing a required argument: 'url'); pass every parameter without a default as a keyword"
    )
    with pytest.raises(ImproperlyConfigured, match=r"takes a callable that makes the value, not 42"):
        Singleton(42)  # type: ignore[arg-type]
    with pytest.raises(ImproperlyConfigured, match=r'takes "label": callable'):
        Singleton[1:open_session]
    with pytest.raises(ImproperlyConfigured, match=r'takes "label": callable'):
        Singleton[int]  # type: ignore[index]
    Factory(dict)  # a builtin: nothing to check, nothing refused


def test_a_provider_satisfies_a_parameter_at_registration() -> None:
    dp = Dispatcher()

    async def handler(q: Work, repo: str) -> str:
        return repo

    dp.queries.bind(Work, handler, repo=Singleton(lambda: "repo"))
    with pytest.raises(HandlerSignatureError, match=r"parameter 'session' has no value"):
        dp.commands.bind("other", lambda c, session: None, other=Factory(lambda: 1))


# -- overrides --------------------------------------------------------------------------


async def test_override_with_a_value_applies_in_the_block_and_is_undone() -> None:
    repo = Singleton(lambda: "real repo")
    dp = Dispatcher()
    dp.queries.bind(Work, lambda q, repo: repo, repo=repo)
    dp.start()
    assert await dp.query(Work()) == "real repo"
    with dp.override(repo, "fake repo"):
        assert await dp.query(Work()) == "fake repo"
        with dp.override(repo, "inner fake"):
            assert await dp.query(Work()) == "inner fake"
        assert await dp.query(Work()) == "fake repo"
    assert await dp.query(Work()) == "real repo"


async def test_override_with_a_provider_and_before_start() -> None:
    made: list[str] = []

    def real() -> str:
        made.append("real")
        return "real"

    repo = Singleton(real)
    dp = Dispatcher()
    dp.queries.bind(Work, lambda q, repo: repo, repo=repo)
    counter = iter(range(100))
    with dp.override(repo, Factory(lambda: f"fake {next(counter)}")):
        dp.start()
        assert await dp.query(Work()) == "fake 0"
        assert await dp.query(Work()) == "fake 1"
    assert made == []
    assert await dp.query(Work()) == "real"


async def test_override_a_factory_in_a_class_handler() -> None:
    session = Factory(lambda: "real session")

    class Handler:
        def __init__(self, session: str) -> None:
            self.session = session

        async def handle(self, q: Work) -> str:
            return self.session

    dp = Dispatcher()
    dp.queries.bind(Work, Handler, session=session)
    dp.start()
    with dp.override(session, "fake session"):
        assert await dp.query(Work()) == "fake session"
    assert await dp.query(Work()) == "real session"


# -- class handlers and containers ---------------------------------------------------------


async def test_class_handlers_get_providers_in_init_for_every_handling() -> None:
    log = Log()

    class Handler:
        def __init__(self, session: str, repo: str) -> None:
            self.session, self.repo = session, repo
            self.events: list[object] = []

        def add_event(self, event: object) -> None:
            self.events.append(event)

        def dump_events(self) -> list[object]:
            return self.events

        async def handle(self, cmd: Work) -> str:
            self.add_event(f"done with {self.session}")
            return f"{self.session} + {self.repo}"

    seen: list[object] = []
    dp = Dispatcher()
    dp.commands.bind(Work, Handler, session=session_factory(log), repo=Singleton(lambda: "repo"))
    dp.events.bind("done with session-1", seen.append)
    dp.start()
    assert await dp.execute(Work()) == "session-1 + repo"
    assert await dp.execute(Work()) == "session-2 + repo"
    assert seen == ["done with session-1"]
    assert log.events == ["open session-1", "close session-1", "open session-2", "close session-2"]


async def test_handler_factory_builds_class_handlers() -> None:
    built: list[tuple[type, dict[str, Any]]] = []

    class NeedsContainer:
        def __init__(self, service: str) -> None:  # not checked: the factory supplies it
            self.service = service

        async def handle(self, q: Work) -> str:
            return self.service

    class WithBound:
        def __init__(self, service: str, extra: str) -> None:
            self.service, self.extra = service, extra

        def handle(self, q: Work) -> str:
            return f"{self.service} {self.extra}"

    async def factory(cls: type, **bound: Any) -> Any:
        built.append((cls, bound))
        return cls(service="from container", **bound)

    dp = Dispatcher(handler_factory=factory)
    dp.queries.bind(Work, NeedsContainer)
    dp.queries.bind("bound", WithBound, argname="q", extra=Singleton(lambda: "and extra"))
    dp.start()
    assert await dp.query(Work()) == "from container"
    assert await dp.query("bound") == "from container and extra"
    assert built == [(NeedsContainer, {}), (WithBound, {"extra": "and extra"})]


async def test_sync_handler_with_a_singleton() -> None:
    dp = Dispatcher()
    dp.queries.bind(Work, lambda q, config, plain: f"{config} {plain} {q.n}", config=Singleton(dict), plain=1)
    dp.start()
    assert await dp.query(Work(1)) == "{} 1 1"  # first call makes the Singleton
    assert await dp.query(Work(2)) == "{} 1 2"  # then the one-lookup path


async def test_several_singletons_and_the_message_by_keyword() -> None:
    dp = Dispatcher()

    async def handler(a: str, b: str, *, query: Work) -> str:
        return f"{a}{b}{query.n}"

    dp.queries.bind(Work, handler, argname="query", a=Singleton(lambda: "A"), b=Singleton(lambda: "B"))
    dp.start()
    assert await dp.query(Work(1)) == "AB1"
    assert await dp.query(Work(2)) == "AB2"


async def test_async_with_starts_and_stops() -> None:
    closed: list[str] = []

    async def pool() -> AsyncIterator[str]:
        yield "pool"
        closed.append("pool")

    dp = Dispatcher()
    dp.queries.bind(Work, lambda q, pool: pool, pool=Singleton(pool))
    async with dp as same:
        assert same is dp
        assert dp.started
        assert await dp.query(Work()) == "pool"
    assert closed == ["pool"]


# -- under faults --------------------------------------------------------------------------


async def test_an_override_entered_while_the_singleton_is_being_made_holds_for_the_whole_block() -> None:
    made: list[str] = []
    making, finish = asyncio.Event(), asyncio.Event()

    async def make_repo() -> str:
        making.set()
        await finish.wait()
        made.append("real")
        return "real"

    repo = Singleton(make_repo)
    dp = Dispatcher()

    @dp.queries.register(Work, repo=repo)
    async def which(query: Work, repo: str) -> str:
        return repo

    async with dp:
        first = asyncio.create_task(dp.query(Work(0)))
        await making.wait()
        with dp.override(repo, "fake"):
            finish.set()
            assert await first == "real"  # the handling that began making it gets it
            assert await dp.query(Work(1)) == "fake"  # the block holds, although it was made meanwhile
            assert await dp.query(Work(2)) == "fake"
        assert await dp.query(Work(3)) == "real"  # and after the block, the instance made once
    assert made == ["real"]


@pytest.mark.parametrize("lifetime", [Singleton, Factory])
async def test_a_generator_provider_that_does_not_yield_is_named(lifetime: type[Provider]) -> None:
    from pybus import ProviderError

    def no_value() -> Iterator[str]:
        if False:
            yield "never"

    dp = Dispatcher()
    dp.queries.bind(Work, lambda query, value: value, value=lifetime(no_value))
    async with dp:
        with pytest.raises(ProviderError) as info:
            await dp.query(Work())
    assert str(info.value).startswith(f"{lifetime.__name__}(")
    assert (
        "no_value) returned without yielding a value; a provider generator yields its value exactly once"
        in (str(info.value))
    )


async def test_a_generator_provider_that_yields_twice_is_named() -> None:
    from pybus import ProviderError

    def twice() -> Iterator[str]:
        yield "one"
        yield "two"

    async def twice_async() -> AsyncIterator[str]:
        yield "one"
        yield "two"

    dp = Dispatcher()
    dp.queries.bind(Work, lambda query, value: value, value=Factory(twice))
    dp.commands.bind(Ask, lambda cmd, value: value, value=Factory(twice_async))
    async with dp:
        with pytest.raises(ProviderError, match=r"Factory\(.*twice\) yielded a second time"):
            await dp.query(Work())
        with pytest.raises(ProviderError, match=r"Factory\(.*twice_async\) yielded a second time"):
            await dp.execute(Ask())


@dataclass(frozen=True)
class Ask:
    n: int = 0


async def test_a_provider_that_raises_gets_a_note_naming_it() -> None:
    def broken() -> str:
        raise Boom("no database")

    def teardown_fails() -> Iterator[str]:
        yield "value"
        raise Boom("rollback failed")

    dp = Dispatcher()
    dp.queries.bind(Work, lambda query, value: value, value=Singleton["db":broken])
    dp.commands.bind(Ask, lambda cmd, value: value, value=Factory(teardown_fails))
    async with dp:
        with pytest.raises(Boom) as made:
            await dp.query(Work())
        with pytest.raises(Boom) as torn:
            await dp.execute(Ask())
    assert made.value.__notes__ == [
        "raised by provider Singleton['db': " + _name(broken) + "] while making its value"
    ]
    assert torn.value.__notes__ == [f"raised by the teardown of provider Factory({_name(teardown_fails)})"]


async def test_a_factory_generator_never_hides_the_handlers_error() -> None:
    """contextlib would let a generator that catches the error swallow it; pybus does not."""
    seen: list[str] = []

    def swallowing() -> Iterator[str]:
        try:
            yield "session"
        except Boom:
            seen.append("rolled back")  # and returns without re-raising

    async def fail(query: Work, session: str) -> None:
        raise Boom("handler failed")

    dp = Dispatcher()
    dp.queries.bind(Work, fail, session=Factory(swallowing))
    async with dp:
        with pytest.raises(Boom, match="handler failed"):
            await dp.query(Work())
    assert seen == ["rolled back"]


def _name(function: object) -> str:
    return getattr(function, "__qualname__", "")
