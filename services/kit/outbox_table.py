"""The outbox as a table in the service's own database (SQLAlchemy 2): items outlive the pod.

A local file (services.kit.outbox.Outbox) survives a crash but not a pod that is scaled down,
drained or rescheduled: its emptyDir goes with it, and with it every item acknowledged but not
yet delivered. In production the items wait in ``<prefix>_outbox`` of the service's PostgreSQL
database instead, so any replica (this pod's successor or a sibling) delivers what another
left behind.

Several replicas relay one table: ``due`` claims the items it hands out with a lease (``FOR
UPDATE SKIP LOCKED``, then ``next_attempt_at`` moved past the lease), so replicas do not send
the same items at the same time; a replica that dies mid-delivery only delays its items by the
lease, after which another claims them. Receivers de-duplicate by key, so a lease that expires
during a slow delivery costs a duplicate send, never a lost item.

A service with its own tables (auth) also writes outbox rows inside its own transactions
(``insert_items``), so a change and the events that record it commit together or not at all.

Tables are made by each service's Alembic migrations (a frozen copy of ``outbox_tables``).
Statements run on one dedicated thread with the blocking driver: one hop per transaction.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Insert,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from services.kit.db import create_sync_engine
from services.kit.durability import Synchronous
from services.kit.outbox import DeadLetter, Item, Pending

T = TypeVar("T")
# SQLite only makes an INTEGER PRIMARY KEY an alias of the rowid (autoincrementing).
_ID = BigInteger().with_variant(Integer(), "sqlite")
# Longer than any delivery attempt (a batch of calls, each with its own timeout).
DEFAULT_LEASE_S = 60.0


@dataclass(frozen=True)
class OutboxTables:
    items: Table
    dead_letters: Table


def outbox_tables(metadata: MetaData, prefix: str) -> OutboxTables:
    """``<prefix>_outbox`` and ``<prefix>_outbox_dead_letters``, added to ``metadata``."""
    items = Table(
        f"{prefix}_outbox",
        metadata,
        Column("id", _ID, primary_key=True, autoincrement=True),
        Column("kind", String(32), nullable=False),
        Column("key", String(512), nullable=False, unique=True),
        Column("payload", LargeBinary(), nullable=False),
        Column("created_at", Float(), nullable=False),
        Column("attempts", Integer(), nullable=False, server_default="0"),
        Column("next_attempt_at", Float(), nullable=False),
        Column("last_error", Text(), nullable=False, server_default=""),
        Index(f"ix_{prefix}_outbox_due", "kind", "next_attempt_at", "id"),
    )
    dead = Table(
        f"{prefix}_outbox_dead_letters",
        metadata,
        Column("id", _ID, primary_key=True, autoincrement=False),
        Column("kind", String(32), nullable=False),
        Column("key", String(512), nullable=False),
        Column("payload", LargeBinary(), nullable=False),
        Column("created_at", Float(), nullable=False),
        Column("attempts", Integer(), nullable=False),
        Column("reason", Text(), nullable=False),
        Column("dead_at", Float(), nullable=False),
    )
    return OutboxTables(items, dead)


def insert_items(dialect: str, table: Table, items: Sequence[Item]) -> Insert:
    """The insert of ``items``, due now; a key already queued is kept as is."""
    now = time.time()
    rows = [
        {
            "kind": i.kind,
            "key": i.key,
            "payload": i.payload,
            "created_at": now,
            "next_attempt_at": now,
        }
        for i in items
    ]
    if dialect == "postgresql":
        return (
            postgresql.insert(table)
            .values(rows)
            .on_conflict_do_nothing(index_elements=[table.c.key])
        )
    return sqlite.insert(table).values(rows).on_conflict_do_nothing(index_elements=[table.c.key])


class TableOutbox:
    """An OutboxStore on ``<prefix>_outbox`` of the database at ``url``."""

    def __init__(
        self,
        url: str,
        prefix: str,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        synchronous: Synchronous = "FULL",
    ) -> None:
        self.url = url
        self._synchronous: Synchronous = synchronous
        self.tables = outbox_tables(MetaData(), prefix)
        self._lease_s = lease_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"outbox-{prefix}")
        self._engine: Engine | None = None
        self.depths: dict[str, int] = {}

    async def _run(self, fn: Callable[[Connection], T]) -> T:
        """``fn`` in one transaction on the outbox thread."""

        def call() -> T:
            assert self._engine is not None, "outbox not opened"
            with self._engine.begin() as conn:
                return fn(conn)

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def open(self) -> None:
        """Connect (once; opening again only recounts); the tables must exist (the service's
        migrations make them)."""
        if self._engine is None:
            self._engine = create_sync_engine(self.url, pool_size=2, synchronous=self._synchronous)
        await self.refresh_depths()

    async def close(self) -> None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await asyncio.get_running_loop().run_in_executor(self._executor, engine.dispose)
        self._executor.shutdown(wait=True)

    async def put(self, items: Sequence[Item]) -> None:
        if not items:
            return
        table = self.tables.items
        await self._run(lambda conn: conn.execute(insert_items(conn.dialect.name, table, items)))
        for item in items:
            self.depths[item.kind] = self.depths.get(item.kind, 0) + 1

    async def due(self, kind: str, limit: int) -> list[Pending]:
        """Claim up to ``limit`` due items of ``kind`` for the lease, oldest first."""
        t = self.tables.items
        now = time.time()

        def claim(conn: Connection) -> list[Pending]:
            query = (
                select(t.c.id, t.c.kind, t.c.key, t.c.payload, t.c.attempts)
                .where(t.c.kind == kind, t.c.next_attempt_at <= now)
                .order_by(t.c.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            rows = [Pending(*row) for row in conn.execute(query)]
            if rows:
                conn.execute(
                    update(t)
                    .where(t.c.id.in_([p.id for p in rows]))
                    .values(next_attempt_at=now + self._lease_s)
                )
            return rows

        return await self._run(claim)

    async def done(self, ids: Sequence[int]) -> None:
        """Delete delivered items; the depths count them out (refresh_depths recounts every
        replica's items, which the relay does while idle)."""
        t = self.tables.items
        if not ids:
            return
        query = delete(t).where(t.c.id.in_(list(ids))).returning(t.c.kind)
        kinds: list[str] = await self._run(lambda conn: list(conn.execute(query).scalars()))
        for kind in kinds:
            self.depths[kind] = max(0, self.depths.get(kind, 0) - 1)

    async def retry_later(self, ids: Sequence[int], error: str, delay_s: float) -> None:
        t = self.tables.items
        values: dict[str, Any] = {
            "attempts": t.c.attempts + 1,
            "next_attempt_at": time.time() + delay_s,
            "last_error": error[:500],
        }
        await self._run(
            lambda conn: conn.execute(update(t).where(t.c.id.in_(list(ids))).values(**values))
        )

    async def make_due(self, kind: str) -> None:
        """Items of ``kind`` waiting out a retry backoff are due now (their receiver is back).
        Items only claimed (never failed) keep their lease, so no other replica takes them."""
        t = self.tables.items
        now = time.time()
        query = (
            update(t)
            .where(t.c.kind == kind, t.c.next_attempt_at > now, t.c.attempts > 0)
            .values(next_attempt_at=now)
        )
        await self._run(lambda conn: conn.execute(query))

    async def dead_letter(self, refused: Sequence[tuple[int, str]]) -> None:
        t, dead = self.tables.items, self.tables.dead_letters
        now = time.time()

        def move(conn: Connection) -> None:
            for item_id, reason in refused:
                source = select(
                    t.c.id, t.c.kind, t.c.key, t.c.payload, t.c.created_at, t.c.attempts
                ).where(t.c.id == item_id)
                row = conn.execute(source).first()
                if row is None:
                    continue
                conn.execute(
                    insert(dead).values(**row._asdict(), reason=reason[:2000], dead_at=now)
                )
                conn.execute(delete(t).where(t.c.id == item_id))

        await self._run(move)
        await self.refresh_depths()

    async def dead_letters(self, kind: str = "") -> list[DeadLetter]:
        d = self.tables.dead_letters
        query = select(d.c.id, d.c.kind, d.c.key, d.c.payload, d.c.reason, d.c.dead_at)
        if kind:
            query = query.where(d.c.kind == kind)
        return await self._run(
            lambda conn: [DeadLetter(*row) for row in conn.execute(query.order_by(d.c.id))]
        )

    async def refresh_depths(self) -> dict[str, int]:
        """Items waiting in the table, every replica's (the table is shared)."""
        t = self.tables.items
        query = select(t.c.kind, func.count()).group_by(t.c.kind)
        counted: dict[str, int] = await self._run(
            lambda conn: {str(kind): int(count) for kind, count in conn.execute(query)}
        )
        self.depths = {kind: counted.get(kind, 0) for kind in {*self.depths, *counted}}
        return self.depths

    async def adopt_file(self, path: Path) -> int:
        """Move what a local outbox file (an earlier release's) still holds into the table,
        then rename the file ``*.adopted``; returns how many items moved. Dead letters are
        left in the renamed file, where they were already reported."""

        def read() -> list[Item] | None:
            if not path.exists():
                return None
            conn = sqlite3.connect(path)
            try:
                rows = conn.execute("SELECT kind, key, payload FROM outbox ORDER BY id")
                return [Item(kind, key, bytes(payload)) for kind, key, payload in rows]
            finally:
                conn.close()

        loop = asyncio.get_running_loop()
        items = await loop.run_in_executor(self._executor, read)
        if items is None:
            return 0
        for start in range(0, len(items), 500):
            await self.put(items[start : start + 500])
        await loop.run_in_executor(
            self._executor, path.rename, path.with_name(path.name + ".adopted")
        )
        return len(items)


__all__ = ["DEFAULT_LEASE_S", "OutboxTables", "TableOutbox", "insert_items", "outbox_tables"]
