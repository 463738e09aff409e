"""Usage ledger, cost and budgets over gRPC against the real server and database."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from alembic import command
from alembic.config import Config
from google.rpc import error_details_pb2
from grpc import aio
from sqlalchemy import text

import services.telemetry.migrations as migrations
from services.kit.db import create_engine
from services.kit.pricing import PriceTable, cost_micros
from services.telemetry.ledger import period_bounds
from services.telemetry.settings import TelemetrySettings
from toolmesh.telemetry.v1 import telemetry_pb2

from .conftest import TelemetryServer
from .helpers import OPERATOR, bad_fields, caller, details, sql, stamp

DAY1 = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)
DAY2 = datetime(2026, 11, 21, 23, 59, 59, tzinfo=UTC)
G = telemetry_pb2


def usage(request_id: str, tenant: str = "acme", principal: str = "alice", **kw) -> G.UsageRecord:
    kw.setdefault("occurred_at", stamp(DAY1))
    kw.setdefault("tool_name", "calc")
    return G.UsageRecord(
        request_id=request_id,
        tenant=tenant,
        principal=principal,
        route="/toolmesh.gateway.v1.Gateway/Run",
        tool_version="1.0.0",
        outcome="ok",
        **kw,
    )


# Shipped prices: 3000 micros per 1k in, 15000 per 1k out, 200 per call, 100 per cost unit.
WORKLOAD = [
    # 3,000,000 + 7,500,000 + 1000 * (200 + 200) thousandths = 10,900 micros
    usage("r1", tokens_in=1000, tokens_out=500, tool_calls=1, cost_units=2),
    # 30,000 + 45,000 + 200,000 = 275,000 thousandths = 275 micros
    usage("r2", principal="bob", tool_name="search", tokens_in=10, tokens_out=3, tool_calls=1),
    # 3000 + 15000 = 18 micros, on the second day
    usage("r3", tool_name="search", tokens_in=1, tokens_out=1, occurred_at=stamp(DAY2)),
    # Another tenant's spending never shows in acme's figures.
    usage("r1", tenant="globex", tokens_in=10**6, tool_calls=9),
]


async def cost(server: TelemetryServer, *group_by: int, tenant: str = "acme") -> list[tuple]:
    response = await server.stub.GetCost(
        G.GetCostRequest(
            caller=caller(tenant),
            start=stamp(DAY1 - timedelta(days=1)),
            end=stamp(DAY2 + timedelta(days=1)),
            group_by=group_by,
        )
    )
    assert {row.currency for row in response.rows} <= {"USD"}
    return [
        (row.tenant, row.principal, row.tool_name, row.day, row.requests, row.cost_micros)
        for row in response.rows
    ]


async def test_prices_are_served_and_match_the_kit(server: TelemetryServer) -> None:
    prices = await server.stub.GetPrices(G.GetPricesRequest())
    table = PriceTable.load(server.settings.prices_file)
    assert (prices.version, prices.currency) == (table.version, "USD")
    assert (
        prices.input_per_1k_tokens_micros,
        prices.output_per_1k_tokens_micros,
        prices.per_tool_call_micros,
        prices.per_cost_unit_micros,
    ) == (3000, 15000, 200, 100)


async def test_usage_is_priced_stored_once_and_grouped(server: TelemetryServer) -> None:
    first = await server.stub.RecordUsage(G.RecordUsageRequest(records=WORKLOAD))
    assert (first.stored, first.duplicates, first.price_version) == (4, 0, "2026-12-01")
    replay = await server.stub.RecordUsage(G.RecordUsageRequest(records=WORKLOAD))
    assert (replay.stored, replay.duplicates) == (0, 4)

    assert await cost(server) == [("", "", "", "", 3, 11193)]
    assert await cost(server, G.COST_GROUP_BY_TENANT) == [("acme", "", "", "", 3, 11193)]
    assert await cost(server, G.COST_GROUP_BY_PRINCIPAL) == [
        ("", "alice", "", "", 2, 10918),
        ("", "bob", "", "", 1, 275),
    ]
    assert await cost(server, G.COST_GROUP_BY_TOOL) == [
        ("", "", "calc", "", 1, 10900),
        ("", "", "search", "", 2, 293),
    ]
    assert await cost(server, G.COST_GROUP_BY_DAY) == [
        ("", "", "", "2026-11-20", 2, 11175),
        ("", "", "", "2026-11-21", 1, 18),
    ]
    assert await cost(server, G.COST_GROUP_BY_DAY, G.COST_GROUP_BY_PRINCIPAL) == [
        ("", "alice", "", "2026-11-20", 1, 10900),
        ("", "alice", "", "2026-11-21", 1, 18),
        ("", "bob", "", "2026-11-20", 1, 275),
    ]
    (row,) = (
        await server.stub.GetCost(
            G.GetCostRequest(
                caller=caller(),
                start=stamp(DAY1 - timedelta(days=1)),
                end=stamp(DAY2 + timedelta(days=1)),
            )
        )
    ).rows
    assert (row.tokens_in, row.tokens_out, row.tool_calls, row.cost_units) == (1011, 504, 2, 2)
    assert await cost(server, tenant="globex") == [("", "", "", "", 1, 3_001_800)]
    assert await cost(server, tenant="nobody") == []
    # The window is [start, end): DAY2's record is outside a window ending at that instant.
    rows = await server.stub.GetCost(
        G.GetCostRequest(caller=caller(), start=stamp(DAY1), end=stamp(DAY2))
    )
    assert [r.requests for r in rows.rows] == [2]


async def test_cost_over_the_last_days(server: TelemetryServer) -> None:
    await server.stub.RecordUsage(
        G.RecordUsageRequest(records=[usage("now", tool_calls=5, occurred_at=stamp())])
    )
    response = await server.stub.GetCost(G.GetCostRequest(caller=caller(), days=1))
    assert [(r.requests, r.cost_micros) for r in response.rows] == [(1, 1000)]
    end = response.window_end.ToDatetime(UTC)
    assert end - response.window_start.ToDatetime(UTC) == timedelta(days=1)


async def set_budget(server, principal="", period=G.BUDGET_PERIOD_DAY, tenant="acme", **limits):
    return await server.stub.SetBudget(
        G.SetBudgetRequest(
            caller=caller(tenant, "admin"),
            principal=principal,
            period=period,
            limits=G.BudgetAmounts(**limits),
        )
    )


async def reserve(server, request_id, subject="alice", tenant="acme", ttl=0, **amounts):
    return await server.stub.ReserveBudget(
        G.ReserveBudgetRequest(
            caller=caller(tenant, subject), request_id=request_id, ttl_seconds=ttl, **amounts
        )
    )


async def race(stubs: list, calls: int) -> tuple[dict, list[aio.AioRpcError]]:
    """``calls`` concurrent reservations of one tool call; (granted by request id, refusals)."""

    async def one(i: int):
        try:
            return await reserve(
                stubs[i % len(stubs)], f"req-{i}", subject=f"user-{i}", tool_calls=1
            )
        except aio.AioRpcError as error:
            return error

    results = await asyncio.gather(*(one(i) for i in range(calls)))
    granted = {f"req-{i}": r for i, r in enumerate(results) if not isinstance(r, aio.AioRpcError)}
    refused = [r for r in results if isinstance(r, aio.AioRpcError)]
    return granted, refused


def assert_tenant_day_refusal(error: aio.AioRpcError) -> None:
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _, reset = period_bounds("day", datetime.now(UTC))
    message = error.details()
    assert "tenant acme: day tool_calls limit 10" in message
    assert f"resets at {reset:%Y-%m-%dT%H:%M:%S}Z" in message
    (quota,) = details(error, error_details_pb2.QuotaFailure)
    assert [v.subject for v in quota.violations] == ["tenant:acme"]
    (retry,) = details(error, error_details_pb2.RetryInfo)
    expected = (reset - datetime.now(UTC)).total_seconds()
    assert abs(retry.retry_delay.ToTimedelta().total_seconds() - expected) < 30


async def test_fifty_concurrent_reservations_against_ten(server: TelemetryServer) -> None:
    await set_budget(server, tool_calls=10)
    granted, refused = await race([server], 50)
    assert (len(granted), len(refused)) == (10, 40)
    assert all(g.reserved and not g.unlimited for g in granted.values())
    for error in refused:
        assert_tenant_day_refusal(error)
    (state,) = (await server.stub.ListBudgets(G.ListBudgetsRequest(caller=caller()))).budgets
    assert (state.reserved.tool_calls, state.used.tool_calls, state.remaining.tool_calls) == (
        10,
        0,
        0,
    )
    # Commit three: each reservation is replaced by its request's actual usage.
    committed = sorted(granted)[:3]
    commits = [
        usage(rid, occurred_at=stamp(), tool_calls=1, reservation_id=granted[rid].reservation_id)
        for rid in committed
    ]
    await server.stub.RecordUsage(G.RecordUsageRequest(records=commits))
    (state,) = (await server.stub.ListBudgets(G.ListBudgetsRequest(caller=caller()))).budgets
    assert (state.reserved.tool_calls, state.used.tool_calls, state.remaining.tool_calls) == (
        7,
        3,
        0,
    )
    assert (state.remaining.tokens, state.remaining.cost_micros) == (-1, -1)
    # A late retry of a committed request gets its reservation back and holds nothing more.
    rid = committed[0]
    retried = await reserve(server, rid, subject="user-" + rid.removeprefix("req-"), tool_calls=1)
    assert retried.reservation_id == granted[rid].reservation_id
    (state,) = (await server.stub.ListBudgets(G.ListBudgetsRequest(caller=caller()))).budgets
    assert state.reserved.tool_calls == 7


async def test_fifty_against_ten_across_two_replicas(
    server: TelemetryServer, replica: TelemetryServer
) -> None:
    await set_budget(server, tool_calls=10)
    granted, refused = await race([server, replica], 50)
    assert (len(granted), len(refused)) == (10, 40)
    assert_tenant_day_refusal(refused[0])


async def test_reservation_is_idempotent_and_expires(tmp_path) -> None:
    settings = TelemetrySettings(port=0, data_dir=tmp_path, reservation_sweep_interval_s=0.05)
    server = await TelemetryServer(settings).start()
    try:
        await set_budget(server, tool_calls=1)
        reserved_at = time.time()
        first = await reserve(server, "a", tool_calls=1, ttl=2)
        again = await reserve(server, "a", tool_calls=1, ttl=2)
        assert first.reserved and again.reservation_id == first.reservation_id
        with pytest.raises(aio.AioRpcError) as caught:
            await reserve(server, "b", tool_calls=1)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Never committed: it stops counting when it expires, and the sweeper removes it.
        deadline = time.monotonic() + 15
        while True:
            try:
                later = await reserve(server, "b", tool_calls=1)
                break
            except aio.AioRpcError as refused:
                assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline, "the reservation never expired"
                await asyncio.sleep(0.1)
        assert time.time() >= reserved_at + 2, "released before its TTL"
        assert later.reserved and later.reservation_id != first.reservation_id
        # ...and the sweeper (every 50 ms here) removes it.
        while (remaining := await sql(server, "SELECT id FROM telemetry_reservations")) != [
            (later.reservation_id,)
        ]:
            assert (later.reservation_id,) in remaining
            assert time.monotonic() < deadline, remaining
            await asyncio.sleep(0.05)
    finally:
        await server.stop()


async def test_principal_and_month_budgets(server: TelemetryServer) -> None:
    await set_budget(server, principal="alice", period=G.BUDGET_PERIOD_MONTH, tokens=100)
    assert (await reserve(server, "x", tokens=60)).reserved
    with pytest.raises(aio.AioRpcError) as caught:
        await reserve(server, "y", tokens=41)
    _, reset = period_bounds("month", datetime.now(UTC))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (
        f"principal alice of tenant acme: month tokens limit 100 (used 0, reserved 60, asked 41); "
        f"resets at {reset:%Y-%m-%dT00:00:00}Z" in caught.value.details()
    )
    assert reset.day == 1
    # Committing x replaces its 60 reserved tokens with the 50 it used: now 41 more fit.
    await server.stub.RecordUsage(
        G.RecordUsageRequest(
            records=[
                usage(
                    "x",
                    occurred_at=stamp(),
                    tokens_in=30,
                    tokens_out=20,
                    reservation_id=(await reserve(server, "x", tokens=60)).reservation_id,
                )
            ]
        )
    )
    (state,) = (await server.stub.ListBudgets(G.ListBudgetsRequest(caller=caller()))).budgets
    assert (state.used.tokens, state.reserved.tokens, state.remaining.tokens) == (50, 0, 50)
    assert state.resets_at.ToDatetime(UTC) == reset
    assert (await reserve(server, "y", tokens=41)).reserved
    # Bob has no budget of his own and the tenant none: nothing to check.
    bob = await reserve(server, "z", subject="bob", tokens=1000)
    assert (bob.reserved, bob.unlimited) == (False, True)
    state = await server.stub.GetBudgetState(G.GetBudgetStateRequest(caller=caller()))
    assert state.budgeted
    state = await server.stub.GetBudgetState(G.GetBudgetStateRequest(caller=caller(subject="bob")))
    assert not state.budgeted
    # A tenant-wide budget binds bob too.
    await set_budget(server, cost_micros=500)
    with pytest.raises(aio.AioRpcError) as caught:
        await reserve(server, "w", subject="bob", cost_micros=501)
    assert "tenant acme: day cost_micros limit 500" in caught.value.details()
    # All limits 0 removes the budget.
    removed = await set_budget(server)
    assert removed.removed
    listed = (await server.stub.ListBudgets(G.ListBudgetsRequest(caller=caller()))).budgets
    assert [(b.principal, b.period) for b in listed] == [("alice", G.BUDGET_PERIOD_MONTH)]


async def test_tenants_never_see_each_other(server: TelemetryServer) -> None:
    await set_budget(server, tool_calls=1)
    held = await reserve(server, "r", tool_calls=1)
    assert (
        await server.stub.ListBudgets(G.ListBudgetsRequest(caller=caller("globex")))
    ).budgets == []
    other = await reserve(server, "r", tenant="globex", tool_calls=5)
    assert other.unlimited
    # globex naming acme's reservation commits nothing of acme's.
    await server.stub.RecordUsage(
        G.RecordUsageRequest(
            records=[
                usage("r", tenant="globex", occurred_at=stamp(), reservation_id=held.reservation_id)
            ]
        )
    )
    (state,) = (await server.stub.ListBudgets(G.ListBudgetsRequest(caller=caller()))).budgets
    assert (state.reserved.tool_calls, state.used.tool_calls) == (1, 0)
    # A tenant's admin cannot set another tenant's budget.
    with pytest.raises(aio.AioRpcError) as caught:
        await server.stub.SetBudget(
            G.SetBudgetRequest(
                caller=caller(scopes=("admin",)),
                tenant="globex",
                period=G.BUDGET_PERIOD_DAY,
                limits=G.BudgetAmounts(tool_calls=1),
            )
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == (
        "setting the budget of another tenant needs scope platform:admin"
    )
    assert (
        await server.stub.ListBudgets(G.ListBudgetsRequest(caller=caller("globex")))
    ).budgets == []


async def test_the_platform_operator_sets_another_tenants_budget(server: TelemetryServer) -> None:
    reply = await server.stub.SetBudget(
        G.SetBudgetRequest(
            caller=OPERATOR,
            tenant="globex",
            period=G.BUDGET_PERIOD_DAY,
            limits=G.BudgetAmounts(tool_calls=1),
        )
    )
    assert (reply.budget.tenant, reply.budget.limits.tool_calls) == ("globex", 1)
    listed = await server.stub.ListBudgets(G.ListBudgetsRequest(caller=caller("globex")))
    (stored,) = listed.budgets
    assert stored.limits.tool_calls == 1
    assert (await reserve(server, "r1", tenant="globex", tool_calls=1)).reserved
    with pytest.raises(aio.AioRpcError) as caught:
        await reserve(server, "r2", tenant="globex", tool_calls=1)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Without naming a tenant the operator acts on its own.
    own = await server.stub.SetBudget(
        G.SetBudgetRequest(
            caller=OPERATOR, period=G.BUDGET_PERIOD_DAY, limits=G.BudgetAmounts(tokens=5)
        )
    )
    assert own.budget.tenant == "_platform"


# Validation happens before any query: one backend is enough.
@pytest.mark.parametrize("settings", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("call", "fields"),
    [
        ("RecordUsage", ["records"]),
        (
            "RecordUsage:bad",
            [
                "records[0].request_id",
                "records[0].tokens_in",
                "records[0].occurred_at",
                "records[0].reservation_id",
            ],
        ),
        ("GetCost", ["caller.tenant"]),
        ("GetCost:window", ["group_by", "days", "start"]),
        ("SetBudget", ["period", "limits.tokens"]),
        ("ReserveBudget", ["request_id", "caller.subject", "tool_calls", "ttl_seconds"]),
        ("ListBudgets", ["caller.tenant"]),
        ("GetBudgetState", ["caller.tenant"]),
    ],
)
async def test_validation(server: TelemetryServer, call: str, fields: list[str]) -> None:
    requests = {
        "RecordUsage": G.RecordUsageRequest(),
        "RecordUsage:bad": G.RecordUsageRequest(
            records=[G.UsageRecord(tenant="acme", tokens_in=-1, reservation_id="nope")]
        ),
        "GetCost": G.GetCostRequest(),
        "GetCost:window": G.GetCostRequest(
            caller=caller(),
            group_by=[G.COST_GROUP_BY_DAY, G.COST_GROUP_BY_DAY],
            days=400,
            start=stamp(),
        ),
        "SetBudget": G.SetBudgetRequest(caller=caller(), limits=G.BudgetAmounts(tokens=-5)),
        "ReserveBudget": G.ReserveBudgetRequest(
            caller=caller(subject=""), tool_calls=-1, ttl_seconds=3601
        ),
        "ListBudgets": G.ListBudgetsRequest(),
        "GetBudgetState": G.GetBudgetStateRequest(),
    }
    with pytest.raises(aio.AioRpcError) as caught:
        await getattr(server.stub, call.split(":", maxsplit=1)[0])(requests[call])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == fields


def test_cost_formula_rounds_half_up_once() -> None:
    table = PriceTable.from_mapping(
        {
            "version": "t",
            "currency": "USD",
            "prices": {
                "input_per_1k_tokens": "0.000001",
                "output_per_1k_tokens": 0.000003,
                "per_tool_call": "0.25",
                "per_cost_unit": "0",
            },
        }
    )
    assert (table.input_per_1k_tokens_micros, table.per_tool_call_micros) == (1, 250_000)
    assert cost_micros(table, 499, 0, 0, 0) == 0
    assert cost_micros(table, 500, 0, 0, 0) == 1
    # 250 + 250 thousandths: rounded once over the sum, not per part.
    assert cost_micros(table, 250, 0, 0, 0) + cost_micros(table, 0, 0, 0, 0) == 0
    assert cost_micros(table, 250, 84, 0, 0) == 1
    assert cost_micros(table, 0, 0, 3, 7) == 750_000
    with pytest.raises(ValueError):
        cost_micros(table, -1, 0, 0, 0)


@pytest.mark.parametrize(
    "prices",
    [
        {"input_per_1k_tokens": "0.0000001"},
        {"input_per_1k_tokens": "-1"},
        {"input_per_1k_tokens": "abc"},
        {},
    ],
)
def test_price_table_refuses_bad_prices(prices: dict) -> None:
    full = {"output_per_1k_tokens": 0, "per_tool_call": 0, "per_cost_unit": 0, **prices}
    if not prices:
        full.pop("per_cost_unit")
        full["input_per_1k_tokens"] = 0
    with pytest.raises(ValueError):
        PriceTable.from_mapping({"version": "v", "currency": "USD", "prices": full})


def test_period_bounds() -> None:
    now = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    assert period_bounds("day", now) == (
        datetime(2026, 12, 31, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert period_bounds("month", now) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert period_bounds("month", datetime(2026, 2, 10, tzinfo=UTC))[1] == datetime(
        2026, 3, 1, tzinfo=UTC
    )
    assert time.time() > 0


async def test_migration_sums_existing_usage_into_totals(tmp_path) -> None:
    """Usage stored before revision 0004 counts against budgets after it."""
    url = f"sqlite:///{tmp_path / 'telemetry.db'}"

    def upgrade(connection, revision: str) -> None:
        config = Config()
        config.set_main_option("script_location", str(Path(migrations.__file__).parent))
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(upgrade, "0003")
            for request_id, principal, day in (
                ("a", "alice", 20),
                ("b", "bob", 20),
                ("c", "bob", 1),
            ):
                await conn.execute(
                    text(
                        "INSERT INTO telemetry_usage (tenant, request_id, principal, route, "
                        "tool_name, tool_version, tokens_in, tokens_out, tool_calls, cost_units, "
                        "cost_micros, currency, price_version, occurred_at_ns, day, outcome, "
                        "reservation_id) VALUES ('acme', :rid, :principal, '', '', '', 2, 1, 1, 0, "
                        "7, 'USD', 'v', :ns, '', '', '')"
                    ),
                    {
                        "rid": request_id,
                        "principal": principal,
                        "ns": int(datetime(2026, 11, day, 12, tzinfo=UTC).timestamp()) * 10**9,
                    },
                )
            await conn.run_sync(upgrade, "head")
            rows = (
                await conn.execute(
                    text(
                        "SELECT principal, period, period_start_ns, tool_calls, tokens, "
                        "cost_micros FROM telemetry_usage_totals ORDER BY 1, 2, 3"
                    )
                )
            ).all()
    finally:
        await engine.dispose()

    def ns(day: int) -> int:
        return int(datetime(2026, 11, day, tzinfo=UTC).timestamp()) * 10**9

    assert [tuple(r) for r in rows] == [
        ("", "day", ns(1), 1, 3, 7),
        ("", "day", ns(20), 2, 6, 14),
        ("", "month", ns(1), 3, 9, 21),
        ("alice", "day", ns(20), 1, 3, 7),
        ("alice", "month", ns(1), 1, 3, 7),
        ("bob", "day", ns(1), 1, 3, 7),
        ("bob", "day", ns(20), 1, 3, 7),
        ("bob", "month", ns(1), 2, 6, 14),
    ]


async def test_usage_retention(tmp_path) -> None:
    """Records past usage_retention_days go, with the running totals of long-gone periods;
    what budgets and GetCost read this month stays."""
    settings = TelemetrySettings(
        port=0, data_dir=tmp_path, usage_retention_days=30, prune_interval_s=0.05
    )
    server = await TelemetryServer(settings).start()
    try:
        now = datetime.now(UTC)
        await server.stub.RecordUsage(
            G.RecordUsageRequest(
                records=[
                    usage("old", occurred_at=stamp(now - timedelta(days=100)), tool_calls=1),
                    usage("recent", occurred_at=stamp(now - timedelta(days=2)), tool_calls=1),
                ]
            )
        )
        deadline = time.monotonic() + 10
        while await sql(server, "SELECT request_id FROM telemetry_usage WHERE request_id = 'old'"):
            assert time.monotonic() < deadline, "old usage was not pruned"
            await asyncio.sleep(0.05)
        while await sql(
            server,
            "SELECT 1 FROM telemetry_usage_totals WHERE period_start_ns < :cut",
            cut=int((now - timedelta(days=62)).timestamp()) * 10**9,
        ):
            assert time.monotonic() < deadline, "old totals were not pruned"
            await asyncio.sleep(0.05)
        rows = await server.stub.GetCost(G.GetCostRequest(caller=caller(), days=366))
        assert [r.requests for r in rows.rows] == [1]
    finally:
        await server.stop()
