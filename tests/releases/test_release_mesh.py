"""Releases on the real mesh: the five services as processes with mutual TLS, two router
replicas, load through the gateway, on SQLite and PostgreSQL. The same scenarios as
`make release-drill` (tests/releases/drill.py), with their bounds asserted."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from grpc import aio

from testing.mesh import Mesh
from tests.pgutil import fresh_databases
from tests.releases import drill
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from toolmesh.router.v1 import router_pb2

R = router_pb2
DB_SERVICES = ("auth", "router", "memory", "telemetry")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp(f"release-mesh-{request.param}")
    if request.param == "postgres":
        with fresh_databases(*DB_SERVICES) as urls:
            yield from _running(drill.release_mesh(root, urls))
    else:
        yield from _running(drill.release_mesh(root))


# The first Run each mesh answered, before any test released anything: the tests share the
# mesh and run in a random order, so what the new build serves at first is taken here.
FIRST_ANSWERS: dict[int, gateway_pb2.RunResponse] = {}


def _running(mesh: Mesh) -> Iterator[Mesh]:
    asyncio.run(drill.deployed_earlier(mesh))
    with drill.running(mesh):
        FIRST_ANSWERS[id(mesh)] = asyncio.run(_first_answer(mesh))
        yield mesh


async def _first_answer(mesh: Mesh) -> gateway_pb2.RunResponse:
    token = await asyncio.to_thread(mesh.token)
    metadata = (("authorization", f"Bearer {token}"),)
    async with aio.secure_channel(mesh.gateway, mesh.credentials()) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        reply: gateway_pb2.RunResponse = await stub.Run(
            gateway_pb2.RunRequest(session_id="first", prompt="echo hello"),
            metadata=metadata,
            timeout=5,
        )
    return reply


# The whole set on SQLite; on PostgreSQL what depends on the database most: a rollback
# decided and applied by every replica, and the analyzer's lease taken over after a kill.
SQLITE_ONLY = pytest.mark.parametrize("mesh", ["sqlite"], indirect=True)


async def scenario(mesh: Mesh, body: object) -> dict[str, object]:
    token = await asyncio.to_thread(mesh.token)
    metadata = (("authorization", f"Bearer {token}"),)
    async with aio.secure_channel(mesh.gateway, mesh.credentials()) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        operator = drill.Operator(stub, metadata)
        load = drill.Load(stub, metadata)
        load.start()
        try:
            await asyncio.sleep(1.0)
            return await body(operator, load, token)  # type: ignore[operator]
        finally:
            await load.stop()


@SQLITE_ONLY
async def test_the_new_build_serves_its_stable_versions_until_released(mesh: Mesh) -> None:
    reply = FIRST_ANSWERS[id(mesh)]
    # The candidates are deployed, yet 1.0.0 (stable since the first boot) answers; the
    # response names the versions that served it.
    assert (reply.tool_name, reply.tool_version) == ("echo_word", "1.0.0")
    assert reply.answer == "echo hello" and reply.rules_version


@SQLITE_ONLY
async def test_a_good_candidate_goes_through_every_stage_under_load(mesh: Mesh) -> None:
    async def body(operator: drill.Operator, load: drill.Load, _token: str) -> dict[str, object]:
        # Whichever good version another test left stable, the other is the candidate.
        stable = await drill.stable_echo(operator)
        return await drill.good_release(operator, load, "1.0.0" if stable == "1.1.0" else "1.1.0")

    good = await scenario(mesh, body)
    assert good["state"] == "RELEASE_STATE_SUCCEEDED"
    assert good["path"] == ["gate", "step 0%", "step 20%", "step 50%", "promote", "complete"]
    assert good["failed"] == 0 and good["shadow_agreement"] == 1.0
    served = good["served"]
    assert isinstance(served, dict) and served.get("1.0.0") and served.get("1.1.0")


async def test_a_bad_candidate_is_rolled_back_within_the_plans_bounds(mesh: Mesh) -> None:
    """1.2.0 fails one call in five (the drill also releases 1.3.0, 200 ms slower; both are
    rolled back in-process too, tests/unit/router/test_releases.py)."""
    candidate = "1.2.0"

    async def body(operator: drill.Operator, load: drill.Load, _token: str) -> dict[str, object]:
        return await drill.bad_release(
            operator, load, candidate, lambda a: a.outcome == gateway_pb2.OUTCOME_FALLBACK
        )

    bad = await scenario(mesh, body)
    assert bad["state"] == "RELEASE_STATE_ROLLED_BACK", bad
    assert bad["failed_requests"] == 0, bad
    assert 0 < bad["time_to_zero_s"] <= bad["bound_s"], bad  # type: ignore[operator]
    assert 0 < bad["candidate_calls"] <= bad["candidate_calls_bound"], bad  # type: ignore[operator]
    assert candidate not in bad["served_after"], bad  # type: ignore[operator]


@SQLITE_ONLY
async def test_a_write_tool_canary_runs_every_call_once(mesh: Mesh) -> None:
    async def body(operator: drill.Operator, _load: drill.Load, token: str) -> dict[str, object]:
        return await drill.write_canary(mesh, operator, token)

    result = await scenario(mesh, body)
    assert result["plan"] == "RELEASE_PLAN_KIND_CANARY_ONLY"
    assert result["executions"] == 30 and result["runs_twice"] == 0
    served = result["served"]
    assert isinstance(served, dict) and set(served) == {"1.0.0", "1.1.0"}


async def test_killing_the_analyzer_mid_release_resumes_it_on_the_other_replica(
    mesh: Mesh,
) -> None:
    async def body(operator: drill.Operator, load: drill.Load, _token: str) -> dict[str, object]:
        return await drill.kill_the_analyzer(mesh, operator, load)

    result = await scenario(mesh, body)
    assert result["state"] in ("RELEASE_STATE_SUCCEEDED", "RELEASE_STATE_MONITORING"), result
    assert len(result["analyzers"]) == 2 and result["double_steps"] == 0, result  # type: ignore[arg-type]
    assert result["taken_over_after_s"] <= drill.LEASE_S + 2, result  # type: ignore[operator]
    # Each step judged once: 25% -> 50% -> 75% -> 100%, none twice.
    assert result["judged_at"] == [25, 50, 75], result
