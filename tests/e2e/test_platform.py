"""What every service promises: health, reflection, service info, spans in stats, durable memory."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from testing.mesh import SERVICES, Mesh
from tests.e2e.conftest import bearer
from toolmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from toolmesh.memory.v1 import memory_pb2, memory_pb2_grpc
from toolmesh.router.v1 import router_pb2, router_pb2_grpc
from toolmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc

pytestmark = pytest.mark.e2e

FULL_NAMES = {
    "gateway": "toolmesh.gateway.v1.Gateway",
    "auth": "toolmesh.auth.v1.Auth",
    "router": "toolmesh.router.v1.Router",
    "memory": "toolmesh.memory.v1.Memory",
    "telemetry": "toolmesh.telemetry.v1.Telemetry",
}
INFO = {
    "gateway": (gateway_pb2_grpc.GatewayStub, gateway_pb2.GetServiceInfoRequest),
    "auth": (auth_pb2_grpc.AuthStub, auth_pb2.GetServiceInfoRequest),
    "router": (router_pb2_grpc.RouterStub, router_pb2.GetServiceInfoRequest),
    "memory": (memory_pb2_grpc.MemoryStub, memory_pb2.GetServiceInfoRequest),
    "telemetry": (telemetry_pb2_grpc.TelemetryStub, telemetry_pb2.GetServiceInfoRequest),
}


@pytest.mark.parametrize("service", SERVICES)
def test_health_reflection_and_service_info(mesh: Mesh, service: str, token: str) -> None:
    # As the operator identity, which auth allows; router and memory allow only the gateway.
    identity = "operator" if service in ("auth", "gateway", "telemetry") else "gateway"
    with mesh.channel(service, identity) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", FULL_NAMES[service]):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {FULL_NAMES[service], "grpc.health.v1.Health"} <= services
        stub_class, request_class = INFO[service]
        # The gateway authenticates everything but IssueToken; inner services trust the mesh.
        metadata = bearer(token) if service == "gateway" else ()
        info = (
            stub_class(channel).GetServiceInfo(request_class(), metadata=metadata, timeout=5).info
        )
    assert info.service == service
    assert f"toolmesh.{service}.v1" in info.contract_versions
    assert info.build_version


def test_runs_reach_stats_by_route_and_tool(
    gateway: gateway_pb2_grpc.GatewayStub, token: str
) -> None:
    """Statistics come from the gateway's one record per request, not from spans (which any
    mesh peer may export): the router's InvokeTool is in the Run's trace, and in the stats
    only as the tool the request invoked."""
    trace_ids = [
        gateway.Run(
            gateway_pb2.RunRequest(session_id="stats", prompt="what is 6 * 7"),
            metadata=bearer(token),
            timeout=10,
        ).trace_id
        for _ in range(3)
    ]
    deadline = time.monotonic() + 20
    routes: dict[tuple[str, str], int] = {}
    tools: dict[str, int] = {}
    while time.monotonic() < deadline:
        by_route = gateway.GetStats(
            gateway_pb2.GetStatsRequest(group_by=telemetry_pb2.STATS_GROUP_BY_ROUTE),
            metadata=bearer(token),
            timeout=10,
        )
        by_tool = gateway.GetStats(
            gateway_pb2.GetStatsRequest(group_by=telemetry_pb2.STATS_GROUP_BY_TOOL),
            metadata=bearer(token),
            timeout=10,
        )
        routes = {(row.service, row.route): row.count for row in by_route.rows}
        tools = {row.tool_name: row.count for row in by_tool.rows}
        run_route = ("toolmesh-gateway", "/toolmesh.gateway.v1.Gateway/Run")
        if routes.get(run_route, 0) >= 3 and tools.get("calculator", 0) >= 3:
            break
        time.sleep(0.5)
    assert routes.get(("toolmesh-gateway", "/toolmesh.gateway.v1.Gateway/Run"), 0) >= 3, routes
    assert {service for service, _ in routes} == {"toolmesh-gateway"}, routes
    assert tools.get("calculator", 0) >= 3, tools
    for row in by_route.rows:
        assert row.p50_ms <= row.p95_ms <= row.p99_ms
        assert 0.0 <= row.error_rate <= 1.0
    invoke = ("toolmesh-router", "/toolmesh.router.v1.Router/InvokeTool")
    for trace_id in trace_ids:
        while True:
            try:
                spans = gateway.GetTrace(
                    gateway_pb2.GetTraceRequest(trace_id=trace_id),
                    metadata=bearer(token),
                    timeout=10,
                ).spans
            except grpc.RpcError as err:  # not stored yet: spans arrive in batches
                assert err.code() == grpc.StatusCode.NOT_FOUND, err
                spans = []
            if invoke in {(span.service, span.route) for span in spans}:
                break
            assert time.monotonic() < deadline, f"no router InvokeTool span in {trace_id}"
            time.sleep(0.5)


def test_stats_need_ops_scope(mesh: Mesh, gateway: gateway_pb2_grpc.GatewayStub) -> None:
    tools_only = mesh.token(scopes=("tools:read",))
    with pytest.raises(grpc.RpcError) as err:
        gateway.GetStats(
            gateway_pb2.GetStatsRequest(group_by=telemetry_pb2.STATS_GROUP_BY_ROUTE),
            metadata=bearer(tools_only),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_history_survives_a_memory_restart(
    mesh: Mesh, gateway: gateway_pb2_grpc.GatewayStub, token: str
) -> None:
    session = f"restart-{uuid.uuid4().hex[:8]}"
    gateway.Run(
        gateway_pb2.RunRequest(session_id=session, prompt="what is 12 * 12"),
        metadata=bearer(token),
        timeout=10,
    )
    assert mesh.stop("memory") == 0  # SIGTERM drains and exits cleanly
    mesh.start("memory")
    deadline = time.monotonic() + 10
    while True:
        try:
            history = gateway.GetHistory(
                gateway_pb2.GetHistoryRequest(session_id=session),
                metadata=bearer(token),
                timeout=5,
            )
            break
        except grpc.RpcError:
            # The gateway's channel reconnects with backoff after the restart.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert history.turns[0].content == "what is 12 * 12"
    assert "144" in history.turns[1].content


@pytest.mark.parametrize("service", ["auth", "router", "memory", "telemetry"])
def test_inner_services_refuse_plaintext(mesh: Mesh, service: str) -> None:
    with grpc.insecure_channel(mesh.target(service)) as channel:
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_memory_trusts_caller_identity_only_from_the_gateway(mesh: Mesh) -> None:
    from toolmesh.common.v1 import common_pb2

    request = memory_pb2.GetHistoryRequest(
        caller=common_pb2.Caller(subject="dev", tenant="dev"), session_id="anything"
    )
    with mesh.channel("memory", identity="router") as channel:
        with pytest.raises(grpc.RpcError) as err:
            memory_pb2_grpc.MemoryStub(channel).GetHistory(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with mesh.channel("memory", identity="gateway") as channel:
        memory_pb2_grpc.MemoryStub(channel).GetHistory(request, timeout=5)
