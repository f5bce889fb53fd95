"""Injection by type: dp.provide(Type, provider) and Annotated[Type, provider]."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

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
        dp.provide("Repo", Repo())  # type: ignore[arg-type]
    dp.provide(Repo, Repo())
    with pytest.raises(ImproperlyConfigured, match="is provided already"):
        dp.provide(Repo, Repo())
    async with dp:
        with pytest.raises(DispatcherFrozen):
            dp.provide(Clock, Clock())
