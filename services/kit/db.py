"""SQLAlchemy 2 async engines: SQLite (WAL) by default, PostgreSQL by URL."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from services.kit.durability import Synchronous, checked


def sqlite_url(data_dir: Path, name: str) -> str:
    return f"sqlite:///{(data_dir / f'{name}.db').resolve()}"


def async_url(url: str) -> str:
    """Pick the async driver for a plain URL: aiosqlite for SQLite, psycopg 3 for PostgreSQL."""
    parsed = make_url(url)
    if parsed.drivername in ("sqlite", "sqlite+aiosqlite"):
        return parsed.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    raise ValueError(f"unsupported database driver {parsed.drivername!r}; use sqlite or postgresql")


def _sqlite_pragmas_with(synchronous: Synchronous) -> Callable[[Any, Any], None]:
    """The connect hook with ``synchronous`` (services.kit.durability)."""
    synchronous = checked(synchronous)

    def pragmas(dbapi_connection: Any, record: Any) -> None:
        _sqlite_pragmas(dbapi_connection, record, synchronous)

    return pragmas


def _sqlite_pragmas(dbapi_connection: Any, _record: Any, synchronous: Synchronous = "FULL") -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=5000")
    # Switching to WAL needs an exclusive lock and ignores busy_timeout, so two processes
    # opening a new file together could fail: switch only when not in WAL yet, and retry.
    for attempt in range(50):
        cursor.execute("PRAGMA journal_mode")
        mode = cursor.fetchone()[0]
        if str(mode).lower() == "wal":
            break
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
        except Exception:  # sqlite3.OperationalError: database is locked
            if attempt == 49:
                raise
            time.sleep(0.05)
    # FULL (the default): an acknowledged write survives power loss, not only a process
    # crash; NORMAL only the latter (services.kit.durability).
    cursor.execute(f"PRAGMA synchronous={synchronous}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_engine(
    url: str, *, pool_size: int = 10, synchronous: Synchronous = "FULL"
) -> AsyncEngine:
    """``synchronous`` applies to SQLite only (PostgreSQL's durability is its own setting)."""
    full = async_url(url)
    if full.startswith("sqlite"):
        Path(make_url(full).database or "").parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(full)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas_with(synchronous))
        return engine
    return create_async_engine(
        full, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
    )


def sync_url(url: str) -> str:
    """The blocking driver for a plain URL: pysqlite for SQLite, psycopg 3 for PostgreSQL."""
    parsed = make_url(url)
    if parsed.drivername in ("sqlite", "sqlite+aiosqlite", "sqlite+pysqlite"):
        return parsed.set(drivername="sqlite+pysqlite").render_as_string(hide_password=False)
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    raise ValueError(f"unsupported database driver {parsed.drivername!r}; use sqlite or postgresql")


def create_sync_engine(
    url: str, *, pool_size: int = 10, synchronous: Synchronous = "FULL"
) -> Engine:
    """A blocking engine, for hot paths that run a whole transaction on a worker thread.

    With aiosqlite every statement is a hop to its thread and back; one hop per transaction
    is several times faster for the short transactions of the request path.
    """
    full = sync_url(url)
    if full.startswith("sqlite"):
        Path(make_url(full).database or "").parent.mkdir(parents=True, exist_ok=True)
        engine = sa_create_engine(full, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas_with(synchronous))
        return engine
    return sa_create_engine(full, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)
