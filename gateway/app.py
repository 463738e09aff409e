"""Wires the gateway: channels, breakers, the outbox and its relay, the background auth refresh
and contract check, the servicer; health stays NOT_SERVING until auth's state has arrived."""

from __future__ import annotations

import asyncio

from grpc import aio

from gateway.accounting import Accounting, deliver_audit, deliver_usage
from gateway.authn import AuthState
from gateway.clients import Clients
from gateway.outbox import KIND_AUDIT, KIND_MEMORY, KIND_USAGE, GatewayOutbox
from gateway.reliability import Guard, stop_tasks
from gateway.service import GatewayServicer
from gateway.settings import GatewaySettings
from services.kit.breaker import BreakerConfig
from services.kit.server import Cleanup, Register, Registered
from services.kit.settings import ServiceSettings
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from toolmesh.memory.v1 import memory_pb2
from toolmesh.telemetry.v1 import telemetry_pb2

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name


def breaker_config(settings: GatewaySettings) -> BreakerConfig:
    return BreakerConfig(
        window_size=settings.breaker_window,
        minimum_calls=settings.breaker_minimum_calls,
        failure_rate_threshold=settings.breaker_failure_rate,
        slow_call_rate_threshold=settings.breaker_slow_call_rate,
        slow_call_s=settings.breaker_slow_call_s,
        open_wait_s=settings.breaker_open_s,
        half_open_calls=settings.breaker_half_open_calls,
    )


def build(settings: ServiceSettings, cleanups: list[Cleanup]) -> Register:
    """Start-up never waits for auth: health is NOT_SERVING and requests get UNAVAILABLE until
    the first state arrives. Items left in the outbox by an earlier run are replayed."""
    assert isinstance(settings, GatewaySettings)

    async def register(server: aio.Server) -> Registered:
        outbox = GatewayOutbox(
            settings.ensure_data_dir(),
            idle_s=settings.outbox_idle_s,
            base_backoff_s=settings.outbox_backoff_base_s,
            max_backoff_s=settings.outbox_backoff_max_s,
        )
        await outbox.open()
        clients = Clients.open(settings)
        guard = Guard(breaker_config(settings))
        auth_state = AuthState(clients.auth, settings)

        async def append_turns(request: memory_pb2.AppendTurnsRequest) -> object:
            return await guard.call(
                "memory", clients.memory.AppendTurns, request, settings.outbox_call_timeout_s
            )

        outbox.route(KIND_MEMORY, memory_pb2.AppendTurnsRequest, append_turns)
        # Usage records and audit events go to telemetry in batches (it de-duplicates them).
        timeout = settings.outbox_call_timeout_s
        outbox.route_batch(
            KIND_USAGE, telemetry_pb2.UsageRecord, deliver_usage(clients.telemetry, guard, timeout)
        )
        outbox.route_batch(
            KIND_AUDIT, telemetry_pb2.AuditEvent, deliver_audit(clients.telemetry, guard, timeout)
        )
        accounting = Accounting.create(clients.telemetry, guard, settings)
        tasks = [
            asyncio.create_task(auth_state.run(guard), name="auth-refresh"),
            asyncio.create_task(clients.check_contracts(), name="contract-check"),
            asyncio.create_task(accounting.prices.run(guard), name="price-refresh"),
        ]
        outbox.start()

        async def stop() -> None:
            await stop_tasks(tasks)
            await accounting.budgets.close()
            await outbox.close()
            await clients.close()

        cleanups.append(stop)
        gateway_pb2_grpc.add_GatewayServicer_to_server(
            GatewayServicer(settings, auth_state, clients, guard, outbox, accounting=accounting),
            server,
        )
        return Registered([SERVICE_NAME], ready=auth_state.wait_loaded)

    return register
