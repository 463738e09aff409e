"""Failure behaviour over real gRPC: deadline budget, cancellation, breakers, outbox, shedding,
readiness. Each dependency fault is made in a contract fake; the gateway is the real server."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from gateway.reliability import PROBE_INTERVAL_S, Guard
from services.kit.breaker import BreakerConfig, State
from services.kit.server import Running, start
from services.kit.settings import ServiceSettings
from tests.unit.gateway.conftest import (
    GatewayUnderTest,
    ManualClock,
    bearer,
    ready_once_auth_is_back,
    start_gateway,
    start_gateway_on,
)
from tests.unit.gateway.fakes import Fakes
from toolmesh.gateway.v1 import gateway_pb2
from toolmesh.memory.v1 import memory_pb2

# The deadline tests keep a wide reserve, so that the fallback's trip back (the outbox commit,
# loopback) fits before the caller's deadline even on a loaded machine: a reply arriving at all
# proves it came in time (the call would fail with DEADLINE_EXCEEDED otherwise).
RESERVE_S = 0.25
CALLER_TIMEOUT_S = 1.0
# Timers fire late, never early; only whole milliseconds of the timeout cross the wire.
EARLY_S = 0.02


def _request(prompt: str = "what is 2 + 2", **fields: str) -> gateway_pb2.RunRequest:
    return gateway_pb2.RunRequest(
        session_id=fields.pop("session_id", "s-1"), prompt=prompt, **fields
    )


async def _timed_run(
    gw: GatewayUnderTest, timeout: float | None, prompt: str = "what is 2 + 2"
) -> tuple[gateway_pb2.RunResponse, float]:
    started = time.monotonic()
    reply = await gw.stub.Run(_request(prompt), metadata=bearer(gw.token()), timeout=timeout)
    return reply, time.monotonic() - started


async def _eventually(check: Callable[[], bool], within_s: float = 3.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def _outbox_rows(gw: GatewayUnderTest) -> list[tuple[str, str, bytes]]:
    path = Path(gw.settings.data_dir) / "gateway-outbox.db"
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT kind, key, payload FROM outbox ORDER BY id").fetchall()


class _Mesh:
    def __init__(self) -> None:
        self.stops: list[Callable[[], object]] = []
        self.clock = ManualClock()

    async def gateway(self, fakes: Fakes, **overrides: object) -> GatewayUnderTest:
        """A gateway on the mesh's manual clock (breakers, auth staleness)."""
        inner, gateway, channel, gw = await start_gateway(fakes, clock=self.clock, **overrides)
        self.stops.extend([lambda: inner.stop(0), lambda: gateway.stop(0), channel.close])
        return gw


@pytest.fixture
async def mesh() -> AsyncIterator[_Mesh]:
    made = _Mesh()
    yield made
    for stop in reversed(made.stops):
        await stop()  # type: ignore[misc]


# -- deadline budget ---------------------------------------------------------------------------


async def test_hanging_tool_answers_the_fallback_before_the_callers_deadline(mesh: _Mesh) -> None:
    gw = await mesh.gateway(Fakes(), deadline_reserve_ms=int(RESERVE_S * 1000))
    await gw.wait_ready()
    gw.fakes.router.invoke_delay_s = 10.0
    reply, elapsed = await _timed_run(gw, timeout=CALLER_TIMEOUT_S)
    assert reply.outcome == gateway_pb2.OUTCOME_FALLBACK
    assert reply.answer == "The calculator is unavailable."
    assert list(reply.degraded) == ["tool:calculator"]
    # The tool had all the time there was: up to the caller's deadline less the reserve.
    assert CALLER_TIMEOUT_S - RESERVE_S - EARLY_S < elapsed < CALLER_TIMEOUT_S
    # The gateway gave up on the hanging call: the tool saw it cancelled.
    await _eventually(lambda: "InvokeTool" in gw.fakes.router.cancelled)
    # No time was left for memory, so the turn went to the outbox and is delivered later.
    await _eventually(lambda: gw.fakes.memory.stored[reply.request_id] == 1)


async def test_hanging_router_answers_the_fallback_before_the_callers_deadline(
    mesh: _Mesh,
) -> None:
    gw = await mesh.gateway(Fakes(), deadline_reserve_ms=int(RESERVE_S * 1000))
    await gw.wait_ready()
    gw.fakes.router.route_delay_s = 10.0
    reply, elapsed = await _timed_run(gw, timeout=CALLER_TIMEOUT_S)
    assert reply.outcome == gateway_pb2.OUTCOME_FALLBACK
    assert list(reply.degraded) == ["router"]
    assert elapsed < CALLER_TIMEOUT_S
    await _eventually(lambda: "Route" in gw.fakes.router.cancelled)


async def test_without_a_caller_deadline_the_default_bounds_a_hanging_tool(mesh: _Mesh) -> None:
    gw = await mesh.gateway(
        Fakes(), default_deadline_s=CALLER_TIMEOUT_S, deadline_reserve_ms=int(RESERVE_S * 1000)
    )
    await gw.wait_ready()
    gw.fakes.router.invoke_delay_s = 10.0
    reply, elapsed = await _timed_run(gw, timeout=None)
    assert reply.outcome == gateway_pb2.OUTCOME_FALLBACK
    # Bounded by the default deadline (the call itself has none), not by the 10 s tool.
    assert CALLER_TIMEOUT_S - RESERVE_S - EARLY_S < elapsed < CALLER_TIMEOUT_S + RESERVE_S


async def test_caller_cancelling_cancels_the_downstream_call(gw: GatewayUnderTest) -> None:
    gw.fakes.router.invoke_delay_s = 10.0
    call = gw.stub.Run(_request(), metadata=bearer(gw.token()), timeout=5)
    await asyncio.wait_for(gw.fakes.router.invoke_started.wait(), 2)
    call.cancel()
    await _eventually(lambda: "InvokeTool" in gw.fakes.router.cancelled, within_s=1)


# -- circuit breakers --------------------------------------------------------------------------

_FAST_BREAKER = {
    "breaker_window": 4,
    "breaker_minimum_calls": 4,
    "breaker_open_s": 0.3,
    "breaker_half_open_calls": 2,
}


async def test_router_breaker_opens_fails_fast_half_opens_and_closes(mesh: _Mesh) -> None:
    gw = await mesh.gateway(Fakes(), **_FAST_BREAKER)
    await gw.wait_ready()
    router = gw.fakes.router
    router.route_error = grpc.StatusCode.INTERNAL
    for _ in range(4):
        reply, _ = await _timed_run(gw, timeout=2)
        assert list(reply.degraded) == ["router"]
    calls = len(router.routes)
    # Open, and stays open however long the call takes while the clock stands still: the router
    # would answer after 1.5 s, inside the caller's 2 s, were it called.
    router.route_delay_s = 1.5
    reply, elapsed = await _timed_run(gw, timeout=2)
    assert reply.outcome == gateway_pb2.OUTCOME_FALLBACK and list(reply.degraded) == ["router"]
    assert len(router.routes) == calls, "an open breaker must not call the router"
    assert elapsed < 1.0, "an open breaker answers at once"
    router.route_delay_s = 0.0
    mesh.clock.advance(0.25)
    await _timed_run(gw, timeout=2)
    assert len(router.routes) == calls, "still open before open_s"
    # Half-open after open_s: a failing trial opens it again at once.
    mesh.clock.advance(0.1)
    await _timed_run(gw, timeout=2)
    assert len(router.routes) == calls + 1
    await _timed_run(gw, timeout=2)
    assert len(router.routes) == calls + 1
    # Recovered: two successful trials close it, and every call goes through again.
    router.route_error = None
    mesh.clock.advance(0.5)
    for _ in range(4):
        reply, _ = await _timed_run(gw, timeout=2)
        assert reply.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED
    assert len(router.routes) == calls + 5


async def test_tool_breaker_gives_the_fallback_without_calling_the_tool(mesh: _Mesh) -> None:
    gw = await mesh.gateway(Fakes(), **_FAST_BREAKER)
    await gw.wait_ready()
    router = gw.fakes.router
    router.invoke_error = (grpc.StatusCode.INTERNAL, "tool broke")
    for _ in range(4):
        await _timed_run(gw, timeout=2)
    invoked = len(router.invocations)
    reply, _ = await _timed_run(gw, timeout=2)
    assert reply.answer == "The calculator is unavailable."
    assert list(reply.degraded) == ["tool:calculator"]
    assert reply.usage.tool_calls == 0
    assert len(router.invocations) == invoked
    # The router's own breaker is untouched: routing still happens.
    assert router.routes[-1].prompt == "what is 2 + 2"


# -- durable outbox ----------------------------------------------------------------------------


async def test_memory_down_queues_the_turns_and_the_relay_delivers_them_once(
    gw: GatewayUnderTest,
) -> None:
    memory = gw.fakes.memory
    memory.fail_reads = memory.fail_writes = True
    reply, _ = await _timed_run(gw, timeout=2)
    assert reply.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED
    assert list(reply.degraded) == ["memory"]
    # The Run's usage record went in the same commit (kind usage, delivered to telemetry).
    rows = [row for row in _outbox_rows(gw) if row[0] == "memory"]
    assert [(kind, key) for kind, key, _ in rows] == [("memory", f"memory:{reply.request_id}")]
    queued = memory_pb2.AppendTurnsRequest.FromString(rows[0][2])
    assert queued.request_id == reply.request_id
    assert [t.content for t in queued.turns] == ["what is 2 + 2", "calculator says 391"]
    assert memory.stored[reply.request_id] == 0
    memory.fail_reads = memory.fail_writes = False
    await _eventually(lambda: memory.stored[reply.request_id] == 1)
    await _eventually(lambda: _outbox_rows(gw) == [])
    await asyncio.sleep(0.2)
    assert memory.stored[reply.request_id] == 1
    stored = memory.turns[("acme", "s-1")]
    assert [t.content for t in stored] == ["what is 2 + 2", "calculator says 391"]


async def test_a_restarted_gateway_delivers_what_its_outbox_holds(tmp_path: Path) -> None:
    fakes = Fakes()
    fakes.memory.fail_writes = True
    inner = await start(ServiceSettings(port=0), fakes.register)
    try:
        first, channel, gw = await start_gateway_on(inner.port, fakes, data_dir=str(tmp_path))
        try:
            await gw.wait_ready()
            replies = [(await _timed_run(gw, timeout=2))[0] for _ in range(3)]
        finally:
            await channel.close()
            await first.stop(0)
        ids = [r.request_id for r in replies]
        assert len(set(ids)) == 3 and sum(fakes.memory.stored.values()) == 0
        fakes.memory.fail_writes = False
        second, channel, gw = await start_gateway_on(inner.port, fakes, data_dir=str(tmp_path))
        try:
            await _eventually(lambda: all(fakes.memory.stored[i] == 1 for i in ids))
            await _eventually(lambda: _outbox_rows(gw) == [])
        finally:
            await channel.close()
            await second.stop(0)
        assert sorted(fakes.memory.stored.elements()) == sorted(ids)
    finally:
        await inner.stop(0)


async def test_outbox_write_failing_means_unavailable_and_no_answer(gw: GatewayUnderTest) -> None:
    gw.fakes.memory.fail_writes = True
    # Another writer holds the outbox file: the gateway's commit cannot happen in time.
    blocker = sqlite3.connect(Path(gw.settings.data_dir) / "gateway-outbox.db", timeout=0)
    blocker.isolation_level = None
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        call = gw.stub.Run(_request(), metadata=bearer(gw.token()), timeout=0.6)
        with pytest.raises(aio.AioRpcError) as err:
            await call
        # UNAVAILABLE, not DEADLINE_EXCEEDED: the gateway answered before the caller's deadline.
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "could not be stored" in (err.value.details() or "")
        assert sum(gw.fakes.memory.stored.values()) == 0
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


# -- load shedding -----------------------------------------------------------------------------


def _retry_delay(status: object) -> float | None:
    for detail in getattr(status, "details", []):
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToMilliseconds() / 1000
    return None


async def test_runs_over_the_cap_are_refused_at_once_with_retry_info(mesh: _Mesh) -> None:
    gw = await mesh.gateway(Fakes(), max_inflight_runs=2, admission_wait_ms=0)
    await gw.wait_ready()
    gw.fakes.router.invoke_delay_s = 1.0
    busy = [
        asyncio.ensure_future(gw.stub.Run(_request(), metadata=bearer(gw.token()), timeout=5))
        for _ in range(2)
    ]
    await _eventually(lambda: len(gw.fakes.router.invocations) == 2)
    call = gw.stub.Run(_request(), metadata=bearer(gw.token()), timeout=5)
    with pytest.raises(aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # At once: refused while both slots were still held, not after waiting for one to free up
    # (each is held for a second), however slow the machine.
    assert not any(run.done() for run in busy)
    assert _retry_delay(await rpc_status.aio.from_call(call)) == pytest.approx(0.2)
    replies = await asyncio.gather(*busy)
    assert {r.outcome for r in replies} == {gateway_pb2.OUTCOME_TOOL_ANSWERED}
    # Capacity is back once they are done.
    reply, _ = await _timed_run(gw, timeout=2)
    assert reply.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED


async def test_a_run_over_the_cap_waits_briefly_for_a_slot(mesh: _Mesh) -> None:
    """Healthy load a little over the cap queues (first come, first served) instead of
    failing; only a wait past admission_wait_ms is refused."""
    gw = await mesh.gateway(Fakes(), max_inflight_runs=1, admission_wait_ms=2000)
    await gw.wait_ready()
    gw.fakes.router.invoke_delay_s = 0.2
    replies = await asyncio.gather(
        *(gw.stub.Run(_request(), metadata=bearer(gw.token()), timeout=5) for _ in range(3))
    )
    assert {r.outcome for r in replies} == {gateway_pb2.OUTCOME_TOOL_ANSWERED}


async def test_one_tenant_at_its_limit_does_not_starve_another(mesh: _Mesh) -> None:
    fakes = Fakes()
    fakes.auth.tenants["other"] = ["*"]
    gw = await mesh.gateway(
        fakes, max_inflight_per_tenant=2, max_inflight_runs=50, admission_wait_ms=0
    )
    await gw.wait_ready()
    gw.fakes.router.invoke_delay_s = 0.5
    busy = [
        asyncio.ensure_future(gw.stub.Run(_request(), metadata=bearer(gw.token()), timeout=5))
        for _ in range(2)
    ]
    await _eventually(lambda: len(gw.fakes.router.invocations) == 2)
    call = gw.stub.Run(_request(), metadata=bearer(gw.token()), timeout=5)
    with pytest.raises(aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant acme at capacity" in (err.value.details() or "")
    assert _retry_delay(await rpc_status.aio.from_call(call)) == pytest.approx(0.2)
    # Another tenant still gets through while acme is at its limit.
    other = await gw.stub.Run(_request(), metadata=bearer(gw.token(tenant="other")), timeout=5)
    assert other.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED
    assert {r.outcome for r in await asyncio.gather(*busy)} == {gateway_pb2.OUTCOME_TOOL_ANSWERED}


async def test_tool_calls_over_the_per_tool_cap_are_refused_at_once(mesh: _Mesh) -> None:
    gw = await mesh.gateway(Fakes(), max_inflight_per_tool=1, admission_wait_ms=0)
    await gw.wait_ready()
    gw.fakes.router.invoke_delay_s = 0.4
    busy = asyncio.ensure_future(gw.stub.Run(_request(), metadata=bearer(gw.token()), timeout=5))
    await _eventually(lambda: len(gw.fakes.router.invocations) == 1)
    call = gw.stub.Run(_request(), metadata=bearer(gw.token()), timeout=5)
    with pytest.raises(aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "calculator" in (err.value.details() or "")
    assert _retry_delay(await rpc_status.aio.from_call(call)) is not None
    assert len(gw.fakes.router.invocations) == 1
    # Another tool has its own bulkhead.
    other = await gw.stub.Run(_request("note: buy milk"), metadata=bearer(gw.token()), timeout=5)
    assert other.tool_name == "save_note"
    assert (await busy).outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED


# -- readiness ---------------------------------------------------------------------------------


async def _health(gateway: Running) -> int:
    async with aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="toolmesh.gateway.v1.Gateway"), timeout=1
        )
        return int(reply.status)


async def test_not_serving_until_auth_state_arrives() -> None:
    fakes = Fakes()
    fakes.auth.down = True
    inner, gateway, channel, gw = await start_gateway(fakes)
    try:
        await asyncio.sleep(0.3)
        assert await _health(gateway) == health_pb2.HealthCheckResponse.NOT_SERVING
        fakes.auth.down = False
        await gw.wait_ready()
        deadline = time.monotonic() + 2
        while await _health(gateway) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    finally:
        await channel.close()
        await gateway.stop(0)
        await inner.stop(0)


# -- auth down, forwarded errors ---------------------------------------------------------------


async def test_auth_down_keeps_verifying_within_staleness_then_fails_closed(mesh: _Mesh) -> None:
    gw = await mesh.gateway(Fakes(), auth_refresh_s=0.02, auth_staleness_s=0.8, **_FAST_BREAKER)
    await gw.wait_ready()
    auth = gw.fakes.auth
    auth.down = True
    # Refreshes fail until the auth breaker opens and skips them; cached keys still verify.
    await _eventually(lambda: auth.refused >= 4)
    mesh.clock.advance(0.8)
    reply, _ = await _timed_run(gw, timeout=2)
    assert reply.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED
    mesh.clock.advance(0.01)
    call = gw.stub.Run(_request(), metadata=bearer(gw.token()), timeout=2)
    with pytest.raises(aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _retry_delay(await rpc_status.aio.from_call(call)) is not None
    auth.down = False
    await ready_once_auth_is_back(gw, mesh.clock)  # the breaker half-opens, a trial succeeds


async def test_a_forwarded_error_keeps_its_status_details(gw: GatewayUnderTest) -> None:
    gw.fakes.router.list_error = (grpc.StatusCode.INVALID_ARGUMENT, "allowed_tools")
    call = gw.stub.ListTools(gateway_pb2.ListToolsRequest(), metadata=bearer(gw.token()))
    with pytest.raises(aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "router: allowed_tools: not acceptable"
    status = await rpc_status.aio.from_call(call)
    assert status is not None and status.message == err.value.details()
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert [v.field for v in bad_request.field_violations] == ["allowed_tools"]


# -- retries -----------------------------------------------------------------------------------


async def test_a_write_tool_is_retried_once_on_unavailable_with_the_same_key(
    gw: GatewayUnderTest,
) -> None:
    gw.fakes.router.invoke_unavailable_times = 1
    reply = await gw.stub.Run(_request("note: buy milk"), metadata=bearer(gw.token()), timeout=5)
    assert reply.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED
    keys = [i.idempotency_key for i in gw.fakes.router.invocations]
    assert keys == [reply.request_id, reply.request_id]


async def test_a_tool_unavailable_twice_is_not_retried_a_third_time(gw: GatewayUnderTest) -> None:
    gw.fakes.router.invoke_unavailable_times = 5
    reply, _ = await _timed_run(gw, timeout=5)
    assert reply.outcome == gateway_pb2.OUTCOME_FALLBACK
    assert len(gw.fakes.router.invocations) == 2


async def test_an_open_breaker_asks_the_dependency_whether_it_is_back() -> None:
    """The outbox relay's shortcut out of an open breaker: a probe answering healthy lets the
    trial calls through at once; probes are spaced, and a closed breaker is never probed."""
    now = [100.0]
    healthy = [False]
    probes = [0]

    async def probe() -> bool:
        probes[0] += 1
        return healthy[0]

    guard = Guard(BreakerConfig(minimum_calls=1, open_wait_s=5.0), clock=lambda: now[0])
    guard.add_probe("memory", probe)
    assert not await guard.recovered("memory")
    assert probes[0] == 0  # closed: nothing to ask
    breaker = guard.breakers.get("memory")
    breaker.record(False, 0.01, breaker.acquire())
    assert breaker.state is State.OPEN
    assert not await guard.recovered("memory")  # still down
    healthy[0] = True
    assert not await guard.recovered("memory")  # asked too soon after the last probe
    assert probes[0] == 1
    now[0] += PROBE_INTERVAL_S
    assert await guard.recovered("memory")
    assert breaker.state is State.HALF_OPEN
    assert not await guard.recovered("unprobed")
    # Senders asking at once (the relay's concurrent deliveries) share one probe's verdict.
    breaker.record(False, 0.01, breaker.acquire())
    assert breaker.state is State.OPEN
    now[0] += PROBE_INTERVAL_S
    asked = probes[0]
    assert await asyncio.gather(*(guard.recovered("memory") for _ in range(5))) == [True] * 5
    assert probes[0] == asked + 1
