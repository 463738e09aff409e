"""Operator views through the real processes: traces, stats, cost, budgets, audit, SLOs, capacity.

Against the shared mTLS ``mesh`` (SQLite and PostgreSQL), except the SLO scenario, which needs
its own mesh with the chaos tools and an SLO file. Spans reach telemetry in batches (about one
second), so the checks poll until what they wait for has arrived.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import psycopg
import pytest

from testing.mesh import REPO, Mesh
from tests.e2e.conftest import bearer
from tests.faults.chaos_tools import rules_with_chaos
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from toolmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc

pytestmark = pytest.mark.e2e

TOOLMESH = shutil.which("toolmesh") or str(Path(os.sys.executable).parent / "toolmesh")
RUN_ROUTE = "/toolmesh.gateway.v1.Gateway/Run"
APPEND_TURNS = "/toolmesh.memory.v1.Memory/AppendTurns"
T = TypeVar("T")


def _session() -> str:
    return f"obs-{uuid.uuid4().hex[:12]}"


def _eventually(check: Callable[[], T | None], timeout: float = 8.0, every: float = 0.25) -> T:
    """The first truthy result of ``check``; fails with the last result after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout}s; last result: {result!r}")
        time.sleep(every)


def _run(gateway: gateway_pb2_grpc.GatewayStub, token: str, prompt: str) -> gateway_pb2.RunResponse:
    reply: gateway_pb2.RunResponse = gateway.Run(
        gateway_pb2.RunRequest(session_id=_session(), prompt=prompt),
        metadata=bearer(token),
        timeout=10,
    )
    return reply


def _cli(mesh: Mesh, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``toolmesh`` as a subprocess, as the operator: the mesh's env, TLS and a token."""
    tls = []
    if mesh.tls:
        tls = [
            "--ca-file",
            str(mesh.certs / "ca.pem"),
            "--cert-file",
            str(mesh.certs / "operator.pem"),
            "--key-file",
            str(mesh.certs / "operator.key"),
        ]
    return subprocess.run(
        [TOOLMESH, *args, "--target", mesh.gateway, "--token", token, *tls],
        cwd=REPO,
        env=mesh.env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# -- traces -----------------------------------------------------------------------------------


def test_a_runs_trace_is_one_tree_across_the_services_on_its_path(
    gateway: gateway_pb2_grpc.GatewayStub, token: str
) -> None:
    reply = _run(gateway, token, "what is 6 * 7")
    assert reply.tool_name == "calculator"
    # On a Run's path: the gateway, the router (Route, InvokeTool and the tool itself) and
    # memory (AppendTurns; a Run the rules route reads no history, which only the model uses).
    # Auth is not (the gateway verifies tokens locally).
    wanted = {"toolmesh-gateway", "toolmesh-router", "toolmesh-memory"}

    def complete() -> gateway_pb2.GetTraceResponse | None:
        try:
            found = gateway.GetTrace(
                gateway_pb2.GetTraceRequest(trace_id=reply.trace_id),
                metadata=bearer(token),
                timeout=5,
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                return None
            raise
        services = {s.service for s in found.spans if s.kind == telemetry_pb2.SPAN_KIND_SERVER}
        tools = [s for s in found.spans if s.name == "execute_tool calculator"]
        memory_routes = {s.route for s in found.spans if s.service == "toolmesh-memory"}
        ready = services >= wanted and tools and APPEND_TURNS in memory_routes
        return found if ready else None

    trace = _eventually(complete)
    spans = list(trace.spans)
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if not s.parent_span_id]
    assert len(roots) == 1, "one root"
    root = roots[0]
    assert (root.service, root.route, root.tenant) == ("toolmesh-gateway", RUN_ROUTE, "dev")
    assert all(s.parent_span_id in ids for s in spans if s is not root), "every parent stored"
    # Parent links form one tree: walking up from any span reaches the root without a cycle.
    parent = {s.span_id: s.parent_span_id for s in spans}
    for span in spans:
        seen, node = set(), span.span_id
        while parent[node]:
            assert node not in seen
            seen.add(node)
            node = parent[node]
        assert node == root.span_id
    tool = next(s for s in spans if s.name == "execute_tool calculator")
    assert tool.service == "toolmesh-router" and tool.tool_name == "calculator"
    assert tool.tool_version == reply.tool_version and not tool.error
    attributes = json.loads(tool.attributes_json)
    assert attributes.get("gen_ai.operation.name") == "execute_tool"
    routes = {s.route for s in spans if s.kind == telemetry_pb2.SPAN_KIND_SERVER}
    assert {
        "/toolmesh.router.v1.Router/Route",
        "/toolmesh.router.v1.Router/InvokeTool",
        APPEND_TURNS,
    } <= routes
    assert "/toolmesh.memory.v1.Memory/GetHistory" not in routes, "rules need no history"

    # The CLI prints the same tree, indented by parent.
    printed = _printed_tree(gateway, token, reply.trace_id)
    assert printed.splitlines()[1].startswith(RUN_ROUTE)
    assert "    execute_tool calculator" in printed


def _printed_tree(gateway: gateway_pb2_grpc.GatewayStub, token: str, trace_id: str) -> str:
    from cli import ops

    reply = gateway.GetTrace(
        gateway_pb2.GetTraceRequest(trace_id=trace_id), metadata=bearer(token), timeout=5
    )
    return ops.format_trace(reply)


def test_unknown_trace_is_not_found(gateway: gateway_pb2_grpc.GatewayStub, token: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        gateway.GetTrace(
            gateway_pb2.GetTraceRequest(trace_id=uuid.uuid4().hex),
            metadata=bearer(token),
            timeout=5,
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert err.value.details() == "no such trace"  # type: ignore[attr-defined]


# -- stats ------------------------------------------------------------------------------------


def _calculator_row(gateway: gateway_pb2_grpc.GatewayStub, token: str) -> tuple[int, int]:
    reply = gateway.GetStats(
        gateway_pb2.GetStatsRequest(group_by=telemetry_pb2.STATS_GROUP_BY_TOOL),
        metadata=bearer(token),
        timeout=5,
    )
    rows = [r for r in reply.rows if r.tool_name == "calculator"]
    return (sum(r.count for r in rows), sum(r.errors for r in rows))


def _settled(read: Callable[[], tuple[int, int]]) -> tuple[int, int]:
    """A reading that did not change over a batch interval (earlier spans have arrived)."""
    last = read()
    for _ in range(8):
        time.sleep(1.2)
        now = read()
        if now == last:
            return now
        last = now
    return last


def test_stats_match_a_known_workload(gateway: gateway_pb2_grpc.GatewayStub, token: str) -> None:
    runs = 6
    before = _settled(lambda: _calculator_row(gateway, token))
    for i in range(runs):
        assert _run(gateway, token, f"what is {i} + 1").tool_name == "calculator"
    after = _eventually(
        lambda: (now := _calculator_row(gateway, token))[0] - before[0] >= runs and now
    )
    time.sleep(1.2)  # one more batch interval: nothing beyond the workload arrives
    after = _calculator_row(gateway, token)
    assert after[0] - before[0] == runs
    assert after[1] - before[1] == 0, "no calculator call failed"


# -- cost -------------------------------------------------------------------------------------


def test_cost_is_scoped_to_the_callers_tenant(
    mesh: Mesh, gateway: gateway_pb2_grpc.GatewayStub, token: str
) -> None:
    # Usage of another tenant, straight into telemetry's ledger as the gateway (the one peer
    # that may record usage for a tenant).
    tool = f"othertool-{uuid.uuid4().hex[:8]}"
    record = telemetry_pb2.UsageRecord(
        request_id=uuid.uuid4().hex,
        tenant="someone-else",
        principal="mallory",
        route=RUN_ROUTE,
        tool_name=tool,
        tool_version="1.0.0",
        tool_calls=1,
        cost_units=5,
        outcome="ok",
    )
    record.occurred_at.FromNanoseconds(time.time_ns())
    with mesh.channel("telemetry", "gateway") as channel:
        stored = telemetry_pb2_grpc.TelemetryStub(channel).RecordUsage(
            telemetry_pb2.RecordUsageRequest(records=[record]), timeout=5
        )
    assert stored.stored == 1
    reply = gateway.GetCost(
        gateway_pb2.GetCostRequest(
            days=1,
            group_by=[telemetry_pb2.COST_GROUP_BY_TENANT, telemetry_pb2.COST_GROUP_BY_TOOL],
        ),
        metadata=bearer(token),
        timeout=5,
    )
    assert {r.tenant for r in reply.rows} <= {"dev"}
    assert tool not in {r.tool_name for r in reply.rows}
    with pytest.raises(grpc.RpcError) as err:
        gateway.GetCost(gateway_pb2.GetCostRequest(days=999), metadata=bearer(token), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


def test_cost_matches_a_known_workload(gateway: gateway_pb2_grpc.GatewayStub, token: str) -> None:
    def calculator_cost() -> tuple[int, int, int]:
        reply = gateway.GetCost(
            gateway_pb2.GetCostRequest(days=1, group_by=[telemetry_pb2.COST_GROUP_BY_TOOL]),
            metadata=bearer(token),
            timeout=5,
        )
        rows = [r for r in reply.rows if r.tool_name == "calculator"]
        return (
            sum(r.requests for r in rows),
            sum(r.tool_calls for r in rows),
            sum(r.cost_micros for r in rows),
        )

    runs = 3
    before = calculator_cost()
    replies = [_run(gateway, token, f"what is {i} * 3") for i in range(runs)]
    try:
        after = _eventually(
            lambda: (now := calculator_cost())[0] - before[0] >= runs and now, timeout=5
        )
    except AssertionError:
        if calculator_cost() == before and not any(r.price_version for r in replies):
            pytest.skip(
                "the gateway does not record usage yet (no usage record, no price_version in "
                "RunResponse): the exact-cost check is for the Run-flow usage emission work"
            )
        raise
    assert after[0] - before[0] == runs
    assert after[1] - before[1] == sum(r.usage.tool_calls for r in replies)
    assert after[2] - before[2] == sum(r.cost_micros for r in replies)


# -- budgets ----------------------------------------------------------------------------------


def test_budget_round_trip_and_scopes(
    mesh: Mesh, gateway: gateway_pb2_grpc.GatewayStub, token: str
) -> None:
    # A principal that never runs anything, so no other test is ever over this budget.
    principal = f"obs-budget-{uuid.uuid4().hex[:8]}"
    request = gateway_pb2.SetBudgetRequest(
        principal=principal,
        period=telemetry_pb2.BUDGET_PERIOD_DAY,
        limits=telemetry_pb2.BudgetAmounts(tool_calls=10, tokens=1000, cost_micros=250_000),
    )
    ops_only = mesh.token(scopes=("ops:read",))
    tools_only = mesh.token(scopes=("tools:read",))
    with pytest.raises(grpc.RpcError) as denied:
        gateway.SetBudget(request, metadata=bearer(ops_only), timeout=5)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert "admin" in denied.value.details()  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as unread:
        gateway.ListBudgets(gateway_pb2.ListBudgetsRequest(), metadata=bearer(tools_only))
    assert unread.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert "ops:read" in unread.value.details()  # type: ignore[attr-defined]

    set_reply = gateway.SetBudget(request, metadata=bearer(token), timeout=5)
    assert (set_reply.budget.tenant, set_reply.budget.principal) == ("dev", principal)
    try:
        listed = gateway.ListBudgets(
            gateway_pb2.ListBudgetsRequest(), metadata=bearer(ops_only), timeout=5
        )
        mine = [b for b in listed.budgets if b.principal == principal]
        assert len(mine) == 1
        assert mine[0].limits == request.limits
        assert mine[0].remaining.tool_calls == 10 and mine[0].used.tool_calls == 0
        # The CLI shows it, cost in currency units.
        shown = _cli(mesh, token, "budget", "show")
        assert shown.returncode == 0, shown.stderr
        line = next(x for x in shown.stdout.splitlines() if principal in x)
        assert "0 / 10" in line and "0.250000" in line
    finally:
        request.limits.CopyFrom(telemetry_pb2.BudgetAmounts())
        assert gateway.SetBudget(request, metadata=bearer(token), timeout=5).removed


# -- audit ------------------------------------------------------------------------------------


def _token_issues(gateway: gateway_pb2_grpc.GatewayStub, token: str) -> list:
    reply = gateway.ListAudit(
        gateway_pb2.ListAuditRequest(action="token.issue", limit=1000),
        metadata=bearer(token),
        timeout=5,
    )
    return list(reply.events)


def _tamper(mesh: Mesh, tenant: str, seq: int, outcome: str) -> str:
    """Set one stored event's outcome straight in telemetry's database; returns the old one."""
    select = "SELECT outcome FROM telemetry_audit WHERE tenant = {p} AND seq = {p}"
    update = "UPDATE telemetry_audit SET outcome = {p} WHERE tenant = {p} AND seq = {p}"
    url = mesh.database_urls.get("telemetry")
    if url:
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
            row = conn.execute(select.format(p="%s"), (tenant, seq)).fetchone()
            conn.execute(update.format(p="%s"), (outcome, tenant, seq))
    else:
        with sqlite3.connect(mesh.data_dir / "telemetry.db", timeout=10) as conn:
            row = conn.execute(select.format(p="?"), (tenant, seq)).fetchone()
            conn.execute(update.format(p="?"), (outcome, tenant, seq))
    assert row is not None
    return str(row[0])


def test_audit_trail_of_auth_events_verifies_and_an_edit_is_found(
    mesh: Mesh, gateway: gateway_pb2_grpc.GatewayStub, token: str
) -> None:
    before = len(_token_issues(gateway, token))
    mesh.token()  # auth audits the issue and sends it to telemetry through its outbox
    events = _eventually(
        lambda: (found := _token_issues(gateway, token)) and len(found) > before and found
    )
    last = events[-1]
    assert last.event.tenant == "dev" and last.event.actor and last.event.outcome
    assert len(last.hash) == 64 and last.seq >= 1
    verdict = gateway.VerifyAudit(gateway_pb2.VerifyAuditRequest(), metadata=bearer(token))
    assert verdict.ok, verdict.problem
    listed = _cli(mesh, token, "audit", "list", "--action", "token.issue")
    assert listed.returncode == 0, listed.stderr
    assert last.event.event_id in listed.stdout
    clean = _cli(mesh, token, "audit", "verify")
    assert clean.returncode == 0 and clean.stdout.startswith("audit chain ok"), clean.stderr

    original = _tamper(mesh, "dev", last.seq, "tampered")
    try:
        broken = _cli(mesh, token, "audit", "verify")
        assert broken.returncode != 0
        assert "EDITED" in broken.stdout and "EDITED" in broken.stderr
        assert last.event.event_id in broken.stderr and f"seq {last.seq}" in broken.stderr
        assert "Traceback" not in broken.stderr
        as_json = _cli(mesh, token, "audit", "verify", "--json")
        assert as_json.returncode != 0
        problem = json.loads(as_json.stdout)["problem"]
        assert problem["kind"] == "AUDIT_PROBLEM_KIND_EDITED"
        assert problem["event_id"] == last.event.event_id
    finally:
        # Put it back: the shared mesh's chain verifies again for the tests after this one.
        _tamper(mesh, "dev", last.seq, original)
    assert gateway.VerifyAudit(gateway_pb2.VerifyAuditRequest(), metadata=bearer(token)).ok


# -- capacity ---------------------------------------------------------------------------------


def test_capacity_worked_example_and_measured_latency(
    mesh: Mesh, gateway: gateway_pb2_grpc.GatewayStub, token: str
) -> None:
    given = _cli(mesh, token, "capacity", "--rps", "20", "--utilization", "0.6", "--latency", "0.3")
    assert given.returncode == 0, given.stderr
    rows = {line.split()[0]: line.split() for line in given.stdout.splitlines()[2:7]}
    assert {name: row[3:5] for name, row in rows.items()} == {
        name: ["10", "10"] for name in ("gateway", "auth", "router", "memory", "telemetry")
    }
    assert "one single-threaded asyncio process" in given.stdout

    _run(gateway, token, "what is 1 + 1")
    measured = _eventually(
        lambda: (
            (
                reply := _cli(
                    mesh, token, "capacity", "--rps", "20", "--utilization", "0.6", "--json"
                )
            ).returncode
            == 0
            and (found := {s["service"]: s for s in json.loads(reply.stdout)["services"]})
            and found["gateway"]["latency_source"] == "measured"
            and found
        )
    )
    gateway_row = measured["gateway"]
    assert gateway_row["latency_seconds"] > 0 and gateway_row["samples"] >= 1
    assert isinstance(gateway_row["replicas"], int) and gateway_row["replicas"] >= 1
    # Only the gateway writes the per-request records statistics come from: the inner
    # services get no measured L (docs/observability.md) and no made-up estimate.
    for name in ("auth", "router", "memory", "telemetry"):
        assert measured[name]["latency_source"] != "measured", measured[name]
        assert measured[name]["replicas"] is None


# -- SLO: a dedicated mesh with a failing tool ------------------------------------------------

SLO_FILE = """
version = "obs-e2e"

[[objective]]
name = "chaos-flaky"
service = "toolmesh-gateway"
tool = "chaos_flaky"
availability = 0.99
latency_threshold_ms = 1000
latency_target = 0.95
period_days = 1
"""


@pytest.fixture
def chaos_mesh(tmp_path: Path) -> Iterator[Mesh]:
    slo_file = tmp_path / "slo.toml"
    slo_file.write_text(SLO_FILE)
    mesh = Mesh(
        data_dir=tmp_path / "var",
        extra_env={
            "TOOLMESH_ROUTER_PLUGIN_MODULES": "tests.faults.chaos_tools",
            "TOOLMESH_ROUTER_RULES_FILE": str(rules_with_chaos(tmp_path)),
            "TOOLMESH_TELEMETRY_SLO_FILE": str(slo_file),
        },
    )
    mesh.start_all()
    try:
        yield mesh
    finally:
        mesh.stop_all()


def _page_firing(reply: gateway_pb2.GetSloResponse) -> bool:
    availability = reply.objectives[0].slis[0]
    return any(
        a.firing and a.severity == telemetry_pb2.BURN_ALERT_SEVERITY_PAGE
        for a in availability.alerts
    )


def test_slo_page_alert_fires_when_a_tool_fails(chaos_mesh: Mesh) -> None:
    token = chaos_mesh.token()
    with chaos_mesh.channel("gateway") as channel:
        gateway = gateway_pb2_grpc.GatewayStub(channel)
        calm = gateway.GetSlo(gateway_pb2.GetSloRequest(), metadata=bearer(token), timeout=5)
        assert [o.name for o in calm.objectives] == ["chaos-flaky"] and calm.version == "obs-e2e"
        assert not _page_firing(calm)
        for _ in range(40):
            _run(gateway, token, "chaos flaky x")
        hot = _eventually(
            lambda: (
                (
                    reply := gateway.GetSlo(
                        gateway_pb2.GetSloRequest(), metadata=bearer(token), timeout=5
                    )
                )
                and _page_firing(reply)
                and reply
            )
        )
    availability = hot.objectives[0].slis[0]
    assert availability.kind == telemetry_pb2.SLI_KIND_AVAILABILITY
    assert availability.total > availability.good > 0
    assert availability.error_budget_remaining < 0
    printed = _cli(chaos_mesh, token, "slo")
    assert printed.returncode == 0, printed.stderr
    row = next(
        x
        for x in printed.stdout.splitlines()
        if x.startswith("chaos-flaky") and "availability" in x
    )
    assert "PAGE" in row
