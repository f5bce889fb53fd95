"""SQLAlchemy 2.0 (asyncio): a unit of work over an `AsyncSession`, a transactional outbox
and an idempotent inbox. Needs the extra `pybus-cqrs[sqlalchemy]` and a driver (aiosqlite,
asyncpg).

- `Outbox(metadata)` declares two tables on the application's `MetaData` (so
  Alembic and `metadata.create_all` see them): the outbox (routed messages
  waiting to be sent) and the inbox (which handler handled which message).
- `outbox.units(dp, sessions)` is a `Factory` that makes a `SqlAlchemyUnitOfWork`
  per handling: the handler writes through `uow.session` inside `async with uow:`.
  On commit, the events and messages it added that are routed to a transport are
  written as outbox rows **in the same transaction** as the handler's writes;
  the others become follow-ups (events) or background sends, as with any
  `pybus.UnitOfWork`.
- `outbox.relay(dp, sessions)` sends committed rows through the dispatcher's
  transport, oldest first and in order per ordering key, then marks them sent.
  A unit that wrote rows wakes the relay of its process at once (the fast path);
  the relay also polls, so rows left behind by a crash are sent by whichever
  relay runs next. On PostgreSQL, relays share the rows with `FOR UPDATE SKIP
  LOCKED`: two relays never send one row twice while both are healthy. Sent rows
  are deleted once older than `keep_sent`.
- `outbox.units(..., idempotent=True)`: the unit records (message id, handler)
  in the inbox in the handler's transaction; a redelivered message whose pair is
  recorded is acknowledged without running the handler again.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import json
import weakref
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

try:
    from sqlalchemy import (
        BigInteger,
        Column,
        DateTime,
        Index,
        Integer,
        LargeBinary,
        MetaData,
        String,
        Table,
        Text,
        and_,
        delete,
        event,
        exists,
        insert,
        select,
        update,
    )
    from sqlalchemy.exc import IntegrityError
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
    from sqlalchemy.orm import ORMExecuteState
except ImportError as exc:  # pragma: no cover - the extra is installed in the test environment
    raise ImportError(
        f"pybus.sqlalchemy needs SQLAlchemy 2.0 with asyncio ({exc}); "
        "install it with: pip install 'pybus-cqrs[sqlalchemy]' and a driver (aiosqlite, asyncpg)"
    ) from exc

from pybus.context import current_context, current_record
from pybus.errors import ImproperlyConfigured, key_name, message_key, whole_number
from pybus.handlers import positive_seconds
from pybus.providers import Factory
from pybus.transport import Envelope
from pybus.unit_of_work import AlreadyHandled, UnitOfWork

if TYPE_CHECKING:
    from pybus.dispatcher import Dispatcher

__all__ = ["Outbox", "Relay", "SqlAlchemyUnitOfWork"]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Outbox:
    """The outbox and inbox tables, declared on `metadata` under the names given."""

    def __init__(
        self, metadata: MetaData, *, outbox_table: str = "pybus_outbox", inbox_table: str = "pybus_inbox"
    ) -> None:
        if not isinstance(metadata, MetaData):
            raise ImproperlyConfigured(
                f"Outbox() takes the application's sqlalchemy.MetaData (e.g. Base.metadata), not {metadata!r}"
            )
        #: Routed messages waiting to be sent (`sent_at` null), and sent ones kept for a while.
        self.table = Table(
            outbox_table,
            metadata,
            Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
            Column("message_id", String(255), nullable=False, unique=True),
            Column("correlation_id", String(255), nullable=False),
            Column("causation_id", String(255)),
            Column("kind", String(16), nullable=False),
            Column("name", String(255), nullable=False),
            Column("body", LargeBinary, nullable=False),
            Column("headers", Text, nullable=False, default="{}"),
            Column("ordering_key", String(255)),
            Column("created_at", DateTime(timezone=True), nullable=False, default=_now),
            Column("sent_at", DateTime(timezone=True)),
        )
        Index(f"{outbox_table}_unsent", self.table.c.sent_at, self.table.c.id)
        Index(f"{outbox_table}_key", self.table.c.ordering_key, self.table.c.id)
        #: (message id, handler) pairs handled by idempotent units.
        self.inbox = Table(
            inbox_table,
            metadata,
            Column("message_id", String(255), primary_key=True),
            Column("handler", String(255), primary_key=True),
            Column("handled_at", DateTime(timezone=True), nullable=False, default=_now),
        )
        # The relays to wake, while something else holds them (the dispatcher that serves
        # one, the task that runs one): a module-level Outbox keeps none of them alive.
        self._relays: weakref.WeakSet[Relay] = weakref.WeakSet()
        # Per dispatcher, the inbox names in use and the registration each belongs to (see
        # `claim`): the same handler in two dispatchers (two workers in one process, made by
        # one factory) shares its name, as it does across processes.
        self._names: weakref.WeakKeyDictionary[Dispatcher, dict[str, object]] = weakref.WeakKeyDictionary()
        # (message id, inbox name) -> the task claiming it now (two units of one handling).
        self._claiming: dict[tuple[str, str], object] = {}

    def units(
        self,
        dp: Dispatcher,
        sessions: async_sessionmaker[AsyncSession],
        *,
        idempotent: bool = False,
        name: str | None = None,
    ) -> Factory:
        """A `Factory` making a `SqlAlchemyUnitOfWork` per handling of `dp`, on a session of
        `sessions`; bind it to the handlers' unit-of-work parameter. `idempotent`: record
        each (message id, handler) in the inbox, and skip a message already recorded; the
        handler is recorded under `name` (default: `Key->module.HandlerName`), which must
        name one registration."""
        _check_sessions(sessions)
        if name is not None and (not isinstance(name, str) or not 0 < len(name) <= 255):
            raise ImproperlyConfigured(
                f"units(name={name!r}): an inbox name is a string of 1 to 255 characters"
            )

        async def unit_of_work() -> AsyncIterator[SqlAlchemyUnitOfWork]:
            unit = SqlAlchemyUnitOfWork(sessions(), self, dp)
            try:
                if idempotent:
                    await unit.claim(name)
                yield unit
            except BaseException:
                await unit.close(failing=True)  # the failure in flight is the one to raise
                raise
            await unit.close()

        unit_of_work.__qualname__ = f"{type(self).__name__}.units({'idempotent' if idempotent else ''})"
        return Factory(unit_of_work)

    def relay(
        self,
        dp: Dispatcher,
        sessions: async_sessionmaker[AsyncSession],
        *,
        batch: int = 100,
        poll: float = 1.0,
        keep_sent: float = 3600.0,
        cleanup_every: float = 60.0,
    ) -> Relay:
        """A relay that sends this outbox's committed rows through `dp`'s transport."""
        _check_sessions(sessions)
        relay = Relay(
            self, dp, sessions, batch=batch, poll=poll, keep_sent=keep_sent, cleanup_every=cleanup_every
        )
        self._relays.add(relay)
        return relay

    def wake(self) -> None:
        """Tell this process's relays that rows were committed (the fast path)."""
        for relay in self._relays:
            relay.wake()


def _check_sessions(sessions: object) -> None:
    if not isinstance(sessions, async_sessionmaker):
        raise ImproperlyConfigured(
            "Pass the application's sqlalchemy.ext.asyncio.async_sessionmaker (the factory of "
            f"sessions), not {sessions!r}"
        )


class SqlAlchemyUnitOfWork(UnitOfWork):
    """A unit of work over one `AsyncSession`: `async with uow:` begins a transaction,
    commits it on a clean exit (with the outbox rows of the routed messages added) and
    rolls it back on an exception. Repositories use `uow.session`."""

    def __init__(self, session: AsyncSession, outbox: Outbox, dp: Dispatcher) -> None:
        super().__init__()
        #: The session of this handling; use it inside `async with uow:`.
        self.session = session
        self._outbox = outbox
        self._dp = dp
        self._claimed = False
        # Whether a statement ran through the session since the claim (whose own began the
        # transaction): a unit never entered that ran one lost its writes.
        self._used_since_claim = False
        self._claim: tuple[str, str] | None = None

    async def claim(self, name: str | None = None) -> None:
        """Record (message id, handler) in the inbox, in the transaction the handler's writes
        will share; raise `AlreadyHandled` if they are recorded already."""
        record = current_record()
        context = current_context()
        if record is None or context is None:
            raise ImproperlyConfigured(
                "An idempotent unit of work needs the handling context (the message id): the "
                "dispatcher tracks it when messages are routed, or with Dispatcher(context=True)"
            )
        registration = record[0]
        # The engines' records name a `Handler` (its qualified name says the module).
        qualified = getattr(registration, "qualified_name", registration.name)
        handler = name or f"{key_name(context.key)}->{qualified}"
        if len(handler) > 255:
            raise ImproperlyConfigured(
                f"The inbox name {handler[:60]}... is longer than 255 characters: pass units(name=...)"
            )
        owner = self._outbox._names.setdefault(self._dp, {}).setdefault(handler, registration)
        if owner is not registration:
            raise ImproperlyConfigured(
                f"Two registrations record their handlings in the inbox as {handler!r} ({owner} and "
                f"{registration}): one would skip the other's messages; give each its own name with "
                "outbox.units(dp, sessions, idempotent=True, name=...)"
            )
        claim = (context.message_id, handler)
        task = asyncio.current_task()
        if self._outbox._claiming.get(claim) is task:
            raise ImproperlyConfigured(
                f"Two idempotent units of work in one handling of {handler}: they would each record "
                "the message in the inbox and wait for each other; bind one unit and pass it on"
            )
        self._outbox._claiming[claim] = task
        self._claim = claim
        await self.session.begin()
        inbox = self._outbox.inbox
        pair = and_(inbox.c.message_id == context.message_id, inbox.c.handler == handler)
        recorded = await self.session.scalar(select(exists().where(pair)))
        if recorded:
            await self.session.rollback()
            raise AlreadyHandled(f"{handler} already handled message {context.message_id}")
        try:
            await self.session.execute(
                insert(inbox).values(message_id=context.message_id, handler=handler, handled_at=_now())
            )
        except IntegrityError as exc:  # another delivery of it committed meanwhile
            await self.session.rollback()
            raise AlreadyHandled(f"{handler} already handled message {context.message_id}") from exc
        self._claimed = True
        event.listen(self.session.sync_session, "do_orm_execute", self._used)

    def _used(self, state: ORMExecuteState) -> None:
        self._used_since_claim = True

    async def begin(self) -> None:
        if not self.session.in_transaction():
            await self.session.begin()

    async def commit(self) -> None:
        routed = self._dp.routes
        outbox_rows: list[dict[str, Any]] = []
        local_events: list[object] = []
        for event in self._events:
            if message_key(event) in routed:
                outbox_rows.append(self._row(event, None))
            else:
                local_events.append(event)
        local_sends: list[tuple[object, object]] = []
        for message, key in self._sends:
            if message_key(message) in routed:
                outbox_rows.append(self._row(message, key))
            else:
                local_sends.append((message, key))
        if outbox_rows:
            await self.session.execute(insert(self._outbox.table), outbox_rows)
        await self.session.commit()
        self._events, self._sends = local_events, local_sends
        if outbox_rows:
            self._outbox.wake()

    async def rollback(self) -> None:
        await self.session.rollback()

    async def close(self, *, failing: bool = False) -> None:
        """End the handling's session (its Factory's teardown). Writes made through a unit
        that was never entered are lost: after a handling that succeeded, that is raised,
        not ignored (`failing`: the handling already failed, and that failure is raised)."""
        if self._claim is not None and self._outbox._claiming.get(self._claim) is asyncio.current_task():
            del self._outbox._claiming[self._claim]
        if self._claimed:
            event.remove(self.session.sync_session, "do_orm_execute", self._used)
        used = self._used_since_claim if self._claimed else self.session.in_transaction()
        unentered = not failing and self.state == "new" and used
        await self.session.close()
        if unentered:
            raise ImproperlyConfigured(
                "A SqlAlchemyUnitOfWork's session was used but the unit was never entered, so its "
                "writes were rolled back: write inside `async with uow:` (a repository given its own "
                "unit by another Factory gets a second unit: pass it the handler's unit instead)"
            )

    def _row(self, message: object, key: object) -> dict[str, Any]:
        if key is not None and len(str(key)) > 255:
            raise ImproperlyConfigured(
                f"The ordering key of {key_name(message_key(message))} is longer than 255 characters "
                "(the outbox column's size): use a shorter key, such as an id or a hash"
            )
        envelope = self._dp.envelope(message)
        return {
            "message_id": envelope.message_id,
            "correlation_id": envelope.correlation_id,
            "causation_id": envelope.causation_id,
            "kind": envelope.kind,
            "name": envelope.name,
            "body": envelope.body,
            "headers": json.dumps(dict(envelope.headers)),
            "ordering_key": None if key is None else str(key),
            "created_at": _now(),
        }


class Relay:
    """Sends an outbox's committed rows through a dispatcher's transport.

    `await relay.run()` until `await relay.stop()`; or `await relay.send_pending()` for
    one pass (tests, scripts; the passes of one relay never overlap). Each pass, in one
    transaction: take up to `batch` unsent rows, the oldest first, locking them on
    PostgreSQL (`FOR UPDATE SKIP LOCKED`, so that relays share the work), leaving out
    the keys whose oldest unsent row another relay holds (so order per key holds however
    many relays run); send them, the rows of one key one after the other and the rest at
    once; mark them sent; commit.
    A crash between the send and the commit sends those rows again (at least once:
    the consumer's de-duplication and idempotent units absorb it).
    """

    def __init__(
        self,
        outbox: Outbox,
        dp: Dispatcher,
        sessions: async_sessionmaker[AsyncSession],
        *,
        batch: int,
        poll: float,
        keep_sent: float,
        cleanup_every: float,
    ) -> None:
        if dp.transport is None:
            raise ImproperlyConfigured(
                "An outbox relay sends through the dispatcher's transport: it has none"
            )
        self.outbox = outbox
        self.dp = dp
        self.sessions = sessions
        self.batch = whole_number("batch", batch, 1)
        for name, value, zero_too in (
            ("poll", poll, False),
            ("keep_sent", keep_sent, True),
            ("cleanup_every", cleanup_every, False),
        ):
            if not (positive_seconds(value) or (zero_too and value == 0 and not isinstance(value, bool))):
                raise ImproperlyConfigured(
                    f"relay({name}={value!r}): a number of seconds > 0" + (" (or 0)" if zero_too else "")
                )
        self.poll = float(poll)
        self.keep_sent = float(keep_sent)
        self.cleanup_every = float(cleanup_every)
        #: Rows sent by this relay, and passes that failed (reported to the error hook).
        self.sent = 0
        self.failed = 0
        self._wakeup = asyncio.Event()
        # Held by the pass in progress: a pass called meanwhile (`send_pending()` beside
        # `run()`) waits for it, or, without row locks (SQLite), it would send the same rows.
        self._passing = asyncio.Lock()
        self._stopping = False
        self._last_cleanup = 0.0

    def wake(self) -> None:
        """Rows were committed: send them now instead of at the next poll."""
        self._wakeup.set()

    async def run(self) -> None:
        """Send rows until `stop()`: at once when woken, else every `poll` seconds; then one
        last pass, for rows committed since the one before."""
        loop = asyncio.get_running_loop()
        while True:
            stopping = self._stopping
            self._wakeup.clear()
            try:
                sent = await self.send_pending()
                if not stopping and loop.time() - self._last_cleanup >= self.cleanup_every:
                    self._last_cleanup = loop.time()
                    await self.cleanup()
            except Exception as exc:  # the database or the broker is away: report, wait, again
                self.failed += 1
                await self._report(exc)
                sent = 0
            if stopping:
                return
            if sent == self.batch or self._stopping:
                continue  # more may be waiting, or the last pass is due
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll):
                    await self._wakeup.wait()

    async def stop(self) -> None:
        """End `run()` after the pass in progress and one last pass."""
        self._stopping = True
        self._wakeup.set()

    async def send_pending(self) -> int:
        """One pass: send up to `batch` rows; return how many were sent. The passes of
        one relay never overlap: called during a pass, it waits for that pass to end.
        A send that fails is raised once the rows sent are marked (several: in an
        `ExceptionGroup`)."""
        async with self._passing:
            return await self._pass()

    async def _pass(self) -> int:
        table = self.outbox.table
        # The oldest unsent rows, skipping those another relay holds (PostgreSQL).
        query = (
            select(table)
            .where(table.c.sent_at.is_(None))
            .order_by(table.c.id)
            .limit(self.batch)
            .with_for_update(skip_locked=True, of=table)
        )
        transport = self.dp.transport
        assert transport is not None  # checked by __init__
        sent: list[int] = []
        failures: list[Exception] = []

        async def send_in_order(chain: list[Any]) -> None:
            for row in chain:
                try:
                    await transport.send(_envelope(row))
                except Exception as exc:  # the rows sent before it are marked; the rest stay
                    failures.append(exc)
                    return
                sent.append(row["id"])

        async with self.sessions() as session, session.begin():
            rows = (await session.execute(query)).mappings().all()
            # The rows of one ordering key are sent one after the other; everything else at
            # once (a broker transport writes the sends of one loop turn together).
            chains: dict[object, list[Any]] = {}
            for row in await self._sendable(session, rows):
                key = row["ordering_key"]
                chains.setdefault(("row", row["id"]) if key is None else key, []).append(row)
            await asyncio.gather(*(send_in_order(chain) for chain in chains.values()))
            if sent:
                await session.execute(update(table).where(table.c.id.in_(sent)).values(sent_at=_now()))
        self.sent += len(sent)
        if len(failures) == 1:
            raise failures[0]
        if failures:  # each chain stopped at its own failure: every one is raised
            raise ExceptionGroup(
                f"{len(failures)} sends of the outbox relay failed (their rows, and the rows of "
                "their ordering keys after them, stay unsent for the next pass)",
                failures,
            )
        return len(sent)

    async def _sendable(self, session: AsyncSession, rows: Sequence[Any]) -> list[Any]:
        """The rows of this pass that may be sent now: every row without an ordering key,
        and of each key, the rows that continue its oldest unsent row without a gap. A row
        of the key that this pass does not hold (another relay locked it) ends the run: the
        rows after it wait, so that the rows of one key go out in order however many relays
        run."""
        keyed = [row for row in rows if row["ordering_key"] is not None]
        if not keyed:
            return list(rows)
        table = self.outbox.table
        mine = {row["id"] for row in keyed}
        unsent = (
            select(table.c.ordering_key, table.c.id)
            .where(
                table.c.sent_at.is_(None),
                table.c.ordering_key.in_({row["ordering_key"] for row in keyed}),
                table.c.id <= max(mine),
            )
            .order_by(table.c.id)
        )
        allowed: set[int] = set()
        stopped: set[str] = set()
        for key, row_id in (await session.execute(unsent)).all():
            if key in stopped:
                continue
            if row_id in mine:
                allowed.add(row_id)
            else:
                stopped.add(key)  # held by another relay: this key waits for it
        return [row for row in rows if row["ordering_key"] is None or row["id"] in allowed]

    async def cleanup(self) -> int:
        """Delete rows sent more than `keep_sent` seconds ago; return how many (`inf`: none)."""
        table = self.outbox.table
        try:
            before = _now() - dt.timedelta(seconds=self.keep_sent)
        except OverflowError:  # before the calendar's first day (inf, say): nothing was sent then
            return 0
        async with self.sessions() as session, session.begin():
            result = await session.execute(delete(table).where(table.c.sent_at < before))
        return int(getattr(result, "rowcount", 0) or 0)

    async def _report(self, error: BaseException) -> None:
        # As every background failure is: the error hook (sync or async), whose own failure is logged.
        await self.dp._supervisor.report(error, None, contextvars.copy_context())


def _envelope(row: Any) -> Envelope:
    return Envelope(
        kind=row["kind"],
        name=row["name"],
        body=bytes(row["body"]),
        message_id=row["message_id"],
        correlation_id=row["correlation_id"],
        causation_id=row["causation_id"],
        headers=json.loads(row["headers"] or "{}"),
    )
