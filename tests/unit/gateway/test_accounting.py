"""Cost and governance in the gateway's Run: a real gateway in front of contract fakes, with
a telemetry fake (fake_ledger) that prices, budgets, de-duplicates and can go down."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.kit.pricing import cost_micros
from tests.unit.gateway.conftest import GatewayUnderTest, ManualClock, bearer, start_gateway
from tests.unit.gateway.fake_ledger import PRICES, LedgerTelemetry
from tests.unit.gateway.fakes import Fakes
from toolmesh.gateway.v1 import gateway_pb2
from toolmesh.telemetry.v1 import telemetry_pb2

READ = "what is 17 + 25"
WRITE = "note: buy more coffee"


async def _eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.02)


class Ledgered:
    def __init__(self, gw: GatewayUnderTest, ledger: LedgerTelemetry) -> None:
        self.gw = gw
        self.ledger = ledger

    async def run(
        self, prompt: str = READ, sub: str = "client-1", **claims: object
    ) -> gateway_pb2.RunResponse:
        return await self.gw.stub.Run(
            gateway_pb2.RunRequest(session_id="s-1", prompt=prompt),
            metadata=bearer(self.gw.token(sub=sub, **claims)),
            timeout=5,
        )

    async def refused(self, prompt: str = READ, sub: str = "client-1") -> aio.AioRpcError:
        with pytest.raises(aio.AioRpcError) as err:
            await self.run(prompt, sub=sub)
        return err.value

    async def learn_unbudgeted(self) -> None:
        """One Run so the gateway knows client-1 has no budget, delivered and forgotten."""
        await self.run(READ)
        await _eventually(lambda: self.outbox_rows() == [] and len(self.ledger.usage) == 1)
        self.ledger.usage.clear()

    def outbox_rows(self) -> list[tuple[str, str]]:
        path = Path(self.gw.settings.data_dir) / "gateway-outbox.db"
        with sqlite3.connect(path) as conn:
            return conn.execute("SELECT kind, key FROM outbox ORDER BY id").fetchall()


async def _start(**overrides: object) -> tuple[Ledgered, Callable[[], object]]:
    ledger = LedgerTelemetry()
    fakes = Fakes(telemetry=ledger)
    settings: dict[str, object] = {"prices_refresh_s": 0.05, "budget_state_ttl_s": 0.2}
    inner, gateway, channel, gw = await start_gateway(fakes, **(settings | overrides))
    await gw.wait_ready()
    await _eventually(lambda: ledger.prices_calls > 0)
    await asyncio.sleep(0.05)

    async def stop() -> None:
        await channel.close()
        await gateway.stop(0)
        await inner.stop(0)

    return Ledgered(gw, ledger), stop


@pytest.fixture
async def lg() -> AsyncIterator[Ledgered]:
    ledgered, stop = await _start()
    yield ledgered
    await stop()  # type: ignore[misc]


def _details(err: aio.AioRpcError) -> status_pb2.Status:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no google.rpc.Status details")


# -- prices -----------------------------------------------------------------------------------


async def test_the_response_carries_the_cost_from_the_price_table(lg: Ledgered) -> None:
    reply = await lg.run(READ)
    usage = reply.usage
    assert (usage.tool_calls, usage.cost_units) == (1, 2)
    expected = cost_micros(
        PRICES, usage.tokens_in, usage.tokens_out, usage.tool_calls, usage.cost_units
    )
    assert expected > 0
    assert (reply.cost_micros, reply.currency, reply.price_version) == (
        expected,
        "EUR",
        "unit-prices-7",
    )
    # The same figures reach telemetry, which prices them with the same function.
    await _eventually(lambda: len(lg.ledger.usage) == 1)
    record = lg.ledger.usage[0]
    assert (record.tokens_in, record.tokens_out, record.tool_calls, record.cost_units) == (
        usage.tokens_in,
        usage.tokens_out,
        usage.tool_calls,
        usage.cost_units,
    )


async def test_until_prices_arrive_runs_are_unpriced_and_say_so() -> None:
    ledger = LedgerTelemetry()
    ledger.down = True
    inner, gateway, channel, gw = await start_gateway(
        Fakes(telemetry=ledger), budget_fail_open=True
    )
    try:
        await gw.wait_ready()
        reply = await gw.stub.Run(
            gateway_pb2.RunRequest(session_id="s", prompt="hello there"),
            metadata=bearer(gw.token()),
            timeout=5,
        )
        assert (reply.cost_micros, reply.currency, reply.price_version) == (0, "", "unpriced")
    finally:
        await channel.close()
        await gateway.stop(0)
        await inner.stop(0)


# -- budgets ----------------------------------------------------------------------------------


async def test_over_budget_is_resource_exhausted_with_details_and_no_tool_runs(
    lg: Ledgered,
) -> None:
    lg.ledger.limits[("acme", "client-1")] = 1
    first = await lg.run(READ)
    assert first.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED
    invocations = len(lg.gw.fakes.router.invocations)
    err = await lg.refused(READ)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over budget: principal client-1 of tenant acme" in (err.details() or "")
    assert "resets at" in (err.details() or "")
    status = _details(err)
    assert status.message == err.details()
    quota, retry = error_details_pb2.QuotaFailure(), error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(quota) and status.details[1].Unpack(retry)
    assert quota.violations[0].subject == "tenant:acme"
    assert retry.retry_delay.seconds > 0
    assert len(lg.gw.fakes.router.invocations) == invocations, "a tool ran over budget"
    # The first Run's usage committed its reservation; the refusal is audited.
    await _eventually(lambda: len(lg.ledger.committed) == 1)
    assert lg.ledger.usage[0].reservation_id == lg.ledger.committed[0]
    await _eventually(lambda: "budget.denied" in lg.ledger.actions())
    denied = next(e for e in lg.ledger.audit if e.action == "budget.denied")
    assert (denied.tenant, denied.actor) == ("acme", "client-1")
    assert denied.target == "/toolmesh.gateway.v1.Gateway/Run"
    assert "over budget" in json.loads(denied.details_json)["reason"]


async def test_a_caller_without_budget_pays_no_hop_once_known() -> None:
    clock = ManualClock()
    lg, stop = await _start(clock=clock)  # budget_state_ttl_s=0.2 on this clock
    try:
        for _ in range(3):
            await lg.run(READ)
        assert (lg.ledger.reserve_calls, lg.ledger.state_calls) == (1, 0)
        # Past the TTL the "no budget" answer is re-checked in the background, not per Run.
        clock.advance(0.3)
        await lg.run(READ)
        await _eventually(lambda: lg.ledger.state_calls >= 1)
        assert (lg.ledger.reserve_calls, lg.ledger.state_calls) == (1, 1)
        # A budget set meanwhile is seen after the next background check.
        lg.ledger.limits[("acme", "")] = 100
        await lg.run(READ)
        assert lg.ledger.state_calls == 1, "re-checked once per TTL"
        clock.advance(0.3)
        await lg.run(READ)
        await _eventually(lambda: lg.ledger.state_calls >= 2)
        await lg.run(READ)
        assert lg.ledger.reserve_calls == 2
    finally:
        await stop()  # type: ignore[misc]


async def test_ledger_down_with_a_budget_fails_closed_without_budget_runs(lg: Ledgered) -> None:
    lg.ledger.limits[("acme", "budgeted")] = 100
    await lg.run(READ, sub="budgeted")
    await lg.run(READ, sub="free")
    lg.ledger.down = True
    before = len(lg.gw.fakes.router.invocations)
    err = await lg.refused(READ, sub="budgeted")
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "budget ledger is unavailable" in (err.details() or "")
    assert len(lg.gw.fakes.router.invocations) == before
    # A caller known to have no budget still runs; a budgeted Run that would need no tool
    # is checked all the same (its prompt's tokens count against the budget).
    reply = await lg.run(READ, sub="free")
    assert reply.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED
    assert (await lg.refused("hello", sub="budgeted")).code() == grpc.StatusCode.UNAVAILABLE
    # A caller never seen may have a budget: closed as well.
    assert (await lg.refused(READ, sub="stranger")).code() == grpc.StatusCode.UNAVAILABLE


async def test_budget_fail_open_runs_the_tool_and_says_so() -> None:
    lg, stop = await _start(budget_fail_open=True)
    try:
        lg.ledger.limits[("acme", "client-1")] = 100
        lg.ledger.down = True
        reply = await lg.run(READ)
        assert reply.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED
        assert list(reply.degraded) == ["budget"]
    finally:
        await stop()  # type: ignore[misc]


# -- usage and audit through the outbox --------------------------------------------------------


async def test_usage_and_audit_are_committed_together_and_delivered_once(lg: Ledgered) -> None:
    await lg.learn_unbudgeted()
    lg.ledger.down = True  # nothing is delivered yet, so the outbox shows what was committed
    reply = await lg.run(WRITE)
    assert reply.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED
    rows = lg.outbox_rows()
    assert ("usage", f"usage:{reply.request_id}") in rows
    audit_keys = [key for kind, key in rows if kind == "audit"]
    assert len(audit_keys) == 1
    lg.ledger.down = False
    await _eventually(lambda: lg.outbox_rows() == [])
    await asyncio.sleep(0.2)
    assert [r.request_id for r in lg.ledger.usage] == [reply.request_id]
    record = lg.ledger.usage[0]
    assert (record.tenant, record.principal, record.route) == (
        "acme",
        "client-1",
        "/toolmesh.gateway.v1.Gateway/Run",
    )
    assert (record.tool_name, record.tool_version, record.outcome) == (
        "save_note",
        "1.0.0",
        "ok",
    )
    assert record.occurred_at.seconds > 0
    [event] = lg.ledger.audit
    assert (event.action, event.outcome, event.tenant, event.actor) == (
        "tool.write",
        "success",
        "acme",
        "client-1",
    )
    assert event.request_id == reply.request_id and event.trace_id == reply.trace_id
    assert event.policy_version == "test-1"
    assert list(event.contract_versions) == ["toolmesh.gateway.v1", "toolmesh.router.v1"]
    assert json.loads(event.details_json)["tool"] == "save_note@1.0.0"


async def test_telemetry_down_means_delivered_after_it_comes_back() -> None:
    # The telemetry breaker opens while it is down; a short open period keeps the test quick.
    lg, stop = await _start(breaker_open_s=0.3)
    try:
        await lg.learn_unbudgeted()
        lg.ledger.down = True
        replies = [await lg.run(READ) for _ in range(3)]
        assert all(r.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED for r in replies)
        await asyncio.sleep(0.3)
        assert lg.ledger.usage == []
        lg.ledger.down = False
        ids = sorted(r.request_id for r in replies)
        await _eventually(lambda: sorted(r.request_id for r in lg.ledger.usage) == ids)
        await _eventually(lambda: lg.outbox_rows() == [])
    finally:
        await stop()  # type: ignore[misc]


async def test_a_retried_run_records_its_usage_and_write_once(lg: Ledgered) -> None:
    request = gateway_pb2.RunRequest(session_id="s", prompt=WRITE, idempotency_key="k-1")
    token = lg.gw.token()
    first = await lg.gw.stub.Run(request, metadata=bearer(token), timeout=5)
    second = await lg.gw.stub.Run(request, metadata=bearer(token), timeout=5)
    assert first.request_id == second.request_id
    await _eventually(lambda: lg.outbox_rows() == [] and len(lg.ledger.usage) == 1)
    await asyncio.sleep(0.2)
    assert len(lg.ledger.usage) == 1
    assert lg.ledger.actions() == ["tool.write"]


async def test_the_record_says_how_long_the_request_and_its_tool_took(lg: Ledgered) -> None:
    """Statistics, SLOs and tool health are computed from these fields alone: a tool that
    answered is OK (REFUSED when it reported an error for the input, FAILED when it failed),
    and the durations are the request's and the tool's own, in milliseconds."""
    started = time.perf_counter()
    answered = await lg.run(READ)
    took_ms = (time.perf_counter() - started) * 1000
    lg.gw.fakes.router.tool_error = True
    declined = await lg.run(READ)
    lg.gw.fakes.router.tool_error = False
    lg.gw.fakes.router.invoke_error = (grpc.StatusCode.INTERNAL, "disk full")
    failed = await lg.run(READ)
    await _eventually(lambda: len(lg.ledger.usage) == 3)
    records = {r.request_id: r for r in lg.ledger.usage}
    record = records[answered.request_id]
    assert 0 < record.tool_duration_ms <= record.duration_ms <= took_ms
    assert [records[r.request_id].tool_outcome for r in (answered, declined, failed)] == [
        telemetry_pb2.TOOL_OUTCOME_OK,
        telemetry_pb2.TOOL_OUTCOME_REFUSED,
        telemetry_pb2.TOOL_OUTCOME_FAILED,
    ]


async def test_a_failed_write_is_audited_as_a_failure(lg: Ledgered) -> None:
    lg.gw.fakes.router.invoke_error = (grpc.StatusCode.INTERNAL, "disk full")
    reply = await lg.run(WRITE)
    assert reply.outcome == gateway_pb2.OUTCOME_FALLBACK
    await _eventually(lambda: "tool.write" in lg.ledger.actions() and len(lg.ledger.usage) == 1)
    event = next(e for e in lg.ledger.audit if e.action == "tool.write")
    assert (event.outcome, event.target) == ("failure", "save_note")
    assert lg.ledger.usage[0].outcome == "fallback"
    assert lg.ledger.usage[0].tool_calls == 1


async def test_denials_are_audited_with_their_reason(lg: Ledgered) -> None:
    with pytest.raises(aio.AioRpcError) as raised:
        await lg.run(WRITE, scope="tools:read")
    err = raised.value
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    await _eventually(lambda: "permission.denied" in lg.ledger.actions())
    event = next(e for e in lg.ledger.audit if e.action == "permission.denied")
    assert event.tenant == "acme" and event.target == "save_note"
    details = json.loads(event.details_json)
    assert details["reason"] == "tool save_note needs scope tools:write"
    assert details["tool"] == "save_note@1.0.0"


async def test_auth_failures_are_audited_without_the_token_and_rate_limited() -> None:
    # The limiter's clock stands still: however slowly the 21 calls go, one burst is allowed.
    lg, stop = await _start(audit_auth_failures_per_s=3, clock=ManualClock())
    try:
        expired = lg.gw.token(sub="late", tenant="acme", iat=1000, nbf=1000, exp=1100)
        garbage = "not.a.token"
        for token in [expired] + [garbage] * 20:
            with pytest.raises(aio.AioRpcError) as err:
                await lg.gw.stub.Run(
                    gateway_pb2.RunRequest(session_id="s", prompt=READ),
                    metadata=bearer(token),
                    timeout=5,
                )
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await _eventually(lambda: lg.outbox_rows() == [] and len(lg.ledger.audit) >= 3)
        await asyncio.sleep(0.2)
        events = lg.ledger.audit
        # A burst of 3 per second: not one event per refused token.
        assert len(events) == 3, len(events)
        assert {e.action for e in events} == {"auth.failure"}
        # The expired token's signature verifies: its tenant and subject are known.
        assert (events[0].tenant, events[0].actor) == ("acme", "late")
        assert json.loads(events[0].details_json)["reason"] == "token expired"
        assert {(e.tenant, e.actor) for e in events[1:]} == {("_unknown", "")}
        for event in events:
            assert expired not in event.SerializeToString().decode(errors="replace")
    finally:
        await stop()  # type: ignore[misc]


async def test_run_span_carries_the_genai_usage_attributes(spans: InMemorySpanExporter) -> None:
    lg, stop = await _start()
    try:
        reply = await lg.run(READ)
    finally:
        await stop()  # type: ignore[misc]
    run_span = [s for s in spans.get_finished_spans() if s.name.endswith("Gateway/Run")][-1]
    attributes = dict(run_span.attributes or {})
    assert attributes["gen_ai.tool.name"] == "calculator"
    assert attributes["gen_ai.usage.input_tokens"] == reply.usage.tokens_in
    assert attributes["gen_ai.usage.output_tokens"] == reply.usage.tokens_out
