"""A durable outbox: writes that must not be lost wait in storage that outlives the process.

The sender commits an item here before acknowledging its own caller, then a relay delivers
items in batches with exponential backoff and jitter. Receivers de-duplicate by the item's
key, so delivering twice (a crash between delivery and ``done``) is harmless: at least once
here, exactly once there. An item its receiver refuses for good (its own content is bad, not
the receiver's health) is never dropped silently: it moves to the dead-letter table, with a
metric, an error log and a hook its owner uses to say so where it matters (the audit chain).

Layers: a store (``OutboxStore``) keeps the items: ``Outbox`` is a local SQLite file (the dev
default), services.kit.outbox_table.TableOutbox a table in the service's own database (what
production uses, so items outlive the pod, not only the process); ``Relay`` delivers per kind;
``MessageOutbox`` is what a service uses — protobuf messages by kind, group commit (puts
arriving while a commit runs share the next transaction and its fsync), typed delivery routes.

``Outbox`` uses the standard library's sqlite3 on one dedicated thread rather than SQLAlchemy:
it is a local queue file, not a shared schema, and one thread keeps every access serialized.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from google.protobuf.message import Message
from opentelemetry.metrics import CallbackOptions, Observation

from services.kit.durability import Synchronous, checked
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
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL,
    reason TEXT NOT NULL,
    dead_at REAL NOT NULL
);
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


@dataclass(frozen=True)
class DeadLetter:
    id: int
    kind: str
    key: str
    payload: bytes
    reason: str
    dead_at: float


class OutboxStore(Protocol):
    """Where items wait: ``due`` hands out items in queue order (a shared store also leases
    them, so replicas relaying one table do not send the same items at the same time)."""

    depths: dict[str, int]

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def put(self, items: Sequence[Item]) -> None: ...
    async def due(self, kind: str, limit: int) -> list[Pending]: ...
    async def done(self, ids: Sequence[int]) -> None: ...
    async def retry_later(self, ids: Sequence[int], error: str, delay_s: float) -> None: ...
    async def make_due(self, kind: str) -> None: ...
    async def dead_letter(self, refused: Sequence[tuple[int, str]]) -> None: ...
    async def dead_letters(self, kind: str = "") -> list[DeadLetter]: ...
    async def refresh_depths(self) -> dict[str, int]: ...


class Outbox:
    """The local file store (one process owns the file)."""

    def __init__(self, path: Path, *, synchronous: Synchronous = "FULL") -> None:
        self._path = path
        self._synchronous = checked(synchronous)
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
            # FULL (default): an item the caller was told about survives power loss; NORMAL
            # only a crash of the process (services.kit.db.Synchronous).
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
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
        """Delete delivered items: one transaction, without an fsync of its own.

        A delete lost to a power loss only delivers its items again, which receivers
        de-duplicate; WAL with synchronous=NORMAL never corrupts the file, and the next put's
        FULL commit syncs the WAL, this delete included."""
        if not ids:
            return

        def delete(conn: sqlite3.Connection) -> list[str]:
            conn.execute("PRAGMA synchronous=NORMAL")
            try:
                with conn:
                    conn.execute("BEGIN IMMEDIATE")
                    # Only placeholders are formatted in; the ids are bound.
                    query = f"DELETE FROM outbox WHERE id IN ({_marks(len(ids))}) RETURNING kind"  # noqa: S608
                    return [kind for (kind,) in conn.execute(query, list(ids))]
            finally:
                conn.execute(f"PRAGMA synchronous={self._synchronous}")

        self._forget(await self._run(delete))

    def _forget(self, kinds: list[str]) -> None:
        for kind in kinds:
            self.depths[kind] = max(0, self.depths.get(kind, 0) - 1)

    async def retry_later(self, ids: Sequence[int], error: str, delay_s: float) -> None:
        at = time.time() + delay_s

        def update(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                marks = _marks(len(ids))
                query = f"UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? WHERE id IN ({marks})"  # noqa: S608, E501
                conn.execute(query, [at, error[:500], *ids])

        await self._run(update)

    async def make_due(self, kind: str) -> None:
        """Every item of ``kind`` waiting out a retry backoff is due now (its receiver is back)."""
        now = time.time()

        def update(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute(
                    "UPDATE outbox SET next_attempt_at = ? WHERE kind = ? AND next_attempt_at > ?",
                    (now, kind, now),
                )

        await self._run(update)

    async def dead_letter(self, refused: Sequence[tuple[int, str]]) -> None:
        """Move items their receiver refused for good to the dead-letter table, with why."""
        now = time.time()

        def move(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                for item_id, reason in refused:
                    conn.execute(
                        "INSERT INTO dead_letters"
                        " (id, kind, key, payload, created_at, attempts, reason, dead_at)"
                        " SELECT id, kind, key, payload, created_at, attempts, ?, ?"
                        " FROM outbox WHERE id = ?",
                        (reason[:2000], now, item_id),
                    )
                    conn.execute("DELETE FROM outbox WHERE id = ?", (item_id,))

        await self._run(move)
        await self.refresh_depths()

    async def dead_letters(self, kind: str = "") -> list[DeadLetter]:
        """What was set aside (all kinds, or one), oldest first."""

        def select(conn: sqlite3.Connection) -> list[DeadLetter]:
            query = "SELECT id, kind, key, payload, reason, dead_at FROM dead_letters"
            rows = (
                conn.execute(query + " WHERE kind = ? ORDER BY id", (kind,))
                if kind
                else conn.execute(query + " ORDER BY id")
            )
            return [DeadLetter(*row) for row in rows.fetchall()]

        return await self._run(select)

    async def refresh_depths(self) -> dict[str, int]:
        def count(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute("SELECT kind, COUNT(*) FROM outbox GROUP BY kind").fetchall()
            return dict(rows)

        counted = await self._run(count)
        self.depths = {kind: counted.get(kind, 0) for kind in {*self.depths, *counted}}
        return self.depths


def _marks(count: int) -> str:
    """``?, ?, ...``: the placeholders of an IN list (batches stay far below SQLite's limit)."""
    return ", ".join("?" * count)


# Delivers a batch; returns the items the receiver refused for good, with the reason (they go
# to the dead-letter table); raises when the batch should be retried later.
Deliver = Callable[[list[Pending]], Awaitable[list[tuple[Pending, str]]]]
# Told about each dead letter (after it was set aside), e.g. to leave a notice elsewhere.
OnDeadLetter = Callable[[Pending, str], Awaitable[None]]


@dataclass
class _Route:
    deliver: Deliver
    batch: int
    on_dead_letter: OnDeadLetter | None = None
    failures: int = 0


class Relay:
    """Delivers queued items per kind in batches; backs off per kind while a receiver is down.

    ``batch_window_s``: after a delivery that filled no batch, wait this long before the next
    one, so that under steady load each delivery (a claim, a send, a delete) takes the items
    of a window rather than the one or two that arrived since the last; a full batch goes
    again at once. Items then reach their receiver up to this much later."""

    def __init__(
        self,
        outbox: OutboxStore,
        *,
        idle_s: float = 0.5,
        batch_window_s: float = 0.0,
        base_backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
    ) -> None:
        self._outbox = outbox
        self._routes: dict[str, _Route] = {}
        self._idle_s = idle_s
        self._batch_window_s = batch_window_s
        self._base = base_backoff_s
        self._max = max_backoff_s
        self._wakes: dict[str, asyncio.Event] = {}
        _OUTBOXES.add(outbox)

    def route(
        self,
        kind: str,
        deliver: Deliver,
        batch: int = 100,
        on_dead_letter: OnDeadLetter | None = None,
    ) -> None:
        self._routes[kind] = _Route(deliver, batch, on_dead_letter)

    def wake(self) -> None:
        for event in self._wakes.values():
            event.set()

    def backoff_s(self, failures: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**failures)]."""
        return random.uniform(0, min(self._max, self._base * 2 ** min(failures, 16)))

    async def drain_once(self) -> int:
        """Try every kind once; returns how many items were delivered."""
        delivered = 0
        for kind, route in self._routes.items():
            delivered += (await self._drain_kind(kind, route))[0]
        return delivered

    async def _drain_kind(self, kind: str, route: _Route) -> tuple[int, bool]:
        """Deliver one batch of ``kind``: how many went, and whether the batch was full."""
        pending = await self._outbox.due(kind, route.batch)
        if not pending:
            return 0, False
        filled = len(pending) >= route.batch
        try:
            refused = await route.deliver(pending)
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
            return 0, filled
        route.failures = 0
        if refused:
            await self._set_aside(kind, route, refused)
        gone = {item.id for item, _ in refused}
        await self._outbox.done([p.id for p in pending if p.id not in gone])
        return len(pending) - len(gone), filled

    async def _set_aside(
        self, kind: str, route: _Route, refused: list[tuple[Pending, str]]
    ) -> None:
        await self._outbox.dead_letter([(item.id, reason) for item, reason in refused])
        for item, reason in refused:
            _DEAD_LETTERS.add(1, {"kind": kind})
            log.error(
                "outbox item refused by its receiver; set aside as a dead letter",
                extra={"kind": kind, "key": item.key, "reason": reason},
            )
            if route.on_dead_letter is not None:
                try:
                    await route.on_dead_letter(item, reason)
                except Exception as exc:
                    log.error(
                        "dead-letter notice failed",
                        extra={"kind": kind, "key": item.key, "error": _describe(exc)},
                    )

    async def run(self) -> None:
        """One delivery loop per kind, so a slow receiver (telemetry taking its time over a
        batch) never holds back another's replay (turns waiting for memory)."""
        async with asyncio.TaskGroup() as group:
            for kind, route in self._routes.items():
                group.create_task(self._run_kind(kind, route), name=f"relay:{kind}")

    async def _run_kind(self, kind: str, route: _Route) -> None:
        wake = self._wakes.setdefault(kind, asyncio.Event())
        busy = False
        while True:
            delivered, filled = await self._drain_kind(kind, route)
            if delivered:
                busy = True
                # A batch that was not full waits a moment for company: fewer, larger
                # deliveries (and deletes) under load.
                if self._batch_window_s > 0 and not filled:
                    await _pause(wake, self._batch_window_s)
                continue
            if busy:
                # Deletes count this process's items out; recount every replica's at rest.
                busy = False
                await self._outbox.refresh_depths()
            await _pause(wake, self._idle_s)


async def _pause(wake: asyncio.Event, seconds: float) -> None:
    """Wait ``seconds``, or less when woken."""
    wake.clear()
    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation, and a relay
    # that ignores its cancel hangs the server's shutdown.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await wake.wait()


def _describe(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            return f"{code().name}: {exc.details()}"  # type: ignore[attr-defined]
        except Exception:  # noqa: S110 - best-effort description only
            pass
    detail = str(exc)
    return f"{type(exc).__name__}: {detail[:300]}" if detail else type(exc).__name__


# Weak: an outbox belongs to a server; a process that builds several (tests do) must not keep
# every one it ever opened alive, nor report its depth.
_OUTBOXES: weakref.WeakSet[OutboxStore] = weakref.WeakSet()


def _observe_depths(_options: CallbackOptions) -> list[Observation]:
    return [
        Observation(depth, {"kind": kind})
        for outbox in list(_OUTBOXES)
        for kind, depth in outbox.depths.items()
    ]


_DEAD_LETTERS = meter().create_counter(
    "toolmesh.outbox.dead_letters",
    unit="{item}",
    description="Outbox items their receiver refused for good, set aside by kind.",
)
meter().create_observable_gauge(
    "toolmesh.outbox.depth",
    callbacks=[_observe_depths],
    description="Items waiting in the durable outbox, by kind.",
)

M = TypeVar("M", bound=Message)


class MessageOutbox:
    """Protobuf messages by kind: group-committed puts, typed delivery routes, one relay task.

    ``put_many`` returns once the entries are committed (fsync'd) in one transaction; entries
    put while a commit runs share the next one, so a burst of callers costs one fsync, not one
    each. Cancelling a caller does not cancel the commit (the item may still land: it was then
    never acknowledged, and the receiver de-duplicates a retry by key).
    """

    def __init__(
        self,
        path: Path | OutboxStore,
        *,
        synchronous: Synchronous = "FULL",
        idle_s: float = 0.5,
        batch_window_s: float = 0.0,
        base_backoff_s: float = 0.2,
        max_backoff_s: float = 2.0,
    ) -> None:
        """``path``: a local SQLite file, or a store (a table in the service's database);
        ``synchronous`` is the local file's."""
        self.path = path if isinstance(path, Path) else None
        self.store: OutboxStore = (
            Outbox(path, synchronous=synchronous) if isinstance(path, Path) else path
        )
        self._name = path.name if isinstance(path, Path) else type(path).__name__
        self.relay = Relay(
            self.store,
            idle_s=idle_s,
            batch_window_s=batch_window_s,
            base_backoff_s=base_backoff_s,
            max_backoff_s=max_backoff_s,
        )
        self._task: asyncio.Task[None] | None = None
        self._waiting: list[tuple[Item, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def open(self) -> None:
        await self.store.open()

    def start(self) -> None:
        """Start relaying, including what an earlier run left in the file."""
        self._task = asyncio.create_task(self.relay.run(), name=f"relay:{self._name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        await self.store.close()

    async def put_many(self, entries: Sequence[tuple[str, str, Message]]) -> None:
        """Commit ``(kind, key, message)`` entries in one transaction; a key already queued
        is kept as is."""
        if not entries:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Retrieve the outcome even when nobody waits any more, so it is never "unretrieved".
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        # Appended together, so the writer always takes them into the same transaction.
        for kind, key, message in entries:
            self._waiting.append((Item(kind, f"{kind}:{key}", message.SerializeToString()), done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="outbox-writer")
        await asyncio.shield(done)

    async def _write(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                await self.store.put([item for item, _ in batch])
            except Exception as exc:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)

    async def replay_now(self, *kinds: str) -> None:
        """The receiver of ``kinds`` is back: deliver what waits for it at once, not after the
        rest of its retry backoff."""
        for kind in kinds:
            await self.store.make_due(kind)
        self.relay.wake()

    def route(
        self,
        kind: str,
        message_type: type[M],
        send: Callable[[list[M]], Awaitable[list[tuple[int, str]]]],
        *,
        batch: int = 100,
        on_dead_letter: Callable[[M, str], Awaitable[None]] | None = None,
    ) -> None:
        """Deliver up to ``batch`` items of ``kind`` per ``send`` call, in queue order.

        ``send`` returns the positions (in the list it got) the receiver refused for good,
        with the reason; raising retries the whole batch later with backoff (items already
        taken are de-duplicated by the receiver)."""

        async def deliver(pending: list[Pending]) -> list[tuple[Pending, str]]:
            refused = await send([message_type.FromString(item.payload) for item in pending])
            log.info("outbox delivered", extra={"kind": kind, "items": len(pending)})
            return [(pending[index], reason) for index, reason in refused]

        async def told(item: Pending, reason: str) -> None:
            if on_dead_letter is not None:
                await on_dead_letter(message_type.FromString(item.payload), reason)

        self.relay.route(kind, deliver, batch, told if on_dead_letter else None)


async def send_splitting_refusals(
    items: list[M],
    send_all: Callable[[list[M]], Awaitable[object]],
    refusal: Callable[[Exception], str | None],
) -> list[tuple[int, str]]:
    """Send ``items`` in one call; if the receiver refuses the batch for its content
    (``refusal`` names why, else the exception propagates and the batch is retried), halve it
    and send the halves, so the items refused on their own are found in O(k log n) calls and
    every other item is delivered. Returns the refused positions with the reasons."""
    try:
        await send_all(items)
        return []
    except Exception as exc:
        reason = refusal(exc)
        if reason is None:
            raise
        if len(items) == 1:
            return [(0, reason)]
    middle = len(items) // 2
    first = await send_splitting_refusals(items[:middle], send_all, refusal)
    second = await send_splitting_refusals(items[middle:], send_all, refusal)
    return first + [(index + middle, reason) for index, reason in second]


__all__ = [
    "DeadLetter",
    "Item",
    "MessageOutbox",
    "Outbox",
    "OutboxStore",
    "Pending",
    "Relay",
    "send_splitting_refusals",
]
