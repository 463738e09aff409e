"""A telemetry stand-in with a price table, tool-call budgets, de-duplicating usage and audit
stores and an outage switch, speaking only the published telemetry contract."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import grpc
from google.rpc import error_details_pb2
from grpc import aio

from services.kit.errors import abort, retry_info
from services.kit.pricing import PriceTable
from tests.unit.gateway.fakes import FakeTelemetry
from toolmesh.telemetry.v1 import telemetry_pb2

PRICES = PriceTable(
    version="unit-prices-7",
    currency="EUR",
    input_per_1k_tokens_micros=2500,
    output_per_1k_tokens_micros=12500,
    per_tool_call_micros=1700,
    per_cost_unit_micros=333,
)


def next_midnight() -> datetime:
    now = datetime.now(UTC)
    return datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)


class LedgerTelemetry(FakeTelemetry):
    def __init__(self) -> None:
        super().__init__()
        self.down = False
        # (tenant, principal) -> daily tool-call limit; principal "" is tenant-wide.
        self.limits: dict[tuple[str, str], int] = {}
        self.used: dict[tuple[str, str], int] = {}
        # reservation id -> (tenant, principal, request id)
        self.reservations: dict[str, tuple[str, str, str]] = {}
        self.committed: list[str] = []
        self.reserve_calls = 0
        self.state_calls = 0
        self.prices_calls = 0
        self.usage_by_id: dict[tuple[str, str], telemetry_pb2.UsageRecord] = {}
        self.audit_by_id: dict[tuple[str, str], telemetry_pb2.AuditEvent] = {}
        self.record_calls = 0
        self.audit_calls = 0

    async def _up(self, context: aio.ServicerContext) -> None:
        if self.down:
            await abort(context, grpc.StatusCode.UNAVAILABLE, "telemetry is down")

    def _applying(self, tenant: str, principal: str) -> list[tuple[str, str]]:
        return [key for key in ((tenant, ""), (tenant, principal)) if key in self.limits]

    async def GetPrices(
        self, request: telemetry_pb2.GetPricesRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.GetPricesResponse:
        await self._up(context)
        self.prices_calls += 1
        return telemetry_pb2.GetPricesResponse(
            version=PRICES.version,
            currency=PRICES.currency,
            input_per_1k_tokens_micros=PRICES.input_per_1k_tokens_micros,
            output_per_1k_tokens_micros=PRICES.output_per_1k_tokens_micros,
            per_tool_call_micros=PRICES.per_tool_call_micros,
            per_cost_unit_micros=PRICES.per_cost_unit_micros,
        )

    async def GetBudgetState(
        self, request: telemetry_pb2.GetBudgetStateRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.GetBudgetStateResponse:
        await self._up(context)
        self.state_calls += 1
        applying = self._applying(request.caller.tenant, request.caller.subject)
        return telemetry_pb2.GetBudgetStateResponse(budgeted=bool(applying))

    async def ReserveBudget(
        self, request: telemetry_pb2.ReserveBudgetRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.ReserveBudgetResponse:
        await self._up(context)
        self.reserve_calls += 1
        tenant, principal = request.caller.tenant, request.caller.subject
        applying = self._applying(tenant, principal)
        if not applying:
            return telemetry_pb2.ReserveBudgetResponse(unlimited=True)
        for key in applying:
            held = sum(
                1
                for t, p, _ in self.reservations.values()
                if t == key[0] and (not key[1] or p == key[1])
            )
            if self.used.get(key, 0) + held + request.tool_calls > self.limits[key]:
                resets = next_midnight()
                scope = f"principal {key[1]} of tenant {key[0]}" if key[1] else f"tenant {key[0]}"
                description = (
                    f"{scope}: day tool_calls limit {self.limits[key]}; "
                    f"resets at {resets.isoformat()}"
                )
                await abort(
                    context,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"over budget: {description}",
                    error_details_pb2.QuotaFailure(
                        violations=[
                            error_details_pb2.QuotaFailure.Violation(
                                subject=f"tenant:{key[0]}", description=description
                            )
                        ]
                    ),
                    retry_info((resets - datetime.now(UTC)).total_seconds()),
                )
        reservation = uuid.uuid4().hex
        self.reservations[reservation] = (tenant, principal, request.request_id)
        expires = telemetry_pb2.ReserveBudgetResponse().expires_at
        expires.FromSeconds(int(time.time()) + (request.ttl_seconds or 60))
        return telemetry_pb2.ReserveBudgetResponse(
            reserved=True, reservation_id=reservation, expires_at=expires
        )

    async def RecordUsage(
        self, request: telemetry_pb2.RecordUsageRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.RecordUsageResponse:
        await self._up(context)
        self.record_calls += 1
        stored = 0
        for record in request.records:
            key = (record.tenant, record.request_id)
            if key in self.usage_by_id:
                continue
            stored += 1
            self.usage_by_id[key] = record
            self.usage.append(record)
            for budget in ((record.tenant, ""), (record.tenant, record.principal)):
                self.used[budget] = self.used.get(budget, 0) + record.tool_calls
            if self.reservations.pop(record.reservation_id, None) is not None:
                self.committed.append(record.reservation_id)
        return telemetry_pb2.RecordUsageResponse(
            stored=stored,
            duplicates=len(request.records) - stored,
            price_version=PRICES.version,
        )

    async def AppendAudit(
        self, request: telemetry_pb2.AppendAuditRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.AppendAuditResponse:
        await self._up(context)
        self.audit_calls += 1
        stored = 0
        for event in request.events:
            key = (event.tenant, event.event_id)
            if key in self.audit_by_id:
                continue
            stored += 1
            self.audit_by_id[key] = event
            self.audit.append(event)
        return telemetry_pb2.AppendAuditResponse(
            stored=stored, duplicates=len(request.events) - stored
        )

    def actions(self) -> list[str]:
        return [event.action for event in self.audit]
