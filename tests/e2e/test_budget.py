"""Budgets end to end (issue 4): the real five processes, on SQLite and on PostgreSQL.

A fresh client of tenant dev (the dev policy allows only that tenant) gets a budget of 10 tool
calls a day as a principal budget; 50 concurrent Runs as that client give exactly 10 answers
and 40 RESOURCE_EXHAUSTED naming the budget and its reset. The ledger then shows 10 used, and
the usage records of the 10 Runs are stored with their exact cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from testing.mesh import Mesh
from tests.e2e.conftest import bearer
from tests.e2e.test_security import create_client, issue
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from toolmesh.telemetry.v1 import telemetry_pb2

pytestmark = pytest.mark.e2e

T = TypeVar("T")
RUNS = 50
LIMIT = 10


def _eventually(check: Callable[[], T | None], timeout: float = 15.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.25)


async def _fire(
    mesh: Mesh, token: str, runs: int
) -> list[gateway_pb2.RunResponse | aio.AioRpcError]:
    async with aio.secure_channel(mesh.gateway, mesh.credentials()) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def one(n: int) -> gateway_pb2.RunResponse | aio.AioRpcError:
            try:
                return await stub.Run(
                    gateway_pb2.RunRequest(session_id=f"budget-{n}", prompt=f"what is {n} * 3"),
                    metadata=bearer(token),
                    timeout=30,
                )
            except aio.AioRpcError as err:
                return err

        return await asyncio.gather(*(one(n) for n in range(runs)))


def _status(err: aio.AioRpcError) -> status_pb2.Status:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no google.rpc.Status details")


def test_fifty_concurrent_runs_against_ten_tool_calls(
    mesh: Mesh, gateway: gateway_pb2_grpc.GatewayStub, token: str
) -> None:
    client_id, secret = create_client(mesh, "dev", scopes="tools:read")
    runner = issue(mesh, client_id, secret)
    budget = gateway_pb2.SetBudgetRequest(
        principal=client_id,
        period=telemetry_pb2.BUDGET_PERIOD_DAY,
        limits=telemetry_pb2.BudgetAmounts(tool_calls=LIMIT),
    )
    gateway.SetBudget(budget, metadata=bearer(token), timeout=10)
    try:
        results = asyncio.run(_fire(mesh, runner, RUNS))
        answered = [r for r in results if isinstance(r, gateway_pb2.RunResponse)]
        refused = [r for r in results if isinstance(r, aio.AioRpcError)]
        codes = sorted({r.code().name for r in refused})
        assert (len(answered), len(refused)) == (LIMIT, RUNS - LIMIT), codes
        assert codes == ["RESOURCE_EXHAUSTED"]
        assert all(r.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED for r in answered)
        assert all(r.cost_micros > 0 and r.price_version for r in answered)
        for err in refused:
            message = err.details() or ""
            assert f"principal {client_id} of tenant dev" in message, message
            assert "tool_calls limit 10" in message and "resets at" in message, message
            status = _status(err)
            quota, retry = error_details_pb2.QuotaFailure(), error_details_pb2.RetryInfo()
            kinds = {d.type_url.rsplit("/", 1)[-1] for d in status.details}
            assert kinds == {"google.rpc.QuotaFailure", "google.rpc.RetryInfo"}, kinds
            for detail in status.details:
                detail.Unpack(quota) or detail.Unpack(retry)
            assert quota.violations and "resets at" in quota.violations[0].description
            assert 0 < retry.retry_delay.seconds <= 86400

        # The usage records commit the reservations: used 10, nothing left reserved.
        def settled() -> telemetry_pb2.BudgetStatus | None:
            listed = gateway.ListBudgets(
                gateway_pb2.ListBudgetsRequest(), metadata=bearer(token), timeout=10
            )
            mine = [b for b in listed.budgets if b.principal == client_id]
            assert len(mine) == 1
            done = mine[0].used.tool_calls == LIMIT and mine[0].reserved.tool_calls == 0
            return mine[0] if done else None

        status_now = _eventually(settled)
        assert status_now.remaining.tool_calls == 0

        # The 10 usage records are stored once each, at the cost the Runs reported.
        def cost_row() -> telemetry_pb2.CostRow | None:
            reply = gateway.GetCost(
                gateway_pb2.GetCostRequest(
                    days=1, group_by=[telemetry_pb2.COST_GROUP_BY_PRINCIPAL]
                ),
                metadata=bearer(token),
                timeout=10,
            )
            rows = [r for r in reply.rows if r.principal == client_id]
            return rows[0] if rows and rows[0].requests >= RUNS else None

        row = _eventually(cost_row)
        # Every request is recorded (the refused ones too, for statistics); only the answered
        # ones used anything.
        assert row.requests == RUNS
        assert row.tool_calls == LIMIT
        assert row.cost_micros == sum(r.cost_micros for r in answered)
        assert row.currency == answered[0].currency

        # Each refusal is audited as budget.denied by that client.
        def denied() -> int:
            reply = gateway.ListAudit(
                gateway_pb2.ListAuditRequest(action="budget.denied", limit=1000),
                metadata=bearer(token),
                timeout=10,
            )
            count = sum(1 for e in reply.events if e.event.actor == client_id)
            return count if count >= RUNS - LIMIT else 0

        assert _eventually(denied) == RUNS - LIMIT

        # A budgeted Run's trace reaches into telemetry: the reservation is on its path.
        on_path = {"toolmesh-gateway", "toolmesh-router", "toolmesh-memory", "toolmesh-telemetry"}

        def services_in_trace() -> set[str] | None:
            try:
                trace = gateway.GetTrace(
                    gateway_pb2.GetTraceRequest(trace_id=answered[0].trace_id),
                    metadata=bearer(token),
                    timeout=10,
                )
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    return None  # its spans are still on their way (batched export)
                raise
            found = {s.service for s in trace.spans if s.kind == telemetry_pb2.SPAN_KIND_SERVER}
            return found if found >= on_path else None

        assert _eventually(services_in_trace) >= on_path
    finally:
        budget.limits.CopyFrom(telemetry_pb2.BudgetAmounts())
        with contextlib.suppress(grpc.RpcError):
            gateway.SetBudget(budget, metadata=bearer(token), timeout=10)
