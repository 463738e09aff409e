"""Wiring of the memory service: schema check, store, housekeeping and servicer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from grpc import aio

from services.kit.migrations import check_schema
from services.kit.peers import ANY_PEER, GATEWAY, PeerRules
from services.kit.server import Cleanup, Register, Registered
from services.kit.settings import ServiceSettings
from services.memory.migrations import MIGRATIONS
from services.memory.servicer import MemoryServicer
from services.memory.settings import MemorySettings
from services.memory.store import TurnStore
from toolmesh.memory.v1 import memory_pb2, memory_pb2_grpc

log = logging.getLogger("toolmesh.memory")

SERVICE_NAME = memory_pb2.DESCRIPTOR.services_by_name["Memory"].full_name
# Turns carry a tenant: only the gateway, which authenticated the caller, may read or write.
PEER_RULES = PeerRules.for_service(
    SERVICE_NAME,
    {
        "AppendTurns": [GATEWAY],
        "GetHistory": [GATEWAY],
        "ClaimRequest": [GATEWAY],
        "ReleaseRequest": [GATEWAY],
        "GetServiceInfo": [ANY_PEER],
    },
)


async def _housekeeping(store: TurnStore, interval_s: float) -> None:
    """Delete request records past the idempotency window now and then; errors only log."""
    while True:
        try:
            deleted = await store.prune()
            if deleted:
                log.info(
                    "deleted request records past the idempotency window",
                    extra={"deleted": deleted},
                )
        except Exception:
            log.exception("deleting request records failed")
        await asyncio.sleep(interval_s)


def _background(task: asyncio.Task[None]) -> Cleanup:
    async def cancel() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return cancel


def build(
    settings: ServiceSettings,
    cleanups: list[Cleanup],
    *,
    clock: Callable[[], int] = time.time_ns,
) -> Register:
    """Open the store when the server starts (inside its event loop) and close it on stop.

    Test hook: ``clock`` (wall-clock nanoseconds) replaces the store's clock, which times
    leases, the idempotency window and turns' creation.
    """
    if not isinstance(settings, MemorySettings):
        raise TypeError("memory needs MemorySettings")

    async def register(server: aio.Server) -> Registered:
        url = settings.resolved_database_url()
        # At head, or migrated to it under the schema lock, or refused with what to run.
        await check_schema(url, MIGRATIONS, migrate_on_start=settings.migrate_on_start)
        store = TurnStore(
            url,
            idempotency_window_ns=int(settings.idempotency_window_hours * 3600 * 1e9),
            clock=clock,
            synchronous=settings.sqlite_synchronous,
            group_commit_window_s=settings.group_commit_window_ms / 1000,
        )
        cleanups.append(store.close)
        # Appended after the store's close: cleanups run in reverse, so it stops first.
        housekeeping = asyncio.create_task(_housekeeping(store, settings.housekeeping_interval_s))
        cleanups.append(_background(housekeeping))
        memory_pb2_grpc.add_MemoryServicer_to_server(MemoryServicer(settings, store), server)
        return Registered([SERVICE_NAME], peers=PEER_RULES)

    return register
