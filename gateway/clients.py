"""Channels and stubs to the inner services, with retries only where a call is idempotent."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.settings import GatewaySettings
from services.kit.channels import open_channel as kit_open_channel
from services.kit.channels import retry_policy
from toolmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from toolmesh.memory.v1 import memory_pb2, memory_pb2_grpc
from toolmesh.router.v1 import router_pb2, router_pb2_grpc
from toolmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc

log = logging.getLogger("toolmesh.gateway.clients")

# A recovery probe (the standard health check) gets this long: only the outbox relay waits for
# it, never a Run, and a dependency just resumed may first work through a backlog.
PROBE_TIMEOUT_S = 1.0

# Retried on UNAVAILABLE by the channel (exponential backoff with jitter, at most 3 attempts,
# under the channel's retryThrottling budget, and never past the call's own timeout): reads,
# and AppendTurns, which memory de-duplicates by request id. InvokeTool gets one retry (2
# attempts): the gateway only ever sends it for a read-only tool or with the write tool's
# idempotency key (the request id), so a second attempt can never act twice. IssueToken and
# the auth polls are never retried by the channel (the polls retry on their next tick).
_RETRIES = [
    retry_policy(["toolmesh.memory.v1.Memory"], methods=["GetHistory", "AppendTurns"]),
    retry_policy(["toolmesh.router.v1.Router"], methods=["Route", "ListTools"]),
    retry_policy(["toolmesh.router.v1.Router"], methods=["InvokeTool"], max_attempts=2),
    # Each is a read or is de-duplicated by telemetry (reservations by request id, usage by
    # request id, audit by event id), so a retry on another replica never counts twice.
    retry_policy(
        ["toolmesh.telemetry.v1.Telemetry"],
        methods=[
            "GetStats",
            "GetPrices",
            "GetBudgetState",
            "ReserveBudget",
            "RecordUsage",
            "AppendAudit",
        ],
    ),
]


# The calls started under the current Guard.call (see gateway.reliability).
started_calls: ContextVar[list[Any] | None] = ContextVar("started_calls", default=None)


class _CallTracker(aio.UnaryUnaryClientInterceptor):
    """Innermost interceptor: hands the real call to whoever started it.

    Through client interceptors, cancelling the task that awaits a call does not cancel the RPC
    (an interceptor awaiting ``call.code()`` is cancelled instead and the call runs on,
    orphaned, until its timeout); the Guard cancels the calls recorded here.
    """

    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        call = await continuation(client_call_details, request)
        calls = started_calls.get()
        if calls is not None:
            calls.append(call)
        return call


def open_channel(target: str, method_configs: Sequence[dict[str, Any]] = ()) -> aio.Channel:
    """The kit's channel (round robin, retries under a retryThrottling budget, mTLS when
    configured, tracing, request ids) with the call tracker innermost."""
    return kit_open_channel(target, method_configs, extra_interceptors=[_CallTracker()])


@dataclass
class Clients:
    auth: auth_pb2_grpc.AuthStub
    router: router_pb2_grpc.RouterStub
    memory: memory_pb2_grpc.MemoryStub
    telemetry: telemetry_pb2_grpc.TelemetryStub
    channels: list[aio.Channel]

    @classmethod
    def open(cls, settings: GatewaySettings) -> Clients:
        """Must run inside the event loop that will use the channels."""
        auth = open_channel(settings.auth_target)
        router = open_channel(settings.router_target, _RETRIES)
        memory = open_channel(settings.memory_target, _RETRIES)
        telemetry = open_channel(settings.telemetry_target, _RETRIES)
        return cls(
            auth=auth_pb2_grpc.AuthStub(auth),
            router=router_pb2_grpc.RouterStub(router),
            memory=memory_pb2_grpc.MemoryStub(memory),
            telemetry=telemetry_pb2_grpc.TelemetryStub(telemetry),
            channels=[auth, router, memory, telemetry],
        )

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self.channels))

    def health_probe(self, dependency: str) -> Callable[[], Awaitable[bool]]:
        """True when ``dependency`` ("memory", "telemetry" ...) answers its standard health
        check SERVING within PROBE_TIMEOUT_S (on the channel its calls use)."""
        names = ("auth", "router", "memory", "telemetry")
        stub = health_pb2_grpc.HealthStub(self.channels[names.index(dependency)])

        async def probe() -> bool:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S)
            except aio.AioRpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        return probe

    async def check_contracts(self, attempts: int = 30, interval_s: float = 2.0) -> None:
        """Log an error for each dependency that does not serve its expected major version.

        Runs in the background at start-up: dependencies may come up after the gateway, so each
        is asked until it answers or ``attempts`` run out.
        """
        checks = {
            "auth": (self.auth.GetServiceInfo, auth_pb2.GetServiceInfoRequest()),
            "router": (self.router.GetServiceInfo, router_pb2.GetServiceInfoRequest()),
            "memory": (self.memory.GetServiceInfo, memory_pb2.GetServiceInfoRequest()),
            "telemetry": (self.telemetry.GetServiceInfo, telemetry_pb2.GetServiceInfoRequest()),
        }
        pending = dict(checks)
        for _ in range(attempts):
            for name, (call, request) in list(pending.items()):
                try:
                    reply = await call(request, timeout=2)
                except aio.AioRpcError:
                    continue
                del pending[name]
                expected = f"toolmesh.{name}.v1"
                versions = list(reply.info.contract_versions)
                if expected in versions:
                    log.info(
                        "dependency contract ok",
                        extra={
                            "dependency": name,
                            "contracts": versions,
                            "build": reply.info.build_version,
                        },
                    )
                else:
                    log.error(
                        "dependency does not serve the expected contract",
                        extra={"dependency": name, "expected": expected, "contracts": versions},
                    )
            if not pending:
                return
            await asyncio.sleep(interval_s)
        log.error(
            "dependencies never answered GetServiceInfo", extra={"dependencies": sorted(pending)}
        )
