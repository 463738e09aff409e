"""The gateway's operator views over gRPC: a real gateway in front of a real telemetry server
(SQLite in a temp dir) and contract fakes of auth, router and memory.

Scope checks, validation before any hop, tenant scoping (another tenant's trace id must look
exactly like an unknown one), and telemetry's own errors passed through with their details.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2 as otlp_common
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from services.kit.channels import open_channel
from services.kit.server import Cleanup, Running, start
from services.kit.settings import ServiceSettings
from services.telemetry.app import build as build_telemetry
from services.telemetry.settings import TelemetrySettings
from tests.unit.gateway.conftest import GatewayUnderTest, bearer, start_gateway_on
from tests.unit.gateway.fakes import Fakes
from toolmesh.gateway.v1 import gateway_pb2
from toolmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc

OPS = "ops:read"


@dataclass
class Stack:
    gw: GatewayUnderTest
    telemetry: telemetry_pb2_grpc.TelemetryStub
    otlp: trace_service_pb2_grpc.TraceServiceStub
    target: str

    def token(self, tenant: str = "acme", scope: str = OPS, sub: str = "client-1") -> str:
        return self.gw.token(tenant=tenant, scope=scope, sub=sub)

    def md(self, **kw: str) -> tuple[tuple[str, str], ...]:
        return bearer(self.token(**kw))


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    fakes = Fakes()
    inner = await start(ServiceSettings(port=0), fakes.register)
    tel_settings = TelemetrySettings(port=0, data_dir=tmp_path / "telemetry", otlp_endpoint="")
    cleanups: list[Cleanup] = []
    telemetry: Running = await start(tel_settings, build_telemetry(tel_settings, cleanups))
    telemetry.cleanups.extend(cleanups)
    gateway, channel, under_test = await start_gateway_on(
        inner.port, fakes, telemetry_target=f"127.0.0.1:{telemetry.port}"
    )
    await under_test.wait_ready()
    tel_channel = open_channel(f"127.0.0.1:{telemetry.port}")
    yield Stack(
        under_test,
        telemetry_pb2_grpc.TelemetryStub(tel_channel),
        trace_service_pb2_grpc.TraceServiceStub(tel_channel),
        f"127.0.0.1:{gateway.port}",
    )
    await tel_channel.close()
    await channel.close()
    await gateway.stop(0)
    await telemetry.stop(0)
    await inner.stop(0)


def _attr(key: str, value: str) -> otlp_common.KeyValue:
    return otlp_common.KeyValue(key=key, value=otlp_common.AnyValue(string_value=value))


def _span(
    trace_id: bytes, span_id: bytes, parent: bytes, name: str, **attrs: str
) -> trace_pb2.Span:
    end = time.time_ns()
    return trace_pb2.Span(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent,
        name=name,
        kind=trace_pb2.Span.SPAN_KIND_SERVER,
        start_time_unix_nano=end - 5_000_000,
        end_time_unix_nano=end,
        attributes=[_attr(k, v) for k, v in attrs.items()],
    )


async def _export(stack: Stack, service: str, spans: list[trace_pb2.Span]) -> None:
    await stack.otlp.Export(
        trace_service_pb2.ExportTraceServiceRequest(
            resource_spans=[
                trace_pb2.ResourceSpans(
                    resource=resource_pb2.Resource(attributes=[_attr("service.name", service)]),
                    scope_spans=[trace_pb2.ScopeSpans(spans=spans)],
                )
            ]
        )
    )


async def _a_trace(stack: Stack, tenant: str = "acme") -> str:
    """A gateway Run span carrying the tenant, with a router child that carries none."""
    trace_id, root, child = os.urandom(16), os.urandom(8), os.urandom(8)
    await _export(
        stack,
        "toolmesh-gateway",
        [
            _span(
                trace_id,
                root,
                b"",
                "toolmesh.gateway.v1.Gateway/Run",
                **{"toolmesh.tenant": tenant},
            )
        ],
    )
    await _export(
        stack, "toolmesh-router", [_span(trace_id, child, root, "toolmesh.router.v1.Router/Route")]
    )
    return trace_id.hex()


def _bad_fields(error: aio.AioRpcError) -> list[str]:
    raw = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    fields = []
    for detail in status_pb2.Status.FromString(raw).details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields.extend(v.field for v in bad.field_violations)
    return fields


async def test_get_trace_is_the_tenants_and_another_tenants_looks_unknown(stack: Stack) -> None:
    trace_id = await _a_trace(stack, "acme")
    reply = await stack.gw.stub.GetTrace(
        gateway_pb2.GetTraceRequest(trace_id=trace_id.upper()), metadata=stack.md()
    )
    assert {s.service for s in reply.spans} == {"toolmesh-gateway", "toolmesh-router"}
    root = next(s for s in reply.spans if not s.parent_span_id)
    assert root.tenant == "acme"
    assert [s.parent_span_id for s in reply.spans if s.parent_span_id] == [root.span_id]

    with pytest.raises(aio.AioRpcError) as foreign:
        await stack.gw.stub.GetTrace(
            gateway_pb2.GetTraceRequest(trace_id=trace_id), metadata=stack.md(tenant="globex")
        )
    with pytest.raises(aio.AioRpcError) as unknown:
        await stack.gw.stub.GetTrace(
            gateway_pb2.GetTraceRequest(trace_id=os.urandom(16).hex()),
            metadata=stack.md(tenant="globex"),
        )
    assert foreign.value.code() == unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert foreign.value.details() == unknown.value.details() == "no such trace"
    assert foreign.value.trailing_metadata() == unknown.value.trailing_metadata()


@pytest.mark.parametrize("trace_id", ["", "xyz", "0" * 32, "a" * 31, "a" * 33])
async def test_get_trace_refuses_a_bad_trace_id_naming_the_field(
    stack: Stack, trace_id: str
) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await stack.gw.stub.GetTrace(
            gateway_pb2.GetTraceRequest(trace_id=trace_id), metadata=stack.md()
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _bad_fields(err.value) == ["trace_id"]


@pytest.mark.parametrize(
    ("call", "request_"),
    [
        ("GetTrace", gateway_pb2.GetTraceRequest(trace_id="ab" * 16)),
        ("GetCost", gateway_pb2.GetCostRequest()),
        ("ListBudgets", gateway_pb2.ListBudgetsRequest()),
        ("ListAudit", gateway_pb2.ListAuditRequest()),
        ("VerifyAudit", gateway_pb2.VerifyAuditRequest()),
        ("GetSlo", gateway_pb2.GetSloRequest()),
        (
            "SetBudget",
            gateway_pb2.SetBudgetRequest(
                period=telemetry_pb2.BUDGET_PERIOD_DAY,
                limits=telemetry_pb2.BudgetAmounts(tool_calls=1),
            ),
        ),
    ],
)
async def test_every_operator_view_needs_its_scope(
    stack: Stack, call: str, request_: object
) -> None:
    needed = "admin" if call == "SetBudget" else OPS
    with pytest.raises(aio.AioRpcError) as err:
        await getattr(stack.gw.stub, call)(request_, metadata=stack.md(scope="tools:read"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == f"missing scope {needed}"
    with pytest.raises(aio.AioRpcError) as unauthenticated:
        await getattr(stack.gw.stub, call)(request_)
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_set_budget_needs_admin_and_budgets_are_the_callers_tenants(stack: Stack) -> None:
    request = gateway_pb2.SetBudgetRequest(
        principal="bob",
        period=telemetry_pb2.BUDGET_PERIOD_MONTH,
        limits=telemetry_pb2.BudgetAmounts(tool_calls=10, cost_micros=250_000),
    )
    with pytest.raises(aio.AioRpcError) as err:
        await stack.gw.stub.SetBudget(request, metadata=stack.md(scope=OPS))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    reply = await stack.gw.stub.SetBudget(request, metadata=stack.md(scope="admin"))
    assert (reply.budget.tenant, reply.budget.principal) == ("acme", "bob")
    assert reply.budget.limits.cost_micros == 250_000 and not reply.removed

    ours = await stack.gw.stub.ListBudgets(gateway_pb2.ListBudgetsRequest(), metadata=stack.md())
    assert [(b.tenant, b.principal, b.limits.tool_calls) for b in ours.budgets] == [
        ("acme", "bob", 10)
    ]
    theirs = await stack.gw.stub.ListBudgets(
        gateway_pb2.ListBudgetsRequest(), metadata=stack.md(tenant="globex")
    )
    assert list(theirs.budgets) == []

    request.limits.CopyFrom(telemetry_pb2.BudgetAmounts())
    removed = await stack.gw.stub.SetBudget(request, metadata=stack.md(scope="admin"))
    assert removed.removed and not removed.HasField("budget")


async def test_set_budget_validates_before_telemetry(stack: Stack) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await stack.gw.stub.SetBudget(
            gateway_pb2.SetBudgetRequest(
                principal="x" * 300, limits=telemetry_pb2.BudgetAmounts(tokens=-1)
            ),
            metadata=stack.md(scope="admin"),
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _bad_fields(err.value) == ["principal", "period", "limits.tokens"]


async def test_get_cost_is_scoped_and_grouped(stack: Stack) -> None:
    now = time.time_ns()

    def record(tenant: str, request_id: str, tool: str) -> telemetry_pb2.UsageRecord:
        usage = telemetry_pb2.UsageRecord(
            request_id=request_id,
            tenant=tenant,
            principal="client-1",
            route="/toolmesh.gateway.v1.Gateway/Run",
            tool_name=tool,
            tool_version="1.0.0",
            tokens_in=3,
            tokens_out=2,
            tool_calls=1,
            cost_units=1,
            outcome="ok",
        )
        usage.occurred_at.FromNanoseconds(now)
        return usage

    await stack.telemetry.RecordUsage(
        telemetry_pb2.RecordUsageRequest(
            records=[
                record("acme", "r1", "calculator"),
                record("acme", "r2", "calculator"),
                record("acme", "r3", "search"),
                record("globex", "r4", "calculator"),
            ]
        )
    )
    reply = await stack.gw.stub.GetCost(
        gateway_pb2.GetCostRequest(days=1, group_by=[telemetry_pb2.COST_GROUP_BY_TOOL]),
        metadata=stack.md(),
    )
    assert {(r.tool_name, r.requests, r.tool_calls) for r in reply.rows} == {
        ("calculator", 2, 2),
        ("search", 1, 1),
    }
    assert all(r.cost_micros > 0 and r.currency for r in reply.rows)
    assert reply.window_end.ToNanoseconds() - reply.window_start.ToNanoseconds() == 86400 * 10**9

    total = await stack.gw.stub.GetCost(gateway_pb2.GetCostRequest(), metadata=stack.md())
    assert [r.requests for r in total.rows] == [3]


async def test_get_cost_validation_names_the_fields(stack: Stack) -> None:
    request = gateway_pb2.GetCostRequest(
        days=400, group_by=[telemetry_pb2.COST_GROUP_BY_DAY, telemetry_pb2.COST_GROUP_BY_DAY]
    )
    request.start.FromSeconds(100)
    with pytest.raises(aio.AioRpcError) as err:
        await stack.gw.stub.GetCost(request, metadata=stack.md())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _bad_fields(err.value) == ["group_by", "days", "start"]


async def test_audit_list_and_verify_are_the_tenants(stack: Stack) -> None:
    events = []
    for i, tenant in enumerate(("acme", "acme", "globex")):
        event = telemetry_pb2.AuditEvent(
            event_id=f"ev-{i}",
            tenant=tenant,
            actor="client-1",
            action="token.issue",
            target="client-1",
            outcome="ok",
        )
        event.occurred_at.FromNanoseconds(time.time_ns())
        events.append(event)
    await stack.telemetry.AppendAudit(telemetry_pb2.AppendAuditRequest(events=events))

    listed = await stack.gw.stub.ListAudit(
        gateway_pb2.ListAuditRequest(action="token.issue", limit=1), metadata=stack.md()
    )
    assert [(e.seq, e.event.event_id) for e in listed.events] == [(1, "ev-0")]
    assert listed.next_page_token
    rest = await stack.gw.stub.ListAudit(
        gateway_pb2.ListAuditRequest(page_token=listed.next_page_token), metadata=stack.md()
    )
    assert [e.event.event_id for e in rest.events] == ["ev-1"]

    verdict = await stack.gw.stub.VerifyAudit(gateway_pb2.VerifyAuditRequest(), metadata=stack.md())
    assert verdict.ok and verdict.events_checked == 2 and verdict.head_seq == 2
    assert not verdict.HasField("problem")

    with pytest.raises(aio.AioRpcError) as err:
        await stack.gw.stub.ListAudit(
            gateway_pb2.ListAuditRequest(limit=5000, page_token="abc"), metadata=stack.md()
        )
    assert _bad_fields(err.value) == ["limit", "page_token"]


async def test_get_slo_and_telemetry_errors_pass_through(stack: Stack) -> None:
    reply = await stack.gw.stub.GetSlo(gateway_pb2.GetSloRequest(), metadata=stack.md())
    assert {o.name for o in reply.objectives} >= {"gateway-run"}
    assert reply.version
    with pytest.raises(aio.AioRpcError) as err:
        await stack.gw.stub.GetSlo(gateway_pb2.GetSloRequest(name="nope"), metadata=stack.md())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "telemetry: no such objective"


async def test_telemetry_down_is_unavailable_without_addresses(tmp_path: Path) -> None:
    fakes = Fakes()
    inner = await start(ServiceSettings(port=0), fakes.register)
    gateway, channel, gw = await start_gateway_on(inner.port, fakes, telemetry_target="127.0.0.1:9")
    try:
        await gw.wait_ready()
        with pytest.raises(aio.AioRpcError) as err:
            await gw.stub.ListBudgets(
                gateway_pb2.ListBudgetsRequest(),
                metadata=bearer(gw.token(scope=OPS)),
                timeout=5,
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details() == "telemetry is unavailable"
    finally:
        await channel.close()
        await gateway.stop(0)
        await inner.stop(0)
