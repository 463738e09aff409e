"""An in-process mesh for the model path: the real gateway, router, memory and telemetry on port 0
(SQLite in a temp dir), the router pointed at a model server; auth is the gateway tests'
contract fake, so tests mint their own tokens (and scopes)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpc import aio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.kit.channels import open_channel
from services.kit.server import Cleanup, Running, start
from services.kit.settings import ServiceSettings
from services.memory.app import build as build_memory
from services.memory.settings import MemorySettings
from services.router.app import build as build_router
from services.router.settings import RouterSettings
from services.telemetry.app import build as build_telemetry
from services.telemetry.settings import TelemetrySettings
from tests.unit.gateway.conftest import GatewayUnderTest, bearer, start_gateway_on
from tests.unit.gateway.fakes import Fakes
from toolmesh.common.v1 import common_pb2
from toolmesh.gateway.v1 import gateway_pb2
from toolmesh.router.v1 import router_pb2_grpc
from toolmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc


@dataclass
class ModelMesh:
    gateway: GatewayUnderTest
    telemetry: telemetry_pb2_grpc.TelemetryStub
    router: router_pb2_grpc.RouterStub
    spans: InMemorySpanExporter
    # host:port of the gateway, for the CLI.
    target: str

    def metadata(self, **claims: Any) -> tuple[tuple[str, str], ...]:
        return bearer(self.gateway.token(**claims))

    async def run(
        self, prompt: str, *, session: str = "s1", timeout: float = 30, **claims: Any
    ) -> gateway_pb2.RunResponse:
        reply: gateway_pb2.RunResponse = await self.gateway.stub.Run(
            gateway_pb2.RunRequest(session_id=session, prompt=prompt),
            metadata=self.metadata(**claims),
            timeout=timeout,
        )
        return reply

    async def set_token_budget(self, tokens: int, tenant: str = "acme") -> None:
        await self.telemetry.SetBudget(
            telemetry_pb2.SetBudgetRequest(
                caller=common_pb2.Caller(tenant=tenant, subject="ops", scopes=["admin"]),
                period=telemetry_pb2.BUDGET_PERIOD_DAY,
                limits=telemetry_pb2.BudgetAmounts(tokens=tokens),
            ),
            timeout=5,
        )

    async def budget(self, tenant: str = "acme") -> telemetry_pb2.BudgetStatus:
        reply = await self.telemetry.ListBudgets(
            telemetry_pb2.ListBudgetsRequest(caller=common_pb2.Caller(tenant=tenant)), timeout=5
        )
        return reply.budgets[0]


@asynccontextmanager
async def model_mesh(
    data_dir: Path,
    tenants: dict[str, list[str]] | None = None,
    gateway_settings: dict[str, object] | None = None,
    **router: Any,
) -> AsyncIterator[ModelMesh]:
    """The mesh with the router's settings ``router`` (model_base_url, model_name, ...), the
    gateway's ``gateway_settings`` and auth's policy giving ``tenants`` their allowed tools
    (besides the fakes' own)."""
    running: list[Running] = []
    channels: list[aio.Channel] = []

    async def serve(settings: ServiceSettings, build: Any, **hooks: Any) -> Running:
        cleanups: list[Cleanup] = []
        server = await start(settings, build(settings, cleanups, **hooks))
        server.cleanups.extend(cleanups)
        running.append(server)
        return server

    fakes = Fakes()
    fakes.auth.tenants.update(tenants or {})
    try:
        inner = await start(ServiceSettings(port=0), fakes.register)
        running.append(inner)
        telemetry = await serve(
            TelemetrySettings(port=0, data_dir=data_dir / "telemetry", otlp_endpoint=""),
            build_telemetry,
        )
        telemetry_target = f"127.0.0.1:{telemetry.port}"
        memory = await serve(
            MemorySettings(port=0, data_dir=data_dir / "memory", otlp_endpoint=""), build_memory
        )
        spans = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(spans))
        router_server = await serve(
            RouterSettings(
                port=0,
                data_dir=data_dir / "router",
                telemetry_target=telemetry_target,
                otlp_endpoint="",
                **router,
            ),
            build_router,
            tracer_provider=provider,
        )
        gateway, channel, under_test = await start_gateway_on(
            inner.port,
            fakes,
            router_target=f"127.0.0.1:{router_server.port}",
            memory_target=f"127.0.0.1:{memory.port}",
            telemetry_target=telemetry_target,
            prices_refresh_s=0.2,
            budget_state_ttl_s=0.2,
            **(gateway_settings or {}),
        )
        running.append(gateway)
        channels.append(channel)
        await under_test.wait_ready()
        telemetry_channel = open_channel(telemetry_target)
        router_channel = open_channel(f"127.0.0.1:{router_server.port}")
        channels += [telemetry_channel, router_channel]
        yield ModelMesh(
            under_test,
            telemetry_pb2_grpc.TelemetryStub(telemetry_channel),
            router_pb2_grpc.RouterStub(router_channel),
            spans,
            f"127.0.0.1:{gateway.port}",
        )
    finally:
        for channel in channels:
            await channel.close()
        for server in reversed(running):
            await server.stop(0)
