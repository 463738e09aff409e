"""Inner-service trust with real certificates: only the gateway speaks for tenants.

A real telemetry server with mutual TLS (certificates from services.kit.certs.make_all) and
clients presenting the router's, memory's or the gateway's certificate. With the router's
certificate nothing tenant-scoped can be read or written, and spans it exports claiming a
tenant neither make a trace readable by that tenant nor move the tool health the router
routes on.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc import aio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from services.kit.certs import make_all
from services.kit.channels import open_channel
from services.kit.tls import TlsFiles
from services.router.health import ToolHealth
from services.telemetry.settings import TelemetrySettings
from toolmesh.telemetry.v1 import telemetry_pb2 as G
from toolmesh.telemetry.v1 import telemetry_pb2_grpc

from .conftest import TelemetryServer
from .helpers import OPERATOR, caller, request_record
from .test_audit import event
from .test_telemetry import export_request, rpc_span, tool_span

RUN = "/toolmesh.gateway.v1.Gateway/Run"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    make_all(out)
    return out


class Peer:
    """Stubs of telemetry's two services as one mesh identity."""

    def __init__(self, address: str, certs: Path, name: str) -> None:
        files = TlsFiles.load(certs / f"{name}.pem", certs / f"{name}.key", certs / "ca.pem")
        self.channel = open_channel(address, credentials=files.channel_credentials())
        self.stub = telemetry_pb2_grpc.TelemetryStub(self.channel)
        self.otlp = trace_service_pb2_grpc.TraceServiceStub(self.channel)


async def start(tmp_path: Path, certs: Path, **extra: object) -> TelemetryServer:
    settings = TelemetrySettings(
        port=0,
        data_dir=tmp_path,
        tls_cert_file=certs / "telemetry.pem",
        tls_key_file=certs / "telemetry.key",
        tls_ca_file=certs / "ca.pem",
        **extra,
    )
    return await TelemetryServer(settings).start()


@pytest.fixture
async def mesh(tmp_path: Path, certs: Path) -> AsyncIterator[dict[str, Peer]]:
    server = await start(tmp_path, certs)
    peers = {name: Peer(server.address, certs, name) for name in ("gateway", "router", "memory")}
    yield peers
    for peer in peers.values():
        await peer.channel.close()
    await server.stop()


def tenant_calls(stub: telemetry_pb2_grpc.TelemetryStub) -> dict[str, Callable[[], Awaitable]]:
    """Every RPC that writes or reads a tenant's data, with a well-formed request."""
    victim = caller("victim")
    return {
        "AppendAudit": lambda: stub.AppendAudit(
            G.AppendAuditRequest(events=[event("forged", tenant="victim")])
        ),
        "SetBudget": lambda: stub.SetBudget(
            G.SetBudgetRequest(
                caller=victim, period=G.BUDGET_PERIOD_DAY, limits=G.BudgetAmounts(tool_calls=1)
            )
        ),
        "RecordUsage": lambda: stub.RecordUsage(
            G.RecordUsageRequest(records=[request_record("billed", 5, tenant="victim")])
        ),
        "GetCost": lambda: stub.GetCost(G.GetCostRequest(caller=victim)),
        "GetTrace": lambda: stub.GetTrace(G.GetTraceRequest(caller=victim, trace_id="ab" * 16)),
        "ListAudit": lambda: stub.ListAudit(G.ListAuditRequest(caller=victim)),
        "VerifyAudit": lambda: stub.VerifyAudit(G.VerifyAuditRequest(caller=victim)),
        "CheckpointAudit": lambda: stub.CheckpointAudit(G.CheckpointAuditRequest(caller=victim)),
        "GetStats": lambda: stub.GetStats(G.GetStatsRequest(caller=victim, group_by=1)),
        "ReserveBudget": lambda: stub.ReserveBudget(
            G.ReserveBudgetRequest(caller=victim, request_id="r", tool_calls=1)
        ),
        "ListBudgets": lambda: stub.ListBudgets(G.ListBudgetsRequest(caller=victim)),
    }


@pytest.mark.parametrize("intruder", ["router", "memory"])
async def test_other_mesh_peers_cannot_act_for_a_tenant(
    mesh: dict[str, Peer], intruder: str
) -> None:
    for name, call in tenant_calls(mesh[intruder].stub).items():
        with pytest.raises(aio.AioRpcError) as caught:
            await call()
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
        details = caught.value.details() or ""
        if intruder == "router" and name == "AppendAudit":
            # The router appends its own tool.drift events, and nothing else.
            assert details == "events[0]: peer router may not append tool.write events"
        else:
            assert f"peer {intruder} may not call {name}" == details
    # Nothing reached the victim's data; the gateway itself may make every one of these calls.
    gateway = mesh["gateway"].stub
    assert (await gateway.ListAudit(G.ListAuditRequest(caller=caller("victim")))).events == []
    assert (await gateway.GetCost(G.GetCostRequest(caller=caller("victim")))).rows == []
    assert (await gateway.ListBudgets(G.ListBudgetsRequest(caller=caller("victim")))).budgets == []
    for name, call in tenant_calls(gateway).items():
        try:
            await call()
        except aio.AioRpcError as error:
            # Answers of the RPC itself (an unknown trace, a budget now exhausted), not refusals.
            assert error.code() in (
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            ), name


async def test_tool_health_is_the_routers_alone(mesh: dict[str, Peer]) -> None:
    reply = await mesh["router"].stub.GetToolHealth(G.GetToolHealthRequest())
    assert list(reply.tools) == []
    for name in ("gateway", "memory"):
        with pytest.raises(aio.AioRpcError) as caught:
            await mesh[name].stub.GetToolHealth(G.GetToolHealthRequest())
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_spans_from_the_router_claim_no_tenant_and_move_no_health(
    mesh: dict[str, Peer],
) -> None:
    router, gateway = mesh["router"], mesh["gateway"]
    forged = os.urandom(16)
    claims = [
        rpc_span(RUN, 5, trace_id=forged, toolmesh__tenant="victim"),
        *(tool_span("calc", "1.0.0", 3, error=True, trace_id=forged) for _ in range(20)),
    ]
    await router.otlp.Export(export_request("toolmesh-router", claims))
    with pytest.raises(aio.AioRpcError) as caught:
        await gateway.stub.GetTrace(
            G.GetTraceRequest(caller=caller("victim"), trace_id=forged.hex())
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    spans = (
        await gateway.stub.GetTrace(G.GetTraceRequest(caller=OPERATOR, trace_id=forged.hex()))
    ).spans
    assert {(s.tenant, s.exporter) for s in spans} == {("", "router")}
    # The claim is kept for forensics, as an attribute that attributes nothing.
    assert json.loads(spans[0].attributes_json)["toolmesh.tenant"] == "victim"

    health = ToolHealth(router.channel, refresh_s=5, window_s=900)
    assert await health.refresh()
    assert health("calc", "1.0.0") == 1.0

    # The gateway's own spans and records do count.
    genuine = os.urandom(16)
    await gateway.otlp.Export(
        export_request(
            "toolmesh-gateway", [rpc_span(RUN, 5, trace_id=genuine, toolmesh__tenant="victim")]
        )
    )
    (span,) = (
        await gateway.stub.GetTrace(
            G.GetTraceRequest(caller=caller("victim"), trace_id=genuine.hex())
        )
    ).spans
    assert (span.tenant, span.exporter) == ("victim", "gateway")
    failures = [
        request_record(
            f"r{i}",
            5,
            tenant="victim",
            tool=("calc", "1.0.0"),
            tool_outcome=G.TOOL_OUTCOME_FAILED if i < 3 else G.TOOL_OUTCOME_OK,
            tool_ms=3,
        )
        for i in range(4)
    ]
    await gateway.stub.RecordUsage(G.RecordUsageRequest(records=failures))
    assert await health.refresh()
    assert health("calc", "1.0.0") == pytest.approx(0.25)


async def test_an_alias_makes_another_certificate_the_gateway(tmp_path: Path, certs: Path) -> None:
    """peer_aliases maps certificate names to roles; span trust follows the same mapping."""
    server = await start(tmp_path, certs, peer_aliases="memory=gateway")
    aliased = Peer(server.address, certs, "memory")
    try:
        trace_id = os.urandom(16)
        await aliased.otlp.Export(
            export_request(
                "toolmesh-gateway", [rpc_span(RUN, 5, trace_id=trace_id, toolmesh__tenant="acme")]
            )
        )
        (span,) = (
            await aliased.stub.GetTrace(G.GetTraceRequest(caller=caller(), trace_id=trace_id.hex()))
        ).spans
        assert (span.tenant, span.exporter) == ("acme", "memory")
    finally:
        await aliased.channel.close()
        await server.stop()


async def test_the_router_appends_only_its_own_drift_events(mesh: dict[str, Peer]) -> None:
    router = mesh["router"].stub
    drift = event("drift-1", tenant="victim", action="tool.drift")
    assert (await router.AppendAudit(G.AppendAuditRequest(events=[drift]))).stored == 1
    with pytest.raises(aio.AioRpcError) as caught:
        await router.AppendAudit(G.AppendAuditRequest(events=[event("write-1", tenant="victim")]))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
