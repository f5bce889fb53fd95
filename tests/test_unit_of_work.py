"""The unit of work without a database: commit publishes, rollback publishes nothing,
equal events once when their class allows it, messages sent after the commit, and the
errors of a unit used outside the handling it was injected into."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from pybus import (
    Dispatcher,
    Event,
    Factory,
    HandlingContext,
    ImproperlyConfigured,
    Singleton,
    UnitOfWork,
    current_context,
)


@dataclass(frozen=True)
class CreateUser:
    name: str
    fail: str = ""


@dataclass(frozen=True)
class UserCreated(Event, unique=True):
    name: str


@dataclass(frozen=True)
class Welcomed:
    name: str


@dataclass(frozen=True)
class SendWelcome:
    name: str


@dataclass(eq=True)
class Unhashable(Event, unique=True):
    names: list[str] = field(default_factory=list)


class Store(UnitOfWork):
    """An in-memory store: writes become visible in `rows` only on commit."""

    rows: list[str] = []  # noqa: RUF012 - shared by the test's handlings, reset per test
    log: list[str] = []  # noqa: RUF012

    def __init__(self, fail_commit: bool = False) -> None:
        super().__init__()
        self.pending: list[str] = []
        self.fail_commit = fail_commit

    async def begin(self) -> None:
        Store.log.append("begin")

    async def commit(self) -> None:
        if self.fail_commit:
            raise ConnectionError("the store went away")
        Store.rows.extend(self.pending)
        Store.log.append("commit")

    async def rollback(self) -> None:
        self.pending.clear()
        Store.log.append("rollback")


@pytest.fixture(autouse=True)
def empty_store() -> None:
    Store.rows, Store.log = [], []


def app(*, fail_commit: bool = False) -> tuple[Dispatcher, list[object]]:
    dp = Dispatcher(context=True)
    published: list[object] = []

    @dp.commands.register(CreateUser, uow=Factory(Store, fail_commit=fail_commit))
    async def create_user(cmd: CreateUser, uow: Store) -> str:
        async with uow:
            uow.pending.append(cmd.name)
            uow.add_event(UserCreated(cmd.name))
            uow.add_event(UserCreated(cmd.name))  # equal, and the class says unique: once
            uow.add_event(Welcomed(cmd.name))
            uow.add_event(Welcomed(cmd.name))  # not unique: twice
            uow.send(SendWelcome(cmd.name))
            if cmd.fail == "inside":
                raise ValueError("failed inside the unit")
        if cmd.fail == "after":
            raise ValueError("failed after the commit")
        return "created"

    @dp.events.register(UserCreated)
    async def on_created(event: UserCreated) -> None:
        context = current_context()
        assert context is not None
        published.append((event, context.causation_id))

    @dp.events.register(Welcomed)
    async def on_welcomed(event: Welcomed) -> None:
        published.append(event)

    @dp.commands.register(SendWelcome)
    async def send_welcome(cmd: SendWelcome) -> None:
        published.append(cmd)

    return dp, published


async def test_a_commit_publishes_its_events_as_follow_ups_and_sends_its_messages() -> None:
    dp, published = app()
    causes: list[str] = []

    @dp.events.register(UserCreated)
    async def cause(event: UserCreated, context: HandlingContext) -> None:
        causes.append(context.causation_id or "")

    async with dp:
        assert await dp.execute(CreateUser("ada")) == "created"
        await dp.join()
    assert Store.rows == ["ada"]
    assert Store.log == ["begin", "commit"]
    assert published == [
        (UserCreated("ada"), causes[0]),  # once; caused by the command: a follow-up of its handling
        Welcomed("ada"),
        Welcomed("ada"),
        SendWelcome("ada"),
    ]


@pytest.mark.parametrize("where", ["inside", "after"])
async def test_a_failure_publishes_and_sends_nothing(where: str) -> None:
    dp, published = app()
    async with dp:
        with pytest.raises(ValueError, match=f"failed {where}"):
            await dp.execute(CreateUser("ada", fail=where))
        await dp.join()
    assert published == []
    # Inside: rolled back, nothing written. After: the writes are committed, the events are not
    # published (what a transactional outbox is for).
    assert (Store.rows, Store.log) == (
        ([], ["begin", "rollback"]) if where == "inside" else (["ada"], ["begin", "commit"])
    )


async def test_a_commit_that_fails_rolls_back_and_raises() -> None:
    dp, published = app(fail_commit=True)
    async with dp:
        with pytest.raises(ConnectionError, match="the store went away"):
            await dp.execute(CreateUser("ada"))
        await dp.join()
    assert (published, Store.rows, Store.log) == ([], [], ["begin", "rollback"])


async def test_a_unit_not_injected_per_handling_is_refused_with_the_fix() -> None:
    loose = Store()
    with pytest.raises(ImproperlyConfigured, match="bind it with a Factory"):
        async with loose:
            pass

    dp = Dispatcher()

    @dp.commands.register(CreateUser, uow=Singleton(Store))
    async def shared(cmd: CreateUser, uow: Store) -> None:
        async with uow:
            pass

    async with dp:
        with pytest.raises(ImproperlyConfigured, match="is not made per handling"):
            await dp.execute(CreateUser("ada"))


async def test_a_unit_is_entered_once_and_takes_events_only_while_open() -> None:
    dp = Dispatcher()
    seen: list[str] = []

    @dp.commands.register(CreateUser, uow=Factory(Store))
    async def twice(cmd: CreateUser, uow: Store) -> None:
        with pytest.raises(
            ImproperlyConfigured, match=r"uow.add_event\(\) was called outside `async with uow:`"
        ):
            uow.add_event(UserCreated(cmd.name))
        async with uow:
            pass
        assert uow.state == "committed"
        with pytest.raises(ImproperlyConfigured, match="already used \\(committed\\)"):
            async with uow:
                pass
        seen.append("checked")

    async with dp:
        await dp.execute(CreateUser("ada"))
    assert seen == ["checked"]


@dataclass(frozen=True)
class FrozenWithAList(Event, unique=True):
    """Has a __hash__, which fails: a list cannot be hashed."""

    names: list[str]


@pytest.mark.parametrize("unhashable", [Unhashable, FrozenWithAList])
async def test_a_unique_event_must_be_hashable(unhashable: type[Unhashable | FrozenWithAList]) -> None:
    dp = Dispatcher()

    @dp.commands.register(CreateUser, uow=Factory(Store))
    async def create(cmd: CreateUser, uow: Store) -> None:
        async with uow:
            uow.add_event(unhashable([cmd.name]))

    async with dp:
        with pytest.raises(ImproperlyConfigured, match="marked unique but its instances are not hashable"):
            await dp.execute(CreateUser("ada"))


class RegisterUser:
    """A class handler that takes its unit of work in __init__."""

    def __init__(self, uow: Store) -> None:
        self.uow = uow

    async def handle(self, cmd: CreateUser) -> None:
        async with self.uow:
            self.uow.pending.append(cmd.name)
            self.uow.add_event(Welcomed(cmd.name))


async def test_a_class_handler_gets_its_unit_in_init() -> None:
    dp = Dispatcher()
    dp.commands.bind(CreateUser, RegisterUser, uow=Factory(Store))
    published: list[object] = []
    dp.events.bind(Welcomed, published.append)
    async with dp:
        await dp.execute(CreateUser("ada"))
    assert (Store.rows, published) == (["ada"], [Welcomed("ada")])


async def test_a_unit_from_a_singleton_is_refused_at_once_beside_a_factory() -> None:
    dp = Dispatcher()

    @dp.commands.register(CreateUser, uow=Singleton(Store), other=Factory(Store))
    async def mixed(cmd: CreateUser, uow: Store, other: Store) -> None:
        raise AssertionError("not reached")

    async with dp:
        with pytest.raises(ImproperlyConfigured, match="'uow' is not made per handling"):
            await dp.execute(CreateUser("ada"))


def make_store():  # type: ignore[no-untyped-def]  # unannotated on purpose
    return Store()


def make_typed_store() -> Store:
    return Store()


async def open_store() -> AsyncIterator[Store]:
    yield Store()


@pytest.mark.parametrize("factory", [make_typed_store, open_store])
async def test_a_factory_whose_return_type_names_the_unit_hands_its_events_over(factory: Any) -> None:
    dp = Dispatcher()
    published: list[object] = []
    dp.events.bind(Welcomed, published.append)

    @dp.commands.register(CreateUser, uow=Factory(factory))
    async def create(cmd: CreateUser, uow: Store) -> None:
        async with uow:
            uow.add_event(Welcomed(cmd.name))

    async with dp:
        await dp.execute(CreateUser("ada"))
    assert published == [Welcomed("ada")]


async def test_a_factory_that_does_not_say_it_makes_a_unit_is_refused_not_lost() -> None:
    dp = Dispatcher()

    @dp.commands.register(CreateUser, uow=Factory(make_store))
    async def create(cmd: CreateUser, uow: Store) -> None:
        raise AssertionError("not reached")

    async with dp:
        with pytest.raises(ImproperlyConfigured, match="annotate the callable's return type"):
            await dp.execute(CreateUser("ada"))
