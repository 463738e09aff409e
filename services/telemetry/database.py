"""The telemetry database: one engine shared by spans, ledger, budgets and audit trail.

Writes that must be serialized per tenant (budget checks, audit chain appends) run in
``locked``: on PostgreSQL a lock row taken with SELECT ... FOR UPDATE, so several replicas on
one database take turns per tenant; on SQLite BEGIN IMMEDIATE, the database's one write lock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import ColumnElement, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import DeclarativeBase

from services.kit.db import create_engine, session_factory
from services.kit.durability import Synchronous


class Base(DeclarativeBase):
    pass


class Database:
    def __init__(self, url: str, *, synchronous: Synchronous = "FULL") -> None:
        self.engine = create_engine(url, synchronous=synchronous)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self.sessions = session_factory(self.engine)
        # SQLite has one writer: queue this process's writers here, not in SQLite's busy loop.
        self._local_write_lock = asyncio.Lock() if self.is_sqlite else None

    async def close(self) -> None:
        await self.engine.dispose()

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        if self._local_write_lock is None:
            yield
            return
        async with self._local_write_lock:
            yield

    async def delete_in_chunks(self, table: Any, condition: ColumnElement[bool], chunk: int) -> int:
        """Delete the rows matching ``condition`` (which an index must serve), ``chunk`` rows
        per transaction, so no writer ever waits for more than one chunk; rows deleted."""
        total = 0
        while True:
            batch = select(table.id).where(condition).limit(chunk)
            async with self.writing(), self.engine.begin() as conn:
                result = await conn.execute(delete(table).where(table.id.in_(batch)))
            deleted = int(getattr(result, "rowcount", 0) or 0)
            total += deleted
            if deleted < chunk:
                return total

    def insert(self, table: Any) -> Any:
        """The dialect's INSERT, which has ON CONFLICT on both."""
        return (sqlite.insert if self.is_sqlite else postgresql.insert)(table)

    @contextlib.asynccontextmanager
    async def locked(
        self, lock: type[Base], tenant: str, **initial: Any
    ) -> AsyncIterator[tuple[AsyncConnection, Any]]:
        """A write transaction holding ``tenant``'s row of ``lock``'s table, yielded with the row.

        The row is created (with ``initial`` values) on first use. Other transactions locking
        the same tenant wait until this one commits, in this process and in every replica.
        """
        lock_table: Any = lock.__table__
        async with self.writing(), self.engine.begin() as conn:
            if self.is_sqlite:
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
            await conn.execute(
                self.insert(lock_table)
                .values(tenant=tenant, **initial)
                .on_conflict_do_nothing(index_elements=["tenant"])
            )
            # FOR UPDATE is left out on SQLite, where BEGIN IMMEDIATE already holds the lock.
            row = (
                await conn.execute(
                    select(lock_table).where(lock_table.c.tenant == tenant).with_for_update()
                )
            ).one()
            yield conn, row
