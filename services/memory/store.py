"""Turns in SQL (SQLAlchemy 2): SQLite by default, PostgreSQL for several replicas.

The request path runs each transaction whole on a worker thread with a blocking engine: one
thread hop per transaction instead of one per statement (aiosqlite), several times faster for
these short transactions.

Sequence numbers come from a per-session counter row. Appending locks that row (SELECT ... FOR
UPDATE on PostgreSQL; on SQLite every write transaction starts with BEGIN IMMEDIATE, which takes
the database write lock), so concurrent appends from any number of replicas get strictly
increasing seq values without gaps, and the idempotency check by request id runs under the same
lock. The unique constraints back both rules up at the database level.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Engine,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    event,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.kit.db import create_sync_engine


class Base(DeclarativeBase):
    """Memory's tables; services/memory/migrations creates and changes them (kit.migrations)."""


class SessionRow(Base):
    """One row per (tenant, session): the last seq handed out, locked while appending."""

    __tablename__ = "memory_sessions"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    last_seq: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class TurnRow(Base):
    __tablename__ = "memory_turns"
    __table_args__ = (
        UniqueConstraint("tenant", "session_id", "seq", name="uq_memory_turns_seq"),
        UniqueConstraint(
            "tenant", "session_id", "request_id", "position", name="uq_memory_turns_request"
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


# Appends written in one transaction at most; bounds the transaction's size and lock time.
_MAX_BATCH = 64


@dataclass
class _PendingAppend:
    tenant: str
    session_id: str
    request_id: str
    turns: list[NewTurn]
    result: asyncio.Future[tuple[list[StoredTurn], bool]]


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


class TurnStore:
    def __init__(self, url: str) -> None:
        self._engine = create_sync_engine(url)
        self._is_sqlite = self._engine.dialect.name == "sqlite"
        if self._is_sqlite:
            # Readers keep the plain engine (WAL readers never wait for the writer); the writer
            # gets its own engine that begins with the write lock held.
            self._write_engine = create_sync_engine(url)
            _begin_immediate(self._write_engine)
        else:
            self._write_engine = self._engine
        # One writer thread: group commits run one after another within this process.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memory-write")
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="memory-read")
        self._queue: list[_PendingAppend] = []
        self._flusher: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self._flusher is not None:
            await self._flusher  # acknowledged or in-flight appends finish first
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self._engine.dispose()
        if self._write_engine is not self._engine:
            self._write_engine.dispose()

    async def append(
        self, tenant: str, session_id: str, request_id: str, turns: list[NewTurn]
    ) -> tuple[list[StoredTurn], bool]:
        """Store ``turns`` after the session's last seq; returns (turns, duplicate).

        A request id already stored for this session writes nothing and returns what was
        stored the first time. Committed before returning.

        Group commit: appends that arrive while a transaction is in flight wait and are
        written together in the next one, so N concurrent appends cost one commit (and one
        fsync) instead of N serialized ones.
        """
        pending = _PendingAppend(
            tenant, session_id, request_id, turns, asyncio.get_running_loop().create_future()
        )
        self._queue.append(pending)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await asyncio.shield(pending.result)

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
            try:
                await self._write_batch(batch)
            except Exception:
                # One bad append must not fail the others: retry them one by one.
                for item in batch:
                    if item.result.done():
                        continue
                    try:
                        await self._write_batch([item])
                    except Exception as exc:
                        item.result.set_exception(exc)

    async def _write_batch(self, batch: list[_PendingAppend]) -> None:
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._writer, self._append_all, batch)
        for item, result in zip(batch, results, strict=True):
            if not item.result.done():
                item.result.set_result(result)

    def _append_all(self, batch: list[_PendingAppend]) -> list[tuple[list[StoredTurn], bool]]:
        """One transaction for the whole batch (on the writer thread)."""
        insert = sqlite.insert if self._is_sqlite else postgresql.insert
        sessions_table: Table = SessionRow.__table__  # type: ignore[assignment]
        turns: Table = TurnRow.__table__  # type: ignore[assignment]
        keys = sorted({(item.tenant, item.session_id) for item in batch})
        results: list[tuple[list[StoredTurn], bool]] = []
        with self._write_engine.begin() as conn:
            last_seq: dict[tuple[str, str], int] = {}
            stored: dict[tuple[str, str, str], list[StoredTurn]] = {}
            # Lock every session row in one order, so two replicas' batches cannot deadlock.
            for tenant, session_id in keys:
                conn.execute(
                    insert(sessions_table)
                    .values(tenant=tenant, session_id=session_id, last_seq=0)
                    .on_conflict_do_nothing()
                )
                last_seq[(tenant, session_id)] = conn.execute(
                    select(sessions_table.c.last_seq)
                    .where(
                        sessions_table.c.tenant == tenant,
                        sessions_table.c.session_id == session_id,
                    )
                    .with_for_update()
                ).scalar_one()
                request_ids = {
                    item.request_id
                    for item in batch
                    if (item.tenant, item.session_id) == (tenant, session_id)
                }
                existing = conn.execute(
                    select(turns)
                    .where(
                        turns.c.tenant == tenant,
                        turns.c.session_id == session_id,
                        turns.c.request_id.in_(request_ids),
                    )
                    .order_by(turns.c.request_id, turns.c.position)
                )
                for row in existing:
                    stored.setdefault((tenant, session_id, row.request_id), []).append(_stored(row))
            now_ns = time.time_ns()
            new_rows: list[dict[str, Any]] = []
            for item in batch:
                key = (item.tenant, item.session_id, item.request_id)
                if key in stored:
                    results.append((stored[key], True))
                    continue
                base = last_seq[(item.tenant, item.session_id)]
                rows = [
                    {
                        "tenant": item.tenant,
                        "session_id": item.session_id,
                        "seq": base + position + 1,
                        "request_id": item.request_id,
                        "position": position,
                        "role": turn.role,
                        "content": turn.content,
                        "tool_name": turn.tool_name,
                        "tool_version": turn.tool_version,
                        "created_at_ns": now_ns,
                    }
                    for position, turn in enumerate(item.turns)
                ]
                last_seq[(item.tenant, item.session_id)] = base + len(rows)
                new_rows.extend(rows)
                stored[key] = [_stored(row) for row in rows]
                results.append((stored[key], False))
            if new_rows:
                conn.execute(insert(turns), new_rows)
            for (tenant, session_id), seq in last_seq.items():
                conn.execute(
                    update(sessions_table)
                    .where(
                        sessions_table.c.tenant == tenant,
                        sessions_table.c.session_id == session_id,
                    )
                    .values(last_seq=seq)
                )
        return results

    async def history(self, tenant: str, session_id: str, limit: int) -> list[StoredTurn]:
        """The ``limit`` most recent turns of the tenant's session, oldest first."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._history, tenant, session_id, limit)

    def _history(self, tenant: str, session_id: str, limit: int) -> list[StoredTurn]:
        turns: Table = TurnRow.__table__  # type: ignore[assignment]
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(turns)
                .where(turns.c.tenant == tenant, turns.c.session_id == session_id)
                .order_by(turns.c.seq.desc())
                .limit(limit)
            ).all()
        return [_stored(row) for row in reversed(rows)]
