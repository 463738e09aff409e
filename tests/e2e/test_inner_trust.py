"""Inner services take tenant data only from the peers that may speak for tenants (issue 9,
finding 1), through the real processes of the mutual-TLS mesh.

Every certificate here is signed by the mesh CA, so the TLS handshake admits each of them;
what is tested is the per-RPC rule: another mesh service's certificate (or the collector's, or
the operator's) cannot append a tenant's audit events, set or read its budget, bill it, read
its traces, or read and write its memory.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from testing.mesh import REPO, Mesh
from toolmesh.common.v1 import common_pb2
from toolmesh.memory.v1 import memory_pb2, memory_pb2_grpc
from toolmesh.router.v1 import router_pb2, router_pb2_grpc
from toolmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc

VICTIM = common_pb2.Caller(tenant="dev", subject="victim", scopes=["tools:read"])


def _telemetry_calls(stub: telemetry_pb2_grpc.TelemetryStub) -> dict[str, Callable[[], object]]:
    event = telemetry_pb2.AuditEvent(
        event_id="forged-1", tenant="dev", actor="x", action="tool.write", outcome="success"
    )
    event.occurred_at.GetCurrentTime()
    record = telemetry_pb2.UsageRecord(request_id="forged", tenant="dev", cost_units=10**6)
    record.occurred_at.GetCurrentTime()
    return {
        "AppendAudit": lambda: stub.AppendAudit(
            telemetry_pb2.AppendAuditRequest(events=[event]), timeout=10
        ),
        "SetBudget": lambda: stub.SetBudget(
            telemetry_pb2.SetBudgetRequest(
                caller=VICTIM,
                period=telemetry_pb2.BUDGET_PERIOD_DAY,
                limits=telemetry_pb2.BudgetAmounts(tool_calls=1),
            ),
            timeout=10,
        ),
        "RecordUsage": lambda: stub.RecordUsage(
            telemetry_pb2.RecordUsageRequest(records=[record]), timeout=10
        ),
        "GetCost": lambda: stub.GetCost(telemetry_pb2.GetCostRequest(caller=VICTIM), timeout=10),
        "GetTrace": lambda: stub.GetTrace(
            telemetry_pb2.GetTraceRequest(caller=VICTIM, trace_id="ab" * 16), timeout=10
        ),
        "ListAudit": lambda: stub.ListAudit(
            telemetry_pb2.ListAuditRequest(caller=VICTIM), timeout=10
        ),
        "GetStats": lambda: stub.GetStats(
            telemetry_pb2.GetStatsRequest(caller=VICTIM, group_by=1), timeout=10
        ),
    }


@pytest.mark.parametrize("intruder", ["router", "memory", "operator"])
def test_only_the_gateway_reaches_telemetrys_tenant_rpcs(mesh: Mesh, intruder: str) -> None:
    with mesh.channel("telemetry", identity=intruder) as channel:
        for name, call in _telemetry_calls(telemetry_pb2_grpc.TelemetryStub(channel)).items():
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (intruder, name)


@pytest.mark.parametrize("intruder", ["router", "telemetry", "auth", "operator"])
def test_only_the_gateway_reads_or_writes_memory(mesh: Mesh, intruder: str) -> None:
    with mesh.channel("memory", identity=intruder) as channel:
        stub = memory_pb2_grpc.MemoryStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetHistory(memory_pb2.GetHistoryRequest(caller=VICTIM, session_id="s"), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        turn = common_pb2.Turn(role=common_pb2.TURN_ROLE_USER, content="forged")
        with pytest.raises(grpc.RpcError) as err:
            stub.AppendTurns(
                memory_pb2.AppendTurnsRequest(
                    caller=VICTIM, session_id="s", request_id="r", turns=[turn]
                ),
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("intruder", ["memory", "telemetry", "operator"])
def test_only_the_gateway_routes_and_invokes(mesh: Mesh, intruder: str) -> None:
    with mesh.channel("router", identity=intruder) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.InvokeTool(
                router_pb2.InvokeToolRequest(
                    caller=VICTIM,
                    tool_name="list_notes",
                    tool_version="1.0.0",
                    allowed_tools=["*"],
                ),
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_health_stays_open_to_every_mesh_peer(mesh: Mesh) -> None:
    with mesh.channel("telemetry", identity="memory") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _start(mesh: Mesh, module: str, overrides: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = mesh.env()
    env.update(overrides)
    return subprocess.run(
        [sys.executable, "-m", module],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("service", "overrides", "says"),
    [
        (
            "memory",
            {"TOOLMESH_MEMORY_TLS_REQUIRE_CLIENT_AUTH": "false"},
            "TOOLMESH_MEMORY_TLS_REQUIRE_CLIENT_AUTH",
        ),
        ("telemetry", {"TOOLMESH_TELEMETRY_ALLOWED_PEERS": ""}, "TOOLMESH_TELEMETRY_ALLOWED_PEERS"),
        ("router", {"TOOLMESH_ROUTER_ALLOWED_PEERS": ""}, "TOOLMESH_ROUTER_ALLOWED_PEERS"),
    ],
)
def test_production_refuses_an_inner_service_that_would_trust_any_peer(
    mesh: Mesh, service: str, overrides: dict[str, str], says: str
) -> None:
    """Before: memory started without client authentication and answered anyone with TLS."""
    result = _start(
        mesh,
        f"services.{service}",
        {"TOOLMESH_ENV": "production", f"TOOLMESH_{service.upper()}_PORT": "0", **overrides},
    )
    text = result.stdout + result.stderr
    assert result.returncode != 0, text
    assert says in text, text
    assert "Traceback" not in text, text
