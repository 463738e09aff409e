"""Model tokens in the ledger: prices per model (the table's defaults for a model it does not
list), cost grouped by model, and a reservation raised before a model call (top_up) that checks
only the increase, so concurrent requests never pass a token limit together."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc import aio

from services.kit.pricing import PriceTable, cost_micros
from toolmesh.telemetry.v1 import telemetry_pb2 as G

from .conftest import TelemetryServer
from .helpers import caller, stamp
from .test_ledger import DAY1, reserve, usage


async def test_prices_per_model_are_served_and_used_at_ingest(server: TelemetryServer) -> None:
    table = PriceTable.load(server.settings.prices_file)
    prices = await server.stub.GetPrices(G.GetPricesRequest())
    served = {m.model: m for m in prices.models}
    assert served["gemma-3-270m"].input_per_1k_tokens_micros == 20
    assert served["gemma-3-270m"].output_per_1k_tokens_micros == 80
    records = [
        usage("m1", tokens_in=1000, tokens_out=500, tool_calls=1, model="gemma-3-270m"),
        usage("m2", tokens_in=1000, tokens_out=500, tool_calls=1, model="unlisted-model"),
        usage("m3", tool_calls=1),
    ]
    await server.stub.RecordUsage(G.RecordUsageRequest(records=records))
    rows = await server.stub.GetCost(
        G.GetCostRequest(
            caller=caller("acme"),
            group_by=[G.COST_GROUP_BY_MODEL],
            start=stamp(DAY1.replace(hour=0)),
            end=stamp(DAY1.replace(hour=23)),
        )
    )
    by_model = {row.model: row for row in rows.rows}
    assert set(by_model) == {"", "gemma-3-270m", "unlisted-model"}
    # 1000 * 20 + 500 * 80 = 60,000 thousandths (60 micros) + 200 for the call.
    assert by_model["gemma-3-270m"].cost_micros == 260
    assert by_model["gemma-3-270m"].cost_micros == cost_micros(
        table, 1000, 500, 1, 0, model="gemma-3-270m"
    )
    # A model the table does not list: the default token prices (3 + 7.5 + 0.2 = 10,700).
    assert by_model["unlisted-model"].cost_micros == 10_700
    assert (by_model[""].tokens_in, by_model[""].cost_micros) == (0, 200)


async def test_a_usage_record_names_its_prompts(server: TelemetryServer) -> None:
    bad = usage("p1", prompts=["route-system@1", "a,b"])
    with pytest.raises(aio.AioRpcError) as refused:
        await server.stub.RecordUsage(G.RecordUsageRequest(records=[bad]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "records[0].prompts" in str(refused.value.debug_error_string())
    good = usage("p2", prompts=["route-system@1", "answer@3"], model="m")
    assert (await server.stub.RecordUsage(G.RecordUsageRequest(records=[good]))).stored == 1


async def _set_tokens(server: TelemetryServer, limit: int) -> None:
    await server.stub.SetBudget(
        G.SetBudgetRequest(
            caller=caller("acme", scopes=("admin",)),
            period=G.BUDGET_PERIOD_DAY,
            limits=G.BudgetAmounts(tokens=limit),
        )
    )


async def _state(server: TelemetryServer) -> G.BudgetStatus:
    return (await server.stub.ListBudgets(G.ListBudgetsRequest(caller=caller("acme")))).budgets[0]


async def test_top_up_raises_a_reservation_checking_only_the_increase(
    server: TelemetryServer,
) -> None:
    await _set_tokens(server, 1000)
    first = await reserve(server, "a", tool_calls=1)
    raised = await reserve(server, "a", tool_calls=1, tokens=900, top_up=True)
    assert raised.reservation_id == first.reservation_id
    assert (await _state(server)).reserved.tokens == 900
    # Asking the same (or less) again changes nothing: a retried top-up is harmless.
    await reserve(server, "a", tool_calls=1, tokens=900, top_up=True)
    await reserve(server, "a", tool_calls=1, tokens=10, top_up=True)
    assert (await _state(server)).reserved.tokens == 900
    # Another request's top-up past the limit is refused; its own reservation stays as it was.
    await reserve(server, "b", tool_calls=1)
    with pytest.raises(aio.AioRpcError) as refused:
        await reserve(server, "b", tool_calls=1, tokens=101, top_up=True)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tokens limit 1000" in (refused.value.details() or "")
    assert (await _state(server)).reserved.tokens == 900
    # Without top_up the same request id returns its reservation unchanged (idempotent).
    await reserve(server, "a", tool_calls=1, tokens=5000)
    assert (await _state(server)).reserved.tokens == 900


async def test_fifty_concurrent_top_ups_never_pass_the_limit(server: TelemetryServer) -> None:
    await _set_tokens(server, 1000)
    for i in range(50):
        await reserve(server, f"r{i}", subject=f"u{i}", tool_calls=1)

    async def top_up(i: int) -> bool:
        try:
            await reserve(server, f"r{i}", subject=f"u{i}", tool_calls=1, tokens=300, top_up=True)
        except aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return False
        return True

    granted = await asyncio.gather(*(top_up(i) for i in range(50)))
    assert sum(granted) == 3  # 3 * 300 <= 1000 < 4 * 300
    assert (await _state(server)).reserved.tokens == 900
