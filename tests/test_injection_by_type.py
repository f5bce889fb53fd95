"""Injection by type: dp.provide(Type, provider) and Annotated[Type, provider]."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Generic, Optional, TypeVar

import pytest

from pybus import (
    Dispatcher,
    DispatcherFrozen,
    Factory,
    HandlerSignatureError,
    ImproperlyConfigured,
    Singleton,
)
from pybus.routes import routes

if TYPE_CHECKING:
    from decimal import Decimal as OnlyForTheTypeChecker


@dataclass(frozen=True)
class GetUser:
    user_id: int


class Repo:
    def __init__(self, name: str = "real") -> None:
        self.name = name


class Clock:
    pass


def make_repo() -> Repo:
    return Repo()


async def test_a_parameter_annotated_with_a_provided_type_receives_its_value() -> None:
    dp = Dispatcher()
    repos = Singleton(make_repo)
    dp.provide(Repo, repos)
    dp.provide(Clock, Clock())
    seen: list[object] = []

    @dp.queries.register(GetUser)
    async def get_user(query: GetUser, repo: Repo, clock: Clock) -> str:
        seen.append(clock)
        return repo.name

    class Handler:
        def __init__(self, repo: Repo) -> None:
            self.repo = repo

        async def handle(self, query: str) -> str:
            return self.repo.name

    dp.queries.bind("whoami", Handler, argname="query")
    async with dp:
        assert await dp.query(GetUser(1)) == "real"
        assert await dp.query("whoami") == "real"
        with dp.override(repos, Repo("fake")):  # overrides keep working
            assert await dp.query(GetUser(1)) == "fake"
    assert isinstance(seen[0], Clock)
    (route, other) = routes(dp)
    assert route.injected == {"repo": repr(repos), "clock": "<Clock>"}  # visible in pybus routes
    assert other.injected == {"repo": repr(repos)}


async def test_annotated_names_the_provider_and_a_value_by_name_wins() -> None:
    dp = Dispatcher()
    dp.provide(Repo, Singleton(make_repo))

    @dp.queries.register(GetUser)
    async def get_user(query: GetUser, repo: Annotated[Repo, Factory(lambda: Repo("annotated"))]) -> str:
        return repo.name

    @dp.queries.register("named", argname="query", repo=Repo("by name"))
    async def named(query: str, repo: Repo) -> str:
        return repo.name

    async with dp:
        assert await dp.query(GetUser(1)) == "annotated"
        assert await dp.query("named") == "by name"


def test_a_type_not_provided_is_still_a_missing_value_at_registration() -> None:
    dp = Dispatcher()

    async def get_user(query: GetUser, repo: Repo) -> str:
        return repo.name

    with pytest.raises(HandlerSignatureError, match="parameter 'repo' has no value"):
        dp.queries.bind(GetUser, get_user)


async def test_provide_is_checked() -> None:
    dp = Dispatcher()
    with pytest.raises(ImproperlyConfigured, match="takes a class first"):
        dp.provide("Repo", Repo())
    dp.provide(Repo, Repo())
    with pytest.raises(ImproperlyConfigured, match="is provided already"):
        dp.provide(Repo, Repo())
    async with dp:
        with pytest.raises(DispatcherFrozen):
            dp.provide(Clock, Clock())


async def test_an_annotation_that_does_not_resolve_leaves_the_others_to_injection() -> None:
    """A return type imported under `if TYPE_CHECKING:` (string annotations) made every
    annotation of the handler unreadable, and the provided parameter 'had no value'."""
    dp = Dispatcher()
    dp.provide(Repo, Singleton(make_repo))

    async def get_user(query: GetUser, repo: Repo) -> OnlyForTheTypeChecker:
        return repo.name  # type: ignore[return-value]

    dp.queries.bind(GetUser, get_user)
    async with dp:
        assert await dp.query(GetUser(1)) == "real"


def test_a_parameter_whose_annotation_does_not_resolve_is_named_with_the_fix() -> None:
    dp = Dispatcher()
    dp.provide(Repo, Singleton(make_repo))

    async def get_user(query: GetUser, repo: OnlyForTheTypeChecker) -> str:
        return ""

    with pytest.raises(HandlerSignatureError, match="parameter 'repo' has no value") as caught:
        dp.queries.bind(GetUser, get_user)
    notes = "\n".join(caught.value.__notes__)
    assert "'repo' (NameError" in notes
    assert "not under `if TYPE_CHECKING:`" in notes


async def test_optional_of_a_provided_type_is_injected() -> None:
    dp = Dispatcher()
    dp.provide(Repo, Repo("provided"))

    async def with_default(query: GetUser, repo: Repo | None = None) -> str | None:
        return None if repo is None else repo.name

    async def without_default(query: Clock, repo: Optional[Repo]) -> str | None:  # noqa: UP045
        return None if repo is None else repo.name

    dp.queries.bind(GetUser, with_default)
    dp.queries.bind(Clock, without_default)
    async with dp:
        assert await dp.query(GetUser(1)) == "provided"
        assert await dp.query(Clock()) == "provided"


T = TypeVar("T")


class Store(Generic[T]):
    def __init__(self, what: str) -> None:
        self.what = what


class Order:
    pass


async def test_generic_types_are_provided_exactly_or_by_their_class() -> None:
    dp = Dispatcher()
    dp.provide(Store[Order], Store[Order]("orders"))
    dp.provide(Store, Store("anything"))

    async def orders(query: GetUser, store: Store[Order]) -> str:
        return store.what

    async def repos(query: Clock, store: Store[Repo]) -> str:
        return store.what

    dp.queries.bind(GetUser, orders)
    dp.queries.bind(Clock, repos)
    async with dp:
        assert await dp.query(GetUser(1)) == "orders"
        assert await dp.query(Clock()) == "anything"  # Store serves the Store[...] not provided


def test_a_maker_or_a_wrong_value_is_refused_with_the_fix() -> None:
    dp = Dispatcher()
    with pytest.raises(ImproperlyConfigured, match=r"wrap it: dp.provide\(Repo, Singleton\(make_repo\)\)"):
        dp.provide(Repo, make_repo)
    with pytest.raises(ImproperlyConfigured, match="the value is not a Repo"):
        dp.provide(Repo, "not a repo")
    with pytest.raises(ImproperlyConfigured, match=r"Singleton\(Repo\)"):
        dp.provide(Repo, Repo)  # the class itself: a maker too
    assert not dp.provided


async def test_concurrent_handlings_never_share_a_provided_factory_value() -> None:
    made: list[Repo] = []

    def fresh() -> Repo:
        made.append(Repo(f"r{len(made)}"))
        return made[-1]

    dp = Dispatcher()
    dp.provide(Repo, Factory(fresh))

    async def get_user(query: GetUser, repo: Repo) -> str:
        await asyncio.sleep(0)
        return repo.name

    dp.queries.bind(GetUser, get_user)
    async with dp:
        names = await asyncio.gather(*(dp.query(GetUser(i)) for i in range(5)))
    assert sorted(names) == [f"r{i}" for i in range(5)]
