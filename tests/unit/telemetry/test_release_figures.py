"""GetReleaseFigures: one release unit's versions, each over its own window, from the gateway's
per-request records, with the burn rates of the unit's SLO objective."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from grpc import aio

from toolmesh.telemetry.v1 import telemetry_pb2 as G

from .conftest import TelemetryServer
from .helpers import bad_fields, record, request_record, stamp

CALC_OLD = ("calculator", "1.0.0")
CALC_NEW = ("calculator", "1.1.0")


def window(version: str, seconds: float = 600) -> G.VersionWindow:
    now = datetime.now(UTC)
    return G.VersionWindow(
        version=version, start=stamp(now - timedelta(seconds=seconds)), end=stamp(now)
    )


async def figures(
    server: TelemetryServer, request: G.GetReleaseFiguresRequest
) -> G.GetReleaseFiguresResponse:
    return await server.stub.GetReleaseFigures(request)


async def test_tool_versions_are_judged_on_their_own_invocations(server: TelemetryServer) -> None:
    records = [
        request_record(f"s{i}", 5, tool=CALC_OLD, tool_outcome=G.TOOL_OUTCOME_OK, tool_ms=10.0 + i)
        for i in range(20)
    ]
    # The candidate: 10 calls, 2 failed, one refused (not a failure), slower.
    outcomes = [G.TOOL_OUTCOME_FAILED] * 2 + [G.TOOL_OUTCOME_REFUSED] + [G.TOOL_OUTCOME_OK] * 7
    records += [
        request_record(f"c{i}", 5, tool=CALC_NEW, tool_outcome=o, tool_ms=200.0 + i * 50)
        for i, o in enumerate(outcomes)
    ]
    # Another tenant's call and one outside the candidate's window.
    records.append(
        request_record("g", 5, tenant="globex", tool=CALC_NEW, tool_outcome=G.TOOL_OUTCOME_OK)
    )
    records.append(
        request_record("old", 5, tool=CALC_NEW, tool_outcome=G.TOOL_OUTCOME_FAILED, ago_s=120)
    )
    await record(server, *records)
    reply = await figures(
        server,
        G.GetReleaseFiguresRequest(
            kind=G.RELEASE_UNIT_KIND_TOOL,
            name="calculator",
            versions=[window("1.0.0"), window("1.1.0", seconds=60)],
            tenant="acme",
        ),
    )
    # The configured objective for every tool: 99.5% available, 95% within 300 ms.
    assert reply.objective == "tool-invoke"
    assert reply.availability_target == pytest.approx(0.995)
    stable, candidate = reply.versions
    assert (stable.version, stable.requests, stable.errors, stable.error_rate) == (
        "1.0.0",
        20,
        0,
        0.0,
    )
    # Nearest rank: the 19th of 20 durations (10..29 ms).
    assert stable.p95_ms == 28.0 and stable.error_burn_rate == 0.0
    assert (candidate.requests, candidate.errors) == (10, 2)
    assert candidate.error_rate == pytest.approx(0.2)
    # Nearest rank: the 10th of 10 durations (200..650 ms).
    assert candidate.p95_ms == 650.0
    assert candidate.slow == 7  # over 300 ms: 350 .. 650
    assert candidate.error_burn_rate == pytest.approx(0.2 / 0.005)
    assert candidate.latency_burn_rate == pytest.approx(0.7 / 0.05)


async def test_routing_and_prompt_versions_count_whole_requests(server: TelemetryServer) -> None:
    a = request_record("a", 40)
    a.rules_version = "2026.11.29-1"
    a.prompts.extend(["route-system@2", "answer@1"])
    b = request_record("b", 60, error=True)
    b.rules_version = "2026.12.01-1"
    b.prompts.append("route-system@12")
    c = request_record("c", 80)
    c.rules_version = "2026.12.01-1"
    c.outcome = "no_match"
    await record(server, a, b, c)
    routing = await figures(
        server,
        G.GetReleaseFiguresRequest(
            kind=G.RELEASE_UNIT_KIND_ROUTING,
            versions=[window("2026.11.29-1"), window("2026.12.01-1")],
        ),
    )
    assert routing.objective == "gateway-run"
    old, new = routing.versions
    assert (old.requests, old.errors, old.no_match) == (1, 0, 0)
    assert (new.requests, new.errors, new.no_match, new.p95_ms) == (2, 1, 1, 80.0)
    prompt = await figures(
        server,
        G.GetReleaseFiguresRequest(
            kind=G.RELEASE_UNIT_KIND_PROMPT,
            name="route-system",
            versions=[window("2"), window("1"), window("12")],
        ),
    )
    # "route-system@1" is not a prefix match of "route-system@12".
    assert [v.requests for v in prompt.versions] == [1, 0, 1]


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (G.GetReleaseFiguresRequest(versions=[window("1")]), ["kind"]),
        (
            G.GetReleaseFiguresRequest(kind=G.RELEASE_UNIT_KIND_TOOL, versions=[window("1")]),
            ["name"],
        ),
        (G.GetReleaseFiguresRequest(kind=G.RELEASE_UNIT_KIND_ROUTING), ["versions"]),
        (
            G.GetReleaseFiguresRequest(
                kind=G.RELEASE_UNIT_KIND_ROUTING,
                versions=[G.VersionWindow(version="1", start=stamp(), end=stamp())],
                objective="nope",
            ),
            ["objective"],
        ),
        (
            G.GetReleaseFiguresRequest(
                kind=G.RELEASE_UNIT_KIND_ROUTING,
                versions=[
                    G.VersionWindow(
                        version="1",
                        start=stamp(),
                        end=stamp(datetime.now(UTC) - timedelta(seconds=5)),
                    )
                ],
            ),
            ["versions[0].end"],
        ),
    ],
)
async def test_bad_requests_name_the_field(
    server: TelemetryServer, request_: G.GetReleaseFiguresRequest, fields: list[str]
) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await figures(server, request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == fields
