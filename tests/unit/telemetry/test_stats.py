"""GetStats and GetToolHealth from the gateway's per-request records, against the real server.

Figures are exact whatever happens to spans: spans of the same requests, sampled away or
claiming errors, change nothing.
"""

from __future__ import annotations

import grpc
import pytest
from grpc import aio

from toolmesh.common.v1 import common_pb2
from toolmesh.telemetry.v1 import telemetry_pb2 as G

from .conftest import TelemetryServer
from .helpers import OPERATOR, RUN, bad_fields, caller, record, request_record
from .test_telemetry import export_request, rpc_span, tool_span

INFO = "/toolmesh.gateway.v1.Gateway/GetServiceInfo"
CALC = ("calc", "1.0.0")
SEARCH = ("search", "2.1.0")
# Run requests 1..20 ms (the 7 and 20 ms ones failed); some of them invoked a tool.
TOOLS = {
    8: (CALC, G.TOOL_OUTCOME_OK),
    2: (CALC, G.TOOL_OUTCOME_OK),
    6: (CALC, G.TOOL_OUTCOME_OK),
    4: (CALC, G.TOOL_OUTCOME_FAILED),
    1: (CALC, G.TOOL_OUTCOME_REFUSED),
    10: (SEARCH, G.TOOL_OUTCOME_FAILED),
}
TOOL_MS = {8: 8.0, 2: 2.0, 6: 6.0, 4: 4.0, 1: 1.0, 10: 100.0}


def workload() -> list[G.UsageRecord]:
    records = []
    for d in range(1, 21):
        tool, outcome = TOOLS.get(d, (None, G.TOOL_OUTCOME_UNSPECIFIED))
        records.append(
            request_record(
                f"run-{d}",
                d,
                error=d in (7, 20),
                tool=tool,
                tool_outcome=outcome,
                tool_ms=TOOL_MS.get(d, 0.0),
            )
        )
    records.append(request_record("info", 5, route=INFO))
    records.append(request_record("old", 1000, ago_s=7200))
    # Another tenant's request; and one from a sender that does not measure (cost only).
    records.append(
        request_record(
            "g",
            500,
            tenant="globex",
            error=True,
            tool=CALC,
            tool_outcome=G.TOOL_OUTCOME_FAILED,
            tool_ms=50,
        )
    )
    unmeasured = request_record("legacy", 1)
    unmeasured.ClearField("duration_ms")
    records.append(unmeasured)
    return records


async def stats(
    server: TelemetryServer,
    group_by: int,
    window_seconds: int = 0,
    service: str = "",
    who: common_pb2.Caller | None = None,
) -> list[G.StatsRow]:
    response = await server.stub.GetStats(
        G.GetStatsRequest(
            group_by=group_by,
            window_seconds=window_seconds,
            service=service,
            caller=who or caller(),
        )
    )
    return list(response.rows)


async def test_stats_per_service(server: TelemetryServer) -> None:
    await record(server, *workload())
    (gateway,) = await stats(server, G.STATS_GROUP_BY_SERVICE)
    # Durations 1,2,3,4,5,5,6,...,20: nearest rank 11 of 21 -> 10, rank 20 -> 19, rank 21 -> 20.
    assert (gateway.service, gateway.count, gateway.errors) == ("toolmesh-gateway", 21, 2)
    assert gateway.error_rate == pytest.approx(2 / 21)
    assert (gateway.p50_ms, gateway.p95_ms, gateway.p99_ms) == (10, 19, 20)
    assert gateway.mean_ms == pytest.approx(215 / 21)


async def test_stats_per_route(server: TelemetryServer) -> None:
    await record(server, *workload())
    rows = {(r.service, r.route): r for r in await stats(server, G.STATS_GROUP_BY_ROUTE)}
    assert set(rows) == {("toolmesh-gateway", RUN), ("toolmesh-gateway", INFO)}
    run = rows["toolmesh-gateway", RUN]
    assert (run.count, run.errors, run.error_rate) == (20, 2, 0.1)
    assert (run.p50_ms, run.p95_ms, run.p99_ms, run.mean_ms) == (10, 19, 20, 10.5)
    info = rows["toolmesh-gateway", INFO]
    assert (info.count, info.errors, info.p50_ms, info.p99_ms) == (1, 0, 5, 5)
    assert await stats(server, G.STATS_GROUP_BY_ROUTE, service="toolmesh-router") == []


async def test_stats_per_tool(server: TelemetryServer) -> None:
    await record(server, *workload())
    calc, search = await stats(server, G.STATS_GROUP_BY_TOOL)
    assert [(r.tool_name, r.tool_version) for r in (calc, search)] == [CALC, SEARCH]
    # A refusal of the arguments is the tool working: a call, not a failure.
    assert (calc.count, calc.errors, calc.error_rate) == (5, 1, 0.2)
    assert (calc.p50_ms, calc.p95_ms, calc.p99_ms, calc.mean_ms) == (4, 8, 8, 4.2)
    assert (search.count, search.errors, search.error_rate, search.p99_ms) == (1, 1, 1.0, 100)


async def test_window_and_tenant_scoping(server: TelemetryServer) -> None:
    await record(server, *workload())
    three_hours = await stats(server, G.STATS_GROUP_BY_ROUTE, window_seconds=10_800)
    run = next(r for r in three_hours if r.route == RUN)
    assert (run.count, run.p99_ms) == (21, 1000)
    assert await stats(server, G.STATS_GROUP_BY_SERVICE, window_seconds=0) != []
    # globex sees only its own request; the platform operator sees every tenant's.
    (globex,) = await stats(server, G.STATS_GROUP_BY_SERVICE, who=caller("globex"))
    assert (globex.count, globex.errors, globex.p50_ms) == (1, 1, 500)
    (everyone,) = await stats(server, G.STATS_GROUP_BY_SERVICE, who=OPERATOR)
    assert (everyone.count, everyone.errors) == (22, 3)
    assert await stats(server, G.STATS_GROUP_BY_TOOL, who=caller("nobody")) == []


async def test_spans_change_no_figure(server: TelemetryServer) -> None:
    """Stats and tool health read records only: spans that fail, or none at all, change
    nothing (so sampling spans keeps them exact)."""
    await record(server, *workload())
    before = await stats(server, G.STATS_GROUP_BY_TOOL)
    health = await server.stub.GetToolHealth(G.GetToolHealthRequest())
    noise = [rpc_span(RUN, 900, error=True, toolmesh__tenant="acme") for _ in range(5)]
    noise += [tool_span("calc", "1.0.0", 700, error=True) for _ in range(5)]
    await server.otlp.Export(export_request("toolmesh-gateway", noise))
    assert await stats(server, G.STATS_GROUP_BY_TOOL) == before
    after = await server.stub.GetToolHealth(G.GetToolHealthRequest())
    assert list(after.tools) == list(health.tools)


async def test_tool_health_over_every_tenant(server: TelemetryServer) -> None:
    await record(server, *workload())
    response = await server.stub.GetToolHealth(G.GetToolHealthRequest(window_seconds=3600))
    health = {(t.tool_name, t.tool_version): t for t in response.tools}
    # acme: 5 calc calls, 1 failed; globex: 1 calc call, failed.
    calc = health[CALC]
    assert (calc.calls, calc.failures) == (6, 2)
    assert calc.success_rate == pytest.approx(4 / 6)
    assert (health[SEARCH].calls, health[SEARCH].success_rate) == (1, 0.0)
    window = response.window_end.ToNanoseconds() - response.window_start.ToNanoseconds()
    assert window == 3600 * 10**9
    default = await server.stub.GetToolHealth(G.GetToolHealthRequest())
    span = default.window_end.ToNanoseconds() - default.window_start.ToNanoseconds()
    assert span == 900 * 10**9


async def test_one_record_per_request(server: TelemetryServer) -> None:
    """The ledger's de-duplication by (tenant, request id) keeps the figures exact too."""
    first = request_record("same", 5)
    await record(server, first, first, request_record("same", 9))
    (row,) = await stats(server, G.STATS_GROUP_BY_SERVICE)
    assert (row.count, row.p99_ms) == (1, 5)


# Validation happens before any query: one backend is enough.
@pytest.mark.parametrize("settings", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (G.GetStatsRequest(group_by=G.STATS_GROUP_BY_SERVICE), ["caller.tenant"]),
        (G.GetStatsRequest(caller=caller()), ["group_by"]),
        (G.GetStatsRequest(caller=caller(), group_by=99), ["group_by"]),
        (
            G.GetStatsRequest(caller=caller(), group_by=1, window_seconds=-1, service="s" * 257),
            ["window_seconds", "service"],
        ),
        (
            G.GetStatsRequest(caller=caller(), group_by=1, window_seconds=30 * 86400 + 1),
            ["window_seconds"],
        ),
        (G.GetToolHealthRequest(window_seconds=86401), ["window_seconds"]),
        (G.GetToolHealthRequest(window_seconds=-5), ["window_seconds"]),
    ],
)
async def test_validation(server: TelemetryServer, request_, fields: list[str]) -> None:
    call = type(request_).__name__.removesuffix("Request")
    with pytest.raises(aio.AioRpcError) as caught:
        await getattr(server.stub, call)(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == fields


async def test_thirty_days_is_the_longest_window(server: TelemetryServer) -> None:
    assert await stats(server, G.STATS_GROUP_BY_TOOL, 30 * 86400) == []
