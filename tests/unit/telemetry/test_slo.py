"""SLO maths with worked numbers, and GetSlo (from per-request records) flipping to a page
when a tool starts failing."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import grpc
import pytest
from grpc import aio

from services.telemetry import slo
from services.telemetry.settings import TelemetrySettings
from toolmesh.telemetry.v1 import telemetry_pb2 as G

from .conftest import TelemetryServer
from .helpers import RUN, record, request_record
from .test_telemetry import export_request, tool_span

NINES3 = Fraction("0.999")


def test_burn_rate_worked_numbers() -> None:
    # 99.9%: the error budget is 0.1% of requests. 1.44% failing burns it 14.4 times too fast.
    assert slo.burn_rate(144, 10_000, NINES3) == Fraction("14.4")
    assert slo.burn_rate(1, 1000, NINES3) == 1
    assert slo.burn_rate(0, 0, NINES3) == 0
    # 14.4x for one hour of a 30-day period spends 2% of the budget; 6x for 6 h spends 5%.
    assert Fraction("14.4") * 3600 / (30 * 86400) == Fraction(2, 100)
    assert 6 * 6 * 3600 / Fraction(30 * 86400) == Fraction(5, 100)
    assert slo.budget_remaining(5, 10_000, NINES3) == Fraction(1, 2)
    assert slo.budget_remaining(20, 10_000, NINES3) == -1
    assert slo.sli(999, 1000) == NINES3
    assert slo.sli(0, 0) == 1


def test_alerts_need_both_windows_strictly_above() -> None:
    def burns(b5m, b30m, b1h, b6h):
        return dict(zip(slo.BURN_WINDOWS_S, map(Fraction, (b5m, b30m, b1h, b6h)), strict=True))

    def firing(b):
        return {a.rule.severity: a.firing for a in slo.alerts(b)}

    assert firing(burns(20, 0, 15, 0)) == {"page": True, "ticket": False}
    # Exactly at the threshold does not fire: 144 bad of 10,000 at 99.9% is 14.4 exactly.
    exact = slo.burn_rate(144, 10_000, NINES3)
    assert firing(burns(exact, 0, 20, 0))["page"] is False
    # The long window alone (the problem has stopped) does not page.
    assert firing(burns(0, 0, 50, 0))["page"] is False
    assert firing(burns(0, 7, 0, "6.01")) == {"page": False, "ticket": True}
    assert firing(burns(0, 7, 0, 6)) == {"page": False, "ticket": False}


def test_config_is_checked() -> None:
    base = {"name": "x", "service": "s", "route": "/a/B", "availability": 0.99}
    base |= {"latency_threshold_ms": 100, "latency_target": 0.95}
    assert slo.SloConfig.from_mapping({"version": "1", "objective": [base]}).objectives[0].name
    shipped = slo.SloConfig.load(TelemetrySettings().slo_file)
    assert [o.name for o in shipped.objectives] == ["gateway-run", "tool-invoke"]
    for broken in (
        {"version": ""},
        {"version": "1", "objective": [{**base, "tool": "calc"}]},
        {"version": "1", "objective": [{**base, "availability": 1.0}]},
        {"version": "1", "objective": [{**base, "latency_threshold_ms": 0}]},
        {"version": "1", "objective": [base, base]},
    ):
        with pytest.raises(ValueError):
            slo.SloConfig.from_mapping(broken)


SLO_TOML = """
version = "test-1"

[[objective]]
name = "calc"
service = "toolmesh-gateway"
tool = "calc"
availability = 0.99
latency_threshold_ms = 100
latency_target = 0.95
period_days = 1

[[objective]]
name = "run"
service = "toolmesh-gateway"
route = "/toolmesh.gateway.v1.Gateway/Run"
availability = 0.99
latency_threshold_ms = 500
latency_target = 0.95
period_days = 1

[[objective]]
name = "tools"
service = "toolmesh-gateway"
tool = "*"
availability = 0.99
latency_threshold_ms = 100
latency_target = 0.95
period_days = 1
"""


@pytest.fixture
async def slo_server(settings: TelemetrySettings, tmp_path: Path):
    path = tmp_path / "slo.toml"
    path.write_text(SLO_TOML)
    server = await TelemetryServer(settings.model_copy(update={"slo_file": path})).start()
    yield server
    await server.stop()


def by_kind(objective) -> dict[int, G.SliStatus]:
    return {s.kind: s for s in objective.slis}


def alerts(sli: G.SliStatus) -> dict[int, bool]:
    return {a.severity: a.firing for a in sli.alerts}


def calc_call(i: str, tool_ms: float, *, failed: bool = False, ago_s: float) -> G.UsageRecord:
    outcome = G.TOOL_OUTCOME_FAILED if failed else G.TOOL_OUTCOME_OK
    return request_record(
        i, tool_ms + 5, tool=("calc", "1.0.0"), tool_outcome=outcome, tool_ms=tool_ms, ago_s=ago_s
    )


async def test_page_fires_when_the_tool_starts_failing(slo_server: TelemetryServer) -> None:
    # 100 good calls a minute ago, 2 of them slow; errors 40 minutes ago (1 h window only).
    calm = [calc_call(f"c{i}", 250 if i < 2 else 10, ago_s=60) for i in range(100)]
    old_errors = [calc_call(f"o{i}", 10, failed=True, ago_s=2400) for i in range(30)]
    # Another tool's calls and requests that invoked no tool do not count for calc.
    other = [
        request_record(
            f"s{i}", 5, tool=("search", "1"), tool_outcome=G.TOOL_OUTCOME_FAILED, tool_ms=5
        )
        for i in range(3)
    ]
    await record(slo_server, *calm, *old_errors, *other, request_record("none", 3))

    response = await slo_server.stub.GetSlo(G.GetSloRequest(name="calc"))
    assert response.version == "test-1"
    (objective,) = response.objectives
    availability = by_kind(objective)[G.SLI_KIND_AVAILABILITY]
    burns = {b.window_seconds: b for b in availability.burn_rates}
    assert (burns[300].total, burns[300].bad, burns[300].burn_rate) == (100, 0, 0)
    # 30 of 130 failing at 99%: burn (30/130)/0.01 = 23.08 over the hour.
    assert (burns[3600].total, burns[3600].bad) == (130, 30)
    assert burns[3600].burn_rate == pytest.approx(300 / 13)
    assert (availability.total, availability.good) == (130, 100)
    assert availability.error_budget_remaining == pytest.approx(1 - 300 / 13)
    # Over 14.4 for the hour but not in the last 5 minutes: the problem stopped, no page.
    assert alerts(availability) == {
        G.BURN_ALERT_SEVERITY_PAGE: False,
        G.BURN_ALERT_SEVERITY_TICKET: False,
    }
    latency = by_kind(objective)[G.SLI_KIND_LATENCY]
    assert (latency.latency_threshold_ms, latency.total, latency.good) == (100, 130, 128)
    assert {b.window_seconds: b.bad for b in latency.burn_rates}[300] == 2
    (tools,) = (await slo_server.stub.GetSlo(G.GetSloRequest(name="tools"))).objectives
    assert (
        by_kind(tools)[G.SLI_KIND_AVAILABILITY].total,
        by_kind(tools)[G.SLI_KIND_AVAILABILITY].good,
    ) == (133, 100)

    # Now it fails again: 25 errors in the last minute, 25 of 125 in 5 min is 20x.
    await record(slo_server, *(calc_call(f"f{i}", 10, failed=True, ago_s=30) for i in range(25)))
    (objective,) = (await slo_server.stub.GetSlo(G.GetSloRequest(name="calc"))).objectives
    availability = by_kind(objective)[G.SLI_KIND_AVAILABILITY]
    assert {b.window_seconds: b.burn_rate for b in availability.burn_rates}[300] == pytest.approx(
        20
    )
    assert alerts(availability) == {
        G.BURN_ALERT_SEVERITY_PAGE: True,
        G.BURN_ALERT_SEVERITY_TICKET: True,
    }
    # The route objective counts the route's requests: 134 so far, none slower than 500 ms.
    run = next(
        o for o in (await slo_server.stub.GetSlo(G.GetSloRequest())).objectives if o.name == "run"
    )
    assert (run.route, by_kind(run)[G.SLI_KIND_LATENCY].total) == (RUN, 159)
    assert by_kind(run)[G.SLI_KIND_LATENCY].good == 159
    await record(slo_server, request_record("slow", 600, ago_s=10))
    (run,) = (await slo_server.stub.GetSlo(G.GetSloRequest(name="run"))).objectives
    assert (by_kind(run)[G.SLI_KIND_LATENCY].total, by_kind(run)[G.SLI_KIND_LATENCY].good) == (
        160,
        159,
    )


async def test_spans_do_not_move_an_objective(slo_server: TelemetryServer) -> None:
    errors = [tool_span("calc", "1.0.0", 10, error=True, ended_s_ago=30) for _ in range(25)]
    await slo_server.otlp.Export(export_request("toolmesh-gateway", errors))
    (objective,) = (await slo_server.stub.GetSlo(G.GetSloRequest(name="calc"))).objectives
    assert by_kind(objective)[G.SLI_KIND_AVAILABILITY].total == 0


async def test_unknown_objective_is_not_found(server: TelemetryServer) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await server.stub.GetSlo(G.GetSloRequest(name="nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
