"""Wires the gateway: channels, the background auth refresh and contract check, the servicer."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from grpc import aio

from gateway.authn import AuthState
from gateway.clients import Clients
from gateway.service import GatewayServicer
from gateway.settings import GatewaySettings
from services.kit.server import Cleanup, Register
from services.kit.settings import ServiceSettings
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name


def build(settings: ServiceSettings, cleanups: list[Cleanup]) -> Register:
    """Start-up never waits for auth: requests get UNAVAILABLE until the first state arrives."""
    assert isinstance(settings, GatewaySettings)

    async def register(server: aio.Server) -> Sequence[str]:
        clients = Clients.open(settings)
        auth_state = AuthState(clients.auth, settings)
        tasks = [
            asyncio.create_task(auth_state.run(), name="auth-refresh"),
            asyncio.create_task(clients.check_contracts(), name="contract-check"),
        ]

        async def stop() -> None:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await clients.close()

        cleanups.append(stop)
        gateway_pb2_grpc.add_GatewayServicer_to_server(
            GatewayServicer(settings, auth_state, clients), server
        )
        return [SERVICE_NAME]

    return register
