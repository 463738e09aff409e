"""Wires the gateway: channels, breakers, the outbox and its relay, the background auth refresh
and contract check, the pipeline and the servicer; health stays NOT_SERVING until auth's state
has arrived."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from grpc import aio

from gateway.access import Access
from gateway.accounting import Accounting
from gateway.authn import AuthState
from gateway.backends import BackendAdmin
from gateway.clients import Clients
from gateway.operations import Operations
from gateway.outbox import open_outbox, outbox_store, watch_recovery
from gateway.pipeline import Pipeline
from gateway.reliability import Guard, stop_tasks
from gateway.servicer import GatewayServicer
from gateway.settings import GatewaySettings
from services.kit.breaker import BreakerConfig
from services.kit.server import Cleanup, Register, Registered
from services.kit.settings import ServiceSettings
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

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


def build(
    settings: ServiceSettings,
    cleanups: list[Cleanup],
    *,
    clock: Callable[[], float] = time.monotonic,
) -> Register:
    """Start-up never waits for auth: health is NOT_SERVING and requests get UNAVAILABLE until
    the first state arrives. Items left in the outbox by an earlier run are replayed.

    ``clock`` (tests) drives what is judged by elapsed time: breakers, the staleness of auth's
    state, the budget state's TTL and the audit rate limit."""
    assert isinstance(settings, GatewaySettings)

    async def register(server: aio.Server) -> Registered:
        clients = Clients.open(settings)
        guard = Guard(breaker_config(settings), clock)
        for dependency in ("memory", "telemetry"):  # the outbox's receivers
            guard.add_probe(dependency, clients.health_probe(dependency))
        try:
            store = await outbox_store(settings)
        except BaseException:
            await clients.close()  # the server never started, so no clean-up would run
            raise
        outbox = open_outbox(settings, clients, guard, store)
        await outbox.open()
        auth_state = AuthState(clients.auth, settings, clock)
        accounting = Accounting.create(clients.telemetry, guard, settings, clock)
        access = Access(settings, auth_state, outbox, accounting.auth_failures)
        pipeline = Pipeline(
            settings=settings,
            access=access,
            clients=clients,
            guard=guard,
            outbox=outbox,
            accounting=accounting,
        )
        operations = Operations(clients.telemetry, access, pipeline.deadline, guard)
        backends = BackendAdmin(clients.router, access, pipeline.deadline, guard)
        tasks = [
            asyncio.create_task(auth_state.run(guard), name="auth-refresh"),
            asyncio.create_task(clients.check_contracts(), name="contract-check"),
            asyncio.create_task(accounting.prices.run(guard), name="price-refresh"),
            asyncio.create_task(watch_recovery(guard, outbox), name="outbox-recovery"),
        ]
        outbox.start()

        async def stop() -> None:
            await stop_tasks(tasks)
            await accounting.budgets.close()
            await outbox.close()
            await clients.close()

        cleanups.append(stop)
        gateway_pb2_grpc.add_GatewayServicer_to_server(
            GatewayServicer(
                pipeline=pipeline,
                access=access,
                clients=clients,
                guard=guard,
                operations=operations,
                backends=backends,
            ),
            server,
        )
        return Registered([SERVICE_NAME], ready=auth_state.wait_loaded)

    return register
