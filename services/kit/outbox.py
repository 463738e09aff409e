"""A durable outbox: writes that must not be lost wait in a local SQLite file until delivered.

The sender commits an item here before acknowledging its own caller, then a relay delivers
items in batches with exponential backoff and jitter. Receivers de-duplicate by the item's
key, so delivering twice (a crash between delivery and ``done``) is harmless: at least once
here, exactly once there.

Uses the standard library's sqlite3 on one dedicated thread rather than SQLAlchemy: it is a
local queue file, not a shared schema, and one thread keeps every access serialized.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from opentelemetry.metrics import CallbackOptions, Observation

from services.kit.metrics import meter

log = logging.getLogger(__name__)
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    key TEXT NOT NULL UNIQUE,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (kind, next_attempt_at, id);
"""


@dataclass(frozen=True)
class Item:
    kind: str
    key: str
    payload: bytes


@dataclass(frozen=True)
class Pending:
    id: int
    kind: str
    key: str
    payload: bytes
    attempts: int


class Outbox:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        self._conn: sqlite3.Connection | None = None
        self.depths: dict[str, int] = {}

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            assert self._conn is not None, "outbox not opened"
            return fn(self._conn)

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: an item the caller was told about survives power loss.
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            return conn

        self._conn = await asyncio.get_running_loop().run_in_executor(self._executor, connect)
        await self.refresh_depths()

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(lambda conn: conn.close())
            self._conn = None
        self._executor.shutdown(wait=True)

    async def put(self, items: Sequence[Item]) -> None:
        """Commit ``items`` durably in one transaction; a key already queued is kept as is."""
        now = time.time()

        def insert(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(
                    "INSERT OR IGNORE INTO outbox (kind, key, payload, created_at, next_attempt_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [(i.kind, i.key, i.payload, now, now) for i in items],
                )

        await self._run(insert)
        for item in items:
            self.depths[item.kind] = self.depths.get(item.kind, 0) + 1

    async def due(self, kind: str, limit: int) -> list[Pending]:
        now = time.time()

        def select(conn: sqlite3.Connection) -> list[Pending]:
            rows = conn.execute(
                "SELECT id, kind, key, payload, attempts FROM outbox"
                " WHERE kind = ? AND next_attempt_at <= ? ORDER BY id LIMIT ?",
                (kind, now, limit),
            ).fetchall()
            return [Pending(*row) for row in rows]

        return await self._run(select)

    async def done(self, ids: Sequence[int]) -> None:
        def delete(conn: sqlite3.Connection) -> None:
            with conn:
                conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

        await self._run(delete)
        await self.refresh_depths()

    async def retry_later(self, ids: Sequence[int], error: str, delay_s: float) -> None:
        at = time.time() + delay_s

        def update(conn: sqlite3.Connection) -> None:
            with conn:
                conn.executemany(
                    "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?,"
                    " last_error = ? WHERE id = ?",
                    [(at, error[:500], i) for i in ids],
                )

        await self._run(update)

    async def refresh_depths(self) -> dict[str, int]:
        def count(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute("SELECT kind, COUNT(*) FROM outbox GROUP BY kind").fetchall()
            return dict(rows)

        counted = await self._run(count)
        self.depths = {kind: counted.get(kind, 0) for kind in {*self.depths, *counted}}
        return self.depths


Deliver = Callable[[list[Pending]], Awaitable[None]]


@dataclass
class _Route:
    deliver: Deliver
    batch: int
    failures: int = 0


class Relay:
    """Delivers queued items per kind in batches; backs off per kind while a receiver is down."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        idle_s: float = 0.5,
        base_backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
    ) -> None:
        self._outbox = outbox
        self._routes: dict[str, _Route] = {}
        self._idle_s = idle_s
        self._base = base_backoff_s
        self._max = max_backoff_s
        self._wake = asyncio.Event()
        _OUTBOXES.append(outbox)

    def route(self, kind: str, deliver: Deliver, batch: int = 100) -> None:
        self._routes[kind] = _Route(deliver, batch)

    def wake(self) -> None:
        self._wake.set()

    def backoff_s(self, failures: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**failures)]."""
        return random.uniform(0, min(self._max, self._base * 2 ** min(failures, 16)))

    async def drain_once(self) -> int:
        """Try every kind once; returns how many items were delivered."""
        delivered = 0
        for kind, route in self._routes.items():
            pending = await self._outbox.due(kind, route.batch)
            if not pending:
                continue
            try:
                await route.deliver(pending)
            except Exception as exc:
                route.failures += 1
                delay = self.backoff_s(route.failures)
                await self._outbox.retry_later([p.id for p in pending], _describe(exc), delay)
                log.warning(
                    "outbox delivery failed; will retry",
                    extra={
                        "kind": kind,
                        "items": len(pending),
                        "retry_in_s": round(delay, 3),
                        "error": _describe(exc),
                    },
                )
                continue
            route.failures = 0
            await self._outbox.done([p.id for p in pending])
            delivered += len(pending)
        return delivered

    async def run(self) -> None:
        while True:
            delivered = await self.drain_once()
            if delivered:
                continue
            self._wake.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation,
            # and a relay that ignores its cancel hangs the server's shutdown.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._idle_s):
                    await self._wake.wait()


def _describe(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            return f"{code().name}: {exc.details()}"  # type: ignore[attr-defined]
        except Exception:  # noqa: S110 - best-effort description only
            pass
    return type(exc).__name__


_OUTBOXES: list[Outbox] = []


def _observe_depths(_options: CallbackOptions) -> list[Observation]:
    return [
        Observation(depth, {"kind": kind})
        for outbox in _OUTBOXES
        for kind, depth in outbox.depths.items()
    ]


meter().create_observable_gauge(
    "toolmesh.outbox.depth",
    callbacks=[_observe_depths],
    description="Items waiting in the durable outbox, by kind.",
)

__all__ = ["Item", "Outbox", "Pending", "Relay"]
