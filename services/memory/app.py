"""Wiring of the memory service: schema check, store and servicer, for the kit's server."""

from __future__ import annotations

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

SERVICE_NAME = memory_pb2.DESCRIPTOR.services_by_name["Memory"].full_name
# Turns carry a tenant: only the gateway, which authenticated the caller, may read or write.
PEER_RULES = PeerRules.for_service(
    SERVICE_NAME,
    {
        "AppendTurns": [GATEWAY],
        "GetHistory": [GATEWAY],
        "ClaimRequest": [GATEWAY],
        "GetServiceInfo": [ANY_PEER],
    },
)


def build(settings: ServiceSettings, cleanups: list[Cleanup]) -> Register:
    """Open the store when the server starts (inside its event loop) and close it on stop."""
    if not isinstance(settings, MemorySettings):
        raise TypeError("memory needs MemorySettings")

    async def register(server: aio.Server) -> Registered:
        url = settings.resolved_database_url()
        # At head, or migrated to it under the schema lock, or refused with what to run.
        await check_schema(url, MIGRATIONS, migrate_on_start=settings.migrate_on_start)
        store = TurnStore(url)
        cleanups.append(store.close)
        memory_pb2_grpc.add_MemoryServicer_to_server(MemoryServicer(settings, store), server)
        return Registered([SERVICE_NAME], peers=PEER_RULES)

    return register
