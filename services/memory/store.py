"""Turns and request claims in SQL (SQLAlchemy 2): SQLite by default, PostgreSQL for replicas.

The write path runs each transaction whole on one writer thread with a blocking engine: one
thread hop per transaction instead of one per statement (aiosqlite), several times faster for
these short transactions. Appends and claims that arrive while a transaction is in flight are
written together in the next one (group commit); under concurrent load (the last transaction
carried more than one operation) the first operation to find the writer idle also waits up to
``group_commit_window_s`` for others to join it, so a steady stream of callers shares fewer
transactions and fsyncs. Every caller is answered only after the transaction holding its
operation committed; a lone caller (serial load) never waits.

Order. A session's turns are kept in acknowledgment order: by the time the sender acknowledged
the request (``acknowledged_at_ns``), then request id, then position in the request. ``seq``
numbers that order 1, 2, 3 ... without gaps. The per-session row holds the last seq and the
order key of the last turn, so the common case, an append later than everything stored, is one
insert of the turns and one update of that row. A late append (replayed from the sender's
outbox after an outage) takes the seqs where it belongs and moves the later turns of the session
up in the same transaction.

Locks. Appending locks the session rows (SELECT ... FOR UPDATE on PostgreSQL; on SQLite every
write transaction starts with BEGIN IMMEDIATE, which takes the database write lock), then the
request rows, each in sorted order, so batches of several replicas never deadlock. The
idempotency check by request id runs under the session lock; the unique constraints back the
rules up at the database level.

Claims. A request id derived from an idempotency key is claimed before its work runs
(``claim``) and completed by the append that stores its turns (``Completion``), in the same
transaction. Records are kept for the idempotency window after they settle (the claim's lease
expired, or the request completed) and then deleted by ``prune``; a record past the window
counts as absent even before it is deleted, so the window is exact.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    case,
    delete,
    event,
    func,
    literal,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.kit.db import create_sync_engine
from services.kit.durability import Synchronous

log = logging.getLogger("toolmesh.memory")


class Base(DeclarativeBase):
    """Memory's tables; services/memory/migrations creates and changes them (kit.migrations)."""


class SessionRow(Base):
    """One row per (tenant, session): the last seq handed out, locked while appending.

    ``last_acknowledged_at_ns`` and ``last_request_id`` are the order key of the turn at
    ``last_seq``; an append with a later key goes after it without looking at the turns. NULL
    for sessions created by a release before acknowledgment order (everything counts as later).
    """

    __tablename__ = "memory_sessions"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    last_seq: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    last_acknowledged_at_ns: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)


class TurnRow(Base):
    __tablename__ = "memory_turns"
    __table_args__ = (
        UniqueConstraint("tenant", "session_id", "seq", name="uq_memory_turns_seq"),
        UniqueConstraint(
            "tenant", "session_id", "request_id", "position", name="uq_memory_turns_request"
        ),
        # Where a late append belongs: the first turn acknowledged after it.
        Index(
            "ix_memory_turns_ack_order", "tenant", "session_id", "acknowledged_at_ns", "request_id"
        ),
    )

    # SQLite only auto-increments INTEGER PRIMARY KEY.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    tenant: Mapped[str] = mapped_column(String(128), nullable=False)
    session_id: Mapped[str] = mapped_column(String(128), nullable=False)
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    request_id: Mapped[str] = mapped_column(String(128), nullable=False)
    # Position of the turn within its AppendTurns request.
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    content: Mapped[str] = mapped_column(Text, nullable=False)
    tool_name: Mapped[str] = mapped_column(String(128), nullable=False, default="")
    tool_version: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    created_at_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # When the sender acknowledged the request. NULL only for turns written by a release before
    # acknowledgment order during a rolling update; those count as acknowledged when created.
    acknowledged_at_ns: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


# RequestRow.state values.
CLAIMED = "claimed"
COMPLETED = "completed"


class RequestRow(Base):
    """What became of a request id: claimed for one execution, or completed with its answer."""

    __tablename__ = "memory_requests"
    __table_args__ = (Index("ix_memory_requests_window", "window_start_ns"),)

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(128), nullable=False)
    fingerprint: Mapped[str] = mapped_column(String(128), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    # The serialized answer; NULL while claimed, or when completed without one being kept.
    response: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    lease_expires_at_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)
    completed_at_ns: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # The idempotency window runs from here: the lease's expiry while claimed, the completion
    # once completed. Past the window the record counts as absent and housekeeping deletes it.
    window_start_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)


_SESSIONS: Table = SessionRow.__table__  # type: ignore[assignment]
_TURNS: Table = TurnRow.__table__  # type: ignore[assignment]
_REQUESTS: Table = RequestRow.__table__  # type: ignore[assignment]


@dataclass(frozen=True)
class NewTurn:
    role: str
    content: str
    tool_name: str = ""
    tool_version: str = ""


@dataclass(frozen=True)
class StoredTurn:
    seq: int
    role: str
    content: str
    request_id: str
    tool_name: str
    tool_version: str
    created_at_ns: int


@dataclass(frozen=True)
class Completion:
    """Sent with an append: the request's content fingerprint and its serialized answer."""

    fingerprint: str
    response: bytes


class ClaimState(enum.Enum):
    CLAIMED = "claimed"
    COMPLETED = "completed"
    IN_PROGRESS = "in_progress"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class ClaimResult:
    state: ClaimState
    # COMPLETED: the kept answer; empty when the request completed without one being kept.
    response: bytes = b""
    # CLAIMED and IN_PROGRESS.
    lease_expires_at_ns: int = 0
    # CONFLICT: "session" or "content".
    conflict: str = ""


# Operations written in one transaction at most; bounds the transaction's size and lock time.
_MAX_BATCH = 64
# Request records deleted per housekeeping transaction.
PRUNE_BATCH = 1000
# A claim whose insert lost a race re-reads the winner's record; more rounds mean a bug.
_CLAIM_ROUNDS = 3

_OrderKey = tuple[int, str]
_T = TypeVar("_T")


@dataclass
class _PendingAppend:
    tenant: str
    session_id: str
    request_id: str
    turns: list[NewTurn]
    acknowledged_at_ns: int
    completion: Completion | None
    result: asyncio.Future[tuple[list[StoredTurn], bool]]
    # Set inside the transaction, published once it committed.
    outcome: tuple[list[StoredTurn], bool] | None = None

    @property
    def order_key(self) -> _OrderKey:
        return (self.acknowledged_at_ns, self.request_id)

    def publish(self) -> None:
        if self.outcome is not None and not self.result.done():
            self.result.set_result(self.outcome)


@dataclass
class _PendingClaim:
    tenant: str
    request_id: str
    session_id: str
    fingerprint: str
    lease_ns: int
    result: asyncio.Future[ClaimResult]
    outcome: ClaimResult | None = None

    def publish(self) -> None:
        if self.outcome is not None and not self.result.done():
            self.result.set_result(self.outcome)


_Pending = _PendingAppend | _PendingClaim


@dataclass
class _Session:
    """A locked session row and what this transaction adds to it."""

    last_seq: int
    last_key: _OrderKey | None
    fresh: list[_PendingAppend] = field(default_factory=list)


def _stored(row: Any) -> StoredTurn:
    """From a result row or a dict of the same columns."""
    get = row.__getitem__ if isinstance(row, dict) else row._mapping.__getitem__
    return StoredTurn(
        seq=get("seq"),
        role=get("role"),
        content=get("content"),
        request_id=get("request_id"),
        tool_name=get("tool_name"),
        tool_version=get("tool_version"),
        created_at_ns=get("created_at_ns"),
    )


def _begin_immediate(engine: Engine) -> None:
    """SQLite: take the write lock at BEGIN, so no two appends read the same last seq."""

    def _no_driver_transactions(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's BEGIN below be the only one (pysqlite would issue its own).
        dbapi_connection.isolation_level = None

    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(engine, "connect", _no_driver_transactions)
    event.listen(engine, "begin", _begin)


class _Shift:
    """How a transaction's late appends move a session's stored seqs: ``seq >= start`` moves
    up by ``by`` (the last matching step wins), everything before the first step stays."""

    def __init__(self, steps: list[tuple[int, int]]) -> None:
        self.steps = steps  # (start, by), ascending start and by

    def __call__(self, seq: int) -> int:
        moved = 0
        for start, by in self.steps:
            if seq >= start:
                moved = by
        return seq + moved


class TurnStore:
    def __init__(
        self,
        url: str,
        *,
        idempotency_window_ns: int,
        clock: Callable[[], int] = time.time_ns,
        synchronous: Synchronous = "FULL",
        group_commit_window_s: float = 0.0,
    ) -> None:
        self._engine = create_sync_engine(url, synchronous=synchronous)
        self._is_sqlite = self._engine.dialect.name == "sqlite"
        self._insert = sqlite.insert if self._is_sqlite else postgresql.insert
        if self._is_sqlite:
            # Readers keep the plain engine (WAL readers never wait for the writer); the writer
            # gets its own engine that begins with the write lock held.
            self._write_engine = create_sync_engine(url, synchronous=synchronous)
            _begin_immediate(self._write_engine)
        else:
            self._write_engine = self._engine
        self._window_ns = idempotency_window_ns
        self._clock = clock
        # One writer thread: group commits run one after another within this process.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memory-write")
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="memory-read")
        self._queue: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._window_s = group_commit_window_s
        self._last_batch = 0

    async def close(self) -> None:
        if self._flusher is not None:
            await self._flusher  # acknowledged or in-flight writes finish first
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self._engine.dispose()
        if self._write_engine is not self._engine:
            self._write_engine.dispose()

    async def append(
        self,
        tenant: str,
        session_id: str,
        request_id: str,
        turns: list[NewTurn],
        *,
        acknowledged_at_ns: int | None = None,
        completion: Completion | None = None,
    ) -> tuple[list[StoredTurn], bool]:
        """Store ``turns`` in the session's acknowledgment order; returns (turns, duplicate).

        ``acknowledged_at_ns`` None means now; a time ahead of this store's clock counts as
        now, so a sender's fast clock cannot put its turns after ones acknowledged later.
        A request id already stored for this session writes nothing (not even its completion)
        and returns what is stored. Committed before returning; the returned seqs are those at
        that moment (a later, late append may move them up).
        """
        now = self._clock()
        acknowledged = now if acknowledged_at_ns is None else min(acknowledged_at_ns, now)
        loop = asyncio.get_running_loop()
        pending = _PendingAppend(
            tenant,
            session_id,
            request_id,
            turns,
            acknowledged,
            completion,
            loop.create_future(),
        )
        return await self._submit(pending, pending.result)

    async def claim(
        self, tenant: str, request_id: str, session_id: str, fingerprint: str, lease_ns: int
    ) -> ClaimResult:
        """Reserve ``request_id`` for one execution, or say what became of an earlier one."""
        pending = _PendingClaim(
            tenant,
            request_id,
            session_id,
            fingerprint,
            lease_ns,
            asyncio.get_running_loop().create_future(),
        )
        return await self._submit(pending, pending.result)

    async def _submit(self, pending: _Pending, result: asyncio.Future[_T]) -> _T:
        self._queue.append(pending)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await asyncio.shield(result)

    async def _flush(self) -> None:
        if self._window_s > 0 and self._last_batch > 1:
            # Concurrent callers: let them join this transaction.
            await asyncio.sleep(self._window_s)
        while self._queue:
            batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
            self._last_batch = len(batch)
            try:
                await self._write_batch(batch)
            except Exception:
                # One bad operation must not fail the others: retry them one by one.
                for item in batch:
                    if item.result.done():
                        continue
                    try:
                        await self._write_batch([item])
                    except Exception as exc:
                        item.result.set_exception(exc)

    async def _write_batch(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._write_all, batch)
        for item in batch:
            item.publish()

    def _write_all(self, batch: list[_Pending]) -> None:
        """One transaction for the whole batch (on the writer thread).

        Appends go first, then claims: the batch's operations were concurrent, and this order
        lets a claim see the completion that arrived with it.
        """
        appends = [item for item in batch if isinstance(item, _PendingAppend) and item.turns]
        # A request outside any session (a direct tool call) has no turns: its append only
        # completes its claim with the answer.
        answers = [item for item in batch if isinstance(item, _PendingAppend) and not item.turns]
        claims = [item for item in batch if isinstance(item, _PendingClaim)]
        with self._write_engine.begin() as conn:
            now = self._clock()
            completing = self._store_turns(conn, appends, now) + answers
            for answer in answers:
                answer.outcome = ([], False)
            by_request: dict[tuple[str, str], list[_Pending]] = {}
            operations: list[_Pending] = [*completing, *claims]
            for operation in operations:
                by_request.setdefault((operation.tenant, operation.request_id), []).append(
                    operation
                )
            # Request rows locked in one order too, after every session row.
            for key in sorted(by_request):
                for pending in by_request[key]:
                    if isinstance(pending, _PendingAppend):
                        self._complete(conn, pending, now)
                    else:
                        pending.outcome = self._claim(conn, pending, now)

    # --- turns -------------------------------------------------------------------------------

    def _store_turns(
        self, conn: Connection, appends: list[_PendingAppend], now: int
    ) -> list[_PendingAppend]:
        """Write the batch's new turns; returns the new appends that complete a request."""
        sessions: dict[tuple[str, str], _Session] = {}
        stored: dict[tuple[str, str, str], list[StoredTurn]] = {}
        # Lock every session row in one order, so two replicas' batches cannot deadlock.
        for tenant, session_id in sorted({(item.tenant, item.session_id) for item in appends}):
            sessions[(tenant, session_id)] = self._lock_session(conn, tenant, session_id)
            request_ids = {
                item.request_id
                for item in appends
                if (item.tenant, item.session_id) == (tenant, session_id)
            }
            existing = conn.execute(
                select(_TURNS)
                .where(
                    _TURNS.c.tenant == tenant,
                    _TURNS.c.session_id == session_id,
                    _TURNS.c.request_id.in_(request_ids),
                )
                .order_by(_TURNS.c.request_id, _TURNS.c.position)
            )
            for row in existing:
                stored.setdefault((tenant, session_id, row.request_id), []).append(_stored(row))
        # The first append of a request id is new; later ones in the batch are duplicates.
        first: dict[tuple[str, str, str], _PendingAppend] = {}
        for item in appends:
            key = (item.tenant, item.session_id, item.request_id)
            if key not in stored and key not in first:
                first[key] = item
                sessions[(item.tenant, item.session_id)].fresh.append(item)
        new_rows: list[dict[str, Any]] = []
        for (tenant, session_id), session in sessions.items():
            if not session.fresh:
                continue
            shift, rows = self._place(conn, (tenant, session_id), session, now)
            new_rows += rows
            if shift.steps:
                # Turns stored earlier and returned to a duplicate in this batch moved too.
                for key, turns in stored.items():
                    if key[:2] == (tenant, session_id):
                        stored[key] = [replace(turn, seq=shift(turn.seq)) for turn in turns]
        if new_rows:
            conn.execute(self._insert(_TURNS), new_rows)
        for new_row in new_rows:
            key = (new_row["tenant"], new_row["session_id"], new_row["request_id"])
            stored.setdefault(key, []).append(_stored(new_row))
        for item in appends:
            key = (item.tenant, item.session_id, item.request_id)
            item.outcome = (stored[key], first.get(key) is not item)
        return [item for item in first.values() if item.completion is not None]

    def _lock_session(self, conn: Connection, tenant: str, session_id: str) -> _Session:
        conn.execute(
            self._insert(_SESSIONS)
            .values(tenant=tenant, session_id=session_id, last_seq=0)
            .on_conflict_do_nothing()
        )
        row = conn.execute(
            select(
                _SESSIONS.c.last_seq,
                _SESSIONS.c.last_acknowledged_at_ns,
                _SESSIONS.c.last_request_id,
            )
            .where(_SESSIONS.c.tenant == tenant, _SESSIONS.c.session_id == session_id)
            .with_for_update()
        ).one()
        last_key = None
        if row.last_acknowledged_at_ns is not None and row.last_request_id is not None:
            last_key = (row.last_acknowledged_at_ns, row.last_request_id)
        return _Session(row.last_seq, last_key)

    def _place(
        self, conn: Connection, key: tuple[str, str], session: _Session, now: int
    ) -> tuple[_Shift, list[dict[str, Any]]]:
        """The rows of the session's new turns, with their seqs in acknowledgment order; moves
        later stored turns up and updates the session row."""
        tenant, session_id = key
        fresh = sorted(session.fresh, key=lambda item: item.order_key)
        last_key = session.last_key
        late = [item for item in fresh if last_key is not None and item.order_key < last_key]
        tail = fresh[len(late) :]
        rows: list[dict[str, Any]] = []
        steps: list[tuple[int, int]] = []
        moved = 0
        for item in late:
            # Every turn stored so far that was acknowledged after it moves up by all the
            # late turns up to this one; it takes the first of the freed seqs.
            start = self._first_later_seq(conn, key, item.order_key, session.last_seq)
            rows += _rows(item, start + moved, now)
            moved += len(item.turns)
            steps.append((start, moved))
        if steps:
            self._move_up(conn, tenant, session_id, steps)
        seq = session.last_seq + moved
        for item in tail:
            rows += _rows(item, seq + 1, now)
            seq += len(item.turns)
        values: dict[str, Any] = {"last_seq": seq}
        if tail:
            values["last_acknowledged_at_ns"], values["last_request_id"] = tail[-1].order_key
        conn.execute(
            update(_SESSIONS)
            .where(_SESSIONS.c.tenant == tenant, _SESSIONS.c.session_id == session_id)
            .values(**values)
        )
        return _Shift(steps), rows

    def _first_later_seq(
        self, conn: Connection, session: tuple[str, str], key: _OrderKey, last_seq: int
    ) -> int:
        """The lowest seq of a stored turn acknowledged after ``key``; after the last seq when
        there is none (the turns the session row's order key came from were deleted)."""
        tenant, session_id = session
        acknowledged, request_id = key
        later = tuple_(_TURNS.c.acknowledged_at_ns, _TURNS.c.request_id) > tuple_(
            literal(acknowledged, BigInteger), literal(request_id, String)
        )
        # Written by a release before acknowledgment order: acknowledged when created.
        later_unset = and_(
            _TURNS.c.acknowledged_at_ns.is_(None),
            tuple_(_TURNS.c.created_at_ns, _TURNS.c.request_id)
            > tuple_(literal(acknowledged, BigInteger), literal(request_id, String)),
        )
        seq = conn.execute(
            select(func.min(_TURNS.c.seq)).where(
                _TURNS.c.tenant == tenant,
                _TURNS.c.session_id == session_id,
                or_(later, later_unset),
            )
        ).scalar_one()
        return last_seq + 1 if seq is None else int(seq)

    def _move_up(
        self, conn: Connection, tenant: str, session_id: str, steps: list[tuple[int, int]]
    ) -> None:
        """Apply a shift in two statements. The seq constraint is checked row by row (SQLite
        and PostgreSQL alike), so the moved rows pass through negative seqs first."""
        scope = (_TURNS.c.tenant == tenant, _TURNS.c.session_id == session_id)
        by = case(*((_TURNS.c.seq >= start, moved) for start, moved in reversed(steps)), else_=0)
        conn.execute(
            update(_TURNS)
            .where(*scope, _TURNS.c.seq >= steps[0][0])
            .values(seq=-(_TURNS.c.seq + by))
        )
        conn.execute(update(_TURNS).where(*scope, _TURNS.c.seq < 0).values(seq=-_TURNS.c.seq))

    def _turns_exist(self, conn: Connection, tenant: str, session_id: str, request_id: str) -> bool:
        return (
            conn.execute(
                select(literal(1))
                .where(
                    _TURNS.c.tenant == tenant,
                    _TURNS.c.session_id == session_id,
                    _TURNS.c.request_id == request_id,
                )
                .limit(1)
            ).first()
            is not None
        )

    # --- request claims ------------------------------------------------------------------------

    def _locked_request(self, conn: Connection, tenant: str, request_id: str, now: int) -> Any:
        """The request's record, locked; None when absent or past the idempotency window (then
        deleted here, so that a new record can take its place)."""
        where = (_REQUESTS.c.tenant == tenant, _REQUESTS.c.request_id == request_id)
        row = conn.execute(select(_REQUESTS).where(*where).with_for_update()).first()
        if row is not None and row.window_start_ns + self._window_ns <= now:
            conn.execute(delete(_REQUESTS).where(*where))
            return None
        return row

    def _insert_request(self, conn: Connection, values: dict[str, Any]) -> bool:
        """Insert a record unless one exists (another replica's, committed meanwhile)."""
        # RETURNING, not rowcount: psycopg reports -1 for an INSERT ... ON CONFLICT here.
        inserted = conn.execute(
            self._insert(_REQUESTS)
            .values(**values)
            .on_conflict_do_nothing()
            .returning(_REQUESTS.c.request_id)
        ).first()
        return inserted is not None

    def _claim(self, conn: Connection, claim: _PendingClaim, now: int) -> ClaimResult:
        where = (_REQUESTS.c.tenant == claim.tenant, _REQUESTS.c.request_id == claim.request_id)
        lease = now + claim.lease_ns
        for _ in range(_CLAIM_ROUNDS):
            row = self._locked_request(conn, claim.tenant, claim.request_id, now)
            if row is None:
                if self._turns_exist(conn, claim.tenant, claim.session_id, claim.request_id):
                    # Stored without a record (before claims existed, or past the window): the
                    # id cannot run again in this session, and its answer is not kept.
                    return ClaimResult(ClaimState.COMPLETED)
                claimed = self._insert_request(
                    conn,
                    {
                        "tenant": claim.tenant,
                        "request_id": claim.request_id,
                        "session_id": claim.session_id,
                        "fingerprint": claim.fingerprint,
                        "state": CLAIMED,
                        "response": None,
                        "lease_expires_at_ns": lease,
                        "created_at_ns": now,
                        "completed_at_ns": None,
                        "window_start_ns": lease,
                    },
                )
                if claimed:
                    return ClaimResult(ClaimState.CLAIMED, lease_expires_at_ns=lease)
                continue
            if row.session_id != claim.session_id:
                return ClaimResult(ClaimState.CONFLICT, conflict="session")
            if row.fingerprint != claim.fingerprint:
                return ClaimResult(ClaimState.CONFLICT, conflict="content")
            if row.state == COMPLETED:
                return ClaimResult(ClaimState.COMPLETED, response=row.response or b"")
            if now < row.lease_expires_at_ns:
                return ClaimResult(
                    ClaimState.IN_PROGRESS, lease_expires_at_ns=row.lease_expires_at_ns
                )
            if self._turns_exist(conn, claim.tenant, claim.session_id, claim.request_id):
                # Its turns were stored by an append that did not complete the claim.
                conn.execute(
                    update(_REQUESTS)
                    .where(*where)
                    .values(state=COMPLETED, completed_at_ns=now, window_start_ns=now)
                )
                return ClaimResult(ClaimState.COMPLETED)
            # The earlier attempt's lease ran out unfinished: this one takes over.
            conn.execute(
                update(_REQUESTS)
                .where(*where)
                .values(lease_expires_at_ns=lease, window_start_ns=lease)
            )
            return ClaimResult(ClaimState.CLAIMED, lease_expires_at_ns=lease)
        raise RuntimeError(f"request {claim.request_id!r}: claim kept losing the insert race")

    def _complete(self, conn: Connection, item: _PendingAppend, now: int) -> None:
        """Record the answer of a request whose turns this transaction stored."""
        assert item.completion is not None
        where = (_REQUESTS.c.tenant == item.tenant, _REQUESTS.c.request_id == item.request_id)
        done = {
            "state": COMPLETED,
            "response": item.completion.response,
            "completed_at_ns": now,
            "window_start_ns": now,
        }
        for _ in range(_CLAIM_ROUNDS):
            row = self._locked_request(conn, item.tenant, item.request_id, now)
            if row is None:
                record = {
                    "tenant": item.tenant,
                    "request_id": item.request_id,
                    "session_id": item.session_id,
                    "fingerprint": item.completion.fingerprint,
                    "lease_expires_at_ns": now,
                    "created_at_ns": now,
                    **done,
                }
                if self._insert_request(conn, record):
                    return
                continue
            if row.state == CLAIMED and row.session_id == item.session_id:
                if row.fingerprint != item.completion.fingerprint:
                    # Turns of other content under this claim: done, but no answer to give.
                    done["response"] = None
                conn.execute(update(_REQUESTS).where(*where).values(**done))
                return
            if not item.turns and row.state == COMPLETED:
                item.outcome = ([], True)  # the same answer, delivered again: a duplicate
                return
            # Bound to another session, or completed already (its turns are in another
            # session): this append's turns are stored, the record stays as it is.
            log.warning(
                "request id already bound elsewhere; answer not kept",
                extra={"request_id": item.request_id, "bound_state": row.state},
            )
            return
        raise RuntimeError(f"request {item.request_id!r}: completion kept losing the insert race")

    # --- housekeeping ----------------------------------------------------------------------------

    async def prune(self) -> int:
        """Delete request records past the idempotency window, ``PRUNE_BATCH`` per transaction
        so appends wait at most one small transaction. Turns are never deleted here."""
        loop = asyncio.get_running_loop()
        total = 0
        while True:
            deleted = await loop.run_in_executor(self._writer, self._prune_batch)
            total += deleted
            if deleted < PRUNE_BATCH:
                return total

    def _prune_batch(self) -> int:
        cut = self._clock() - self._window_ns
        settled = _REQUESTS.c.window_start_ns <= cut
        oldest = (
            select(_REQUESTS.c.tenant, _REQUESTS.c.request_id).where(settled).limit(PRUNE_BATCH)
        )
        with self._write_engine.begin() as conn:
            # The condition again on the outer statement: PostgreSQL re-checks it on a row a
            # concurrent claim took over meanwhile, which then stays.
            result = conn.execute(
                delete(_REQUESTS).where(
                    settled, tuple_(_REQUESTS.c.tenant, _REQUESTS.c.request_id).in_(oldest)
                )
            )
        return int(result.rowcount or 0)

    async def release(self, tenant: str, request_id: str, fingerprint: str) -> bool:
        """Forget a claim that did no work (its request was refused before anything ran), so a
        retry may claim the id at once. Only an unfinished claim of the same content goes."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._writer, self._release, tenant, request_id, fingerprint
        )

    def _release(self, tenant: str, request_id: str, fingerprint: str) -> bool:
        with self._write_engine.begin() as conn:
            result = conn.execute(
                delete(_REQUESTS).where(
                    _REQUESTS.c.tenant == tenant,
                    _REQUESTS.c.request_id == request_id,
                    _REQUESTS.c.fingerprint == fingerprint,
                    _REQUESTS.c.state == CLAIMED,
                )
            )
        return bool(result.rowcount)

    # --- reads ---------------------------------------------------------------------------------

    async def history(self, tenant: str, session_id: str, limit: int) -> list[StoredTurn]:
        """The ``limit`` most recent turns of the tenant's session, oldest first."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._history, tenant, session_id, limit)

    def _history(self, tenant: str, session_id: str, limit: int) -> list[StoredTurn]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(_TURNS)
                .where(_TURNS.c.tenant == tenant, _TURNS.c.session_id == session_id)
                .order_by(_TURNS.c.seq.desc())
                .limit(limit)
            ).all()
        return [_stored(row) for row in reversed(rows)]


def _rows(item: _PendingAppend, first_seq: int, now: int) -> list[dict[str, Any]]:
    return [
        {
            "tenant": item.tenant,
            "session_id": item.session_id,
            "seq": first_seq + position,
            "request_id": item.request_id,
            "position": position,
            "role": turn.role,
            "content": turn.content,
            "tool_name": turn.tool_name,
            "tool_version": turn.tool_version,
            "created_at_ns": now,
            "acknowledged_at_ns": item.acknowledged_at_ns,
        }
        for position, turn in enumerate(item.turns)
    ]
