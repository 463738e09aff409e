"""The gateway's durable outbox: writes that must not be lost, replayed until delivered.

One SQLite file, ``<data_dir>/gateway-outbox.db`` (services.kit.outbox). Every item is a
serialized protobuf request of the receiving service's contract, so replay is "parse, send":

- kind ``memory``: payload ``toolmesh.memory.v1.AppendTurnsRequest``, key
  ``memory:<request id>``, delivered by memory.AppendTurns.
- kind ``usage``: payload ``toolmesh.telemetry.v1.UsageRecord``, key ``usage:<request id>``,
  delivered in batches by telemetry.RecordUsage (de-duplicated by tenant and request id).
- kind ``audit``: payload ``toolmesh.telemetry.v1.AuditEvent``, key ``audit:<event id>``,
  delivered in batches by telemetry.AppendAudit (de-duplicated by tenant and event id).

A Run's items (its usage record, its audit events, and its turns when memory could not take
them) are committed together with ``put_many``: one transaction, one fsync, before the answer.
Receivers de-duplicate by the item's own key, so a replay after a crash between delivery and
deletion stores nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

from google.protobuf.message import Message

from gateway.reliability import stop_tasks
from services.kit.outbox import Item, Outbox, Pending, Relay

log = logging.getLogger("toolmesh.gateway.outbox")

KIND_MEMORY = "memory"
KIND_USAGE = "usage"
KIND_AUDIT = "audit"
FILE_NAME = "gateway-outbox.db"

M = TypeVar("M", bound=Message)


class GatewayOutbox:
    """Typed puts and per-kind delivery routes over the kit's Outbox and Relay."""

    def __init__(
        self,
        data_dir: Path,
        *,
        idle_s: float = 0.5,
        base_backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
    ) -> None:
        self.path = data_dir / FILE_NAME
        self.store = Outbox(self.path)
        self.relay = Relay(
            self.store, idle_s=idle_s, base_backoff_s=base_backoff_s, max_backoff_s=max_backoff_s
        )
        self._task: asyncio.Task[None] | None = None
        # Group commit: puts arriving while a commit runs share the next transaction (and its
        # fsync), so a burst of Runs falling back at once does not queue one fsync per Run.
        self._waiting: list[tuple[Item, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def open(self) -> None:
        await self.store.open()

    def start(self) -> None:
        self._task = asyncio.create_task(self.relay.run(), name="outbox-relay")

    async def close(self) -> None:
        if self._task is not None:
            await stop_tasks([self._task])
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        await self.store.close()

    async def put(self, kind: str, key: str, message: Message) -> None:
        """Commit durably (fsync'd) before returning; a key already queued is kept as is.

        Cancelling the caller does not cancel the commit (it may still land: the item was then
        never acknowledged, and the receiver de-duplicates a retry by key)."""
        await self.put_many([(kind, key, message)])

    async def put_many(self, entries: Sequence[tuple[str, str, Message]]) -> None:
        """Commit ``(kind, key, message)`` entries in one transaction, as ``put`` does one."""
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

    def route(
        self,
        kind: str,
        message_type: type[M],
        send: Callable[[M], Awaitable[object]],
        batch: int = 50,
    ) -> None:
        """Deliver items of ``kind`` with ``send``, one by one in queue order; a failure retries
        the batch later with backoff (items already sent are de-duplicated by the receiver)."""

        async def deliver(pending: list[Pending]) -> None:
            for item in pending:
                await send(message_type.FromString(item.payload))
            log.info("outbox delivered", extra={"kind": kind, "items": len(pending)})

        self.relay.route(kind, deliver, batch)

    def route_batch(
        self,
        kind: str,
        message_type: type[M],
        send: Callable[[list[M]], Awaitable[object]],
        batch: int = 200,
    ) -> None:
        """Deliver up to ``batch`` items of ``kind`` per ``send`` call (a batch RPC such as
        RecordUsage); a failure retries the batch later with backoff."""

        async def deliver(pending: list[Pending]) -> None:
            await send([message_type.FromString(item.payload) for item in pending])
            log.info("outbox delivered", extra={"kind": kind, "items": len(pending)})

        self.relay.route(kind, deliver, batch)
