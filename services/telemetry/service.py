"""The Telemetry servicer and the OTLP TraceService on the same port, plus background tasks.

Ledger, budget, audit and cost calls come from the gateway (only it may call under mTLS) with
the authenticated caller; every read and write is scoped by caller.tenant, so another
tenant's budget, event or usage simply does not exist for the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc import aio
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from services.kit.buildinfo import service_info
from services.kit.errors import abort, abort_invalid, retry_info
from services.kit.interceptors import abort_undecodable
from services.kit.metrics import meter
from services.kit.migrations import check_schema
from services.kit.peers import ANY_PEER, AUTH, GATEWAY, ROUTER, PeerRules
from services.kit.pricing import PriceTable
from services.kit.server import Cleanup, Register, Registered
from services.kit.settings import ServiceSettings
from services.kit.startup import setting_guard
from services.telemetry import slo, spans, validation
from services.telemetry.audit import AuditLog
from services.telemetry.database import Database
from services.telemetry.forward import Forwarder
from services.telemetry.ledger import COST_KEYS, Amounts, BudgetState, Ledger, Reservation
from services.telemetry.migrations import MIGRATIONS
from services.telemetry.selfspans import LocalSpanExporter
from services.telemetry.settings import TelemetrySettings
from services.telemetry.stats import summarize
from services.telemetry.store import SpanRow, SpanStore
from toolmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc

log = logging.getLogger(__name__)

CONTRACT_VERSIONS = ["toolmesh.telemetry.v1", "opentelemetry.proto.collector.trace.v1"]

DEFAULT_WINDOW_S = 3600
MAX_WINDOW_S = 30 * 24 * 3600
# An Export naming hundreds of bad spans gets the first few, enough to find the bug.
MAX_REPORTED_VIOLATIONS = 10
TRACE_ID_PATTERN = re.compile(r"[0-9a-f]{32}")

_SPANS_STORED = meter().create_counter(
    "toolmesh.telemetry.spans_stored", unit="{span}", description="Spans accepted over OTLP"
)

_USAGE_STORED = meter().create_counter(
    "toolmesh.telemetry.usage_records_stored", unit="{record}", description="Usage records stored"
)
_USAGE_DUPLICATES = meter().create_counter(
    "toolmesh.telemetry.usage_records_duplicate",
    unit="{record}",
    description="Usage records received again and ignored",
)
_AUDIT_STORED = meter().create_counter(
    "toolmesh.telemetry.audit_events_stored", unit="{event}", description="Audit events chained"
)
_AUDIT_DUPLICATES = meter().create_counter(
    "toolmesh.telemetry.audit_events_duplicate",
    unit="{event}",
    description="Audit events received again and ignored",
)
_RESERVATIONS = meter().create_counter(
    "toolmesh.telemetry.budget_reservations",
    unit="{reservation}",
    description="ReserveBudget answers by result: granted, refused, unlimited",
)

DEFAULT_COST_DAYS = 30
MAX_COST_DAYS = 366
DEFAULT_TTL_S = 60
MAX_TTL_S = 3600
DEFAULT_AUDIT_PAGE = 100
MAX_AUDIT_PAGE = 1000
NS_PER_S = 1_000_000_000

_COST_KEYS = {
    telemetry_pb2.COST_GROUP_BY_TENANT: "tenant",
    telemetry_pb2.COST_GROUP_BY_PRINCIPAL: "principal",
    telemetry_pb2.COST_GROUP_BY_TOOL: "tool_name",
    telemetry_pb2.COST_GROUP_BY_DAY: "day",
}
_PERIODS = {telemetry_pb2.BUDGET_PERIOD_DAY: "day", telemetry_pb2.BUDGET_PERIOD_MONTH: "month"}
_PERIOD_ENUMS = {name: value for value, name in _PERIODS.items()}
_PROBLEM_KINDS = {
    "edited": telemetry_pb2.AUDIT_PROBLEM_KIND_EDITED,
    "deleted": telemetry_pb2.AUDIT_PROBLEM_KIND_DELETED,
    "inserted": telemetry_pb2.AUDIT_PROBLEM_KIND_INSERTED,
    "reordered": telemetry_pb2.AUDIT_PROBLEM_KIND_REORDERED,
}
_SEVERITIES = {
    "page": telemetry_pb2.BURN_ALERT_SEVERITY_PAGE,
    "ticket": telemetry_pb2.BURN_ALERT_SEVERITY_TICKET,
}

_GROUPINGS = {
    telemetry_pb2.STATS_GROUP_BY_SERVICE: "service",
    telemetry_pb2.STATS_GROUP_BY_ROUTE: "route",
    telemetry_pb2.STATS_GROUP_BY_TOOL: "tool",
}


def _timestamp(nanos: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(nanos)
    return stamp


def _row_keys(grouping: str, key: tuple[str, ...], service: str) -> dict[str, str]:
    if grouping == "service":
        return {"service": key[0]}
    if grouping == "route":
        return {"service": key[0], "route": key[1]}
    return {"service": service, "tool_name": key[0], "tool_version": key[1]}


def _trace_span(row: SpanRow) -> Any:
    span = telemetry_pb2.TraceSpan(
        span_id=row.span_id,
        parent_span_id=row.parent_span_id,
        service=row.service,
        name=row.name,
        kind=telemetry_pb2.SpanKind.Name(row.kind),
        start_time=_timestamp(row.start_ns),
        duration_ms=row.duration_ms,
        error=row.error,
        attributes_json=row.attributes_json,
        route=row.route,
        tool_name=row.tool_name,
        tool_version=row.tool_version,
        tenant=row.tenant,
    )
    if row.grpc_status_code is not None:
        span.grpc_status_code = row.grpc_status_code
    return span


def _amounts(amounts: Amounts) -> Any:
    return telemetry_pb2.BudgetAmounts(
        tool_calls=amounts.tool_calls, tokens=amounts.tokens, cost_micros=amounts.cost_micros
    )


def _budget_status(state: BudgetState) -> Any:
    budget = state.budget
    period_start, resets_at = Timestamp(), Timestamp()
    period_start.FromDatetime(state.period_start)
    resets_at.FromDatetime(state.resets_at)
    return telemetry_pb2.BudgetStatus(
        tenant=budget.tenant,
        principal=budget.principal,
        period=_PERIOD_ENUMS[budget.period],
        limits=_amounts(state.limits),
        used=_amounts(state.used),
        reserved=_amounts(state.reserved),
        remaining=_amounts(state.remaining),
        period_start=period_start,
        resets_at=resets_at,
    )


def _stored_event(row: Any) -> Any:
    return telemetry_pb2.StoredAuditEvent(
        event=telemetry_pb2.AuditEvent(
            event_id=row.event_id,
            occurred_at=_timestamp(row.occurred_at_ns),
            tenant=row.tenant,
            actor=row.actor,
            action=row.action,
            target=row.target,
            outcome=row.outcome,
            request_id=row.request_id,
            trace_id=row.trace_id,
            policy_version=row.policy_version,
            contract_versions=json.loads(row.contract_versions),
            details_json=row.details_json,
        ),
        seq=row.seq,
        prev_hash=row.prev_hash,
        hash=row.hash,
    )


def _sli_status(
    kind: Any,
    target: Fraction,
    counts: dict[int, slo.WindowCounts],
    period_s: int,
    threshold_ms: float = 0.0,
) -> Any:
    period = counts[period_s]
    burns = slo.burn_rates(counts, target)
    return telemetry_pb2.SliStatus(
        kind=kind,
        target=float(target),
        latency_threshold_ms=threshold_ms,
        total=period.total,
        good=period.total - period.bad,
        sli=float(slo.sli(period.total - period.bad, period.total)),
        error_budget_remaining=float(slo.budget_remaining(period.bad, period.total, target)),
        burn_rates=[
            telemetry_pb2.BurnRate(
                window_seconds=window,
                burn_rate=float(burns[window]),
                total=counts[window].total,
                bad=counts[window].bad,
            )
            for window in slo.BURN_WINDOWS_S
        ],
        alerts=[
            telemetry_pb2.BurnAlert(
                severity=_SEVERITIES[state.rule.severity],
                long_window_seconds=state.rule.long_window_s,
                short_window_seconds=state.rule.short_window_s,
                threshold=float(state.rule.threshold),
                firing=state.firing,
            )
            for state in slo.alerts(burns)
        ],
    )


class TraceService:
    """Standard OTLP/gRPC span ingest: decode, insert in one transaction, answer.

    Registered with a pass-through deserializer (not through the generated TraceServiceServicer
    registration) so that bytes that are no ExportTraceServiceRequest get INVALID_ARGUMENT
    rather than grpc's UNKNOWN, and so forwarding sends the received bytes unchanged.
    """

    SERVICE = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name

    def __init__(self, store: SpanStore, forwarder: Forwarder | None) -> None:
        self._store = store
        self._forwarder = forwarder

    def add_to_server(self, server: aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            self.Export,
            response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(self.SERVICE, {"Export": handler}),)
        )

    async def Export(self, raw: bytes, context: aio.ServicerContext) -> Any:
        try:
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(raw)
        except DecodeError as error:
            method = f"/{self.SERVICE}/Export"
            await abort_undecodable(context, method, len(raw), type(error).__name__)
        records, violations = spans.decode(request)
        if violations:
            await abort_invalid(context, violations[:MAX_REPORTED_VIOLATIONS])
        if records:
            await self._store.insert(records)
            _SPANS_STORED.add(len(records))
            if self._forwarder is not None:
                self._forwarder.offer(raw)
        return trace_service_pb2.ExportTraceServiceResponse()


class TelemetryServicer(telemetry_pb2_grpc.TelemetryServicer):
    def __init__(
        self,
        settings: TelemetrySettings,
        store: SpanStore,
        ledger: Ledger,
        audit: AuditLog,
        slos: slo.SloConfig,
    ) -> None:
        self._settings = settings
        self._store = store
        self._ledger = ledger
        self._audit = audit
        self._slos = slos

    async def GetStats(self, request: Any, context: aio.ServicerContext) -> Any:
        violations = []
        grouping = _GROUPINGS.get(request.group_by)
        if grouping is None:
            violations.append(("group_by", "choose SERVICE, ROUTE or TOOL"))
        if not 0 <= request.window_seconds <= MAX_WINDOW_S:
            violations.append(("window_seconds", f"between 0 and {MAX_WINDOW_S} (30 days)"))
        if violations or grouping is None:
            await abort_invalid(context, violations)
        window_s = request.window_seconds or DEFAULT_WINDOW_S
        end_ns = time.time_ns()
        start_ns = end_ns - window_s * 1_000_000_000
        samples = await self._store.samples(grouping, start_ns, end_ns, request.service)
        rows = [
            telemetry_pb2.StatsRow(
                **_row_keys(grouping, group.key, request.service),
                count=group.count,
                errors=group.errors,
                error_rate=group.error_rate,
                mean_ms=group.mean_ms,
                p50_ms=group.p50_ms,
                p95_ms=group.p95_ms,
                p99_ms=group.p99_ms,
            )
            for group in summarize(samples)
        ]
        return telemetry_pb2.GetStatsResponse(
            rows=rows, window_start=_timestamp(start_ns), window_end=_timestamp(end_ns)
        )

    async def GetTrace(self, request: Any, context: aio.ServicerContext) -> Any:
        trace_id = request.trace_id.lower()
        if not TRACE_ID_PATTERN.fullmatch(trace_id) or trace_id == "0" * 32:
            await abort_invalid(context, [("trace_id", "32 hexadecimal characters, not all 0")])
        rows = await self._store.trace(trace_id)
        if not rows:
            await abort(context, grpc.StatusCode.NOT_FOUND, "no span of this trace is stored")
        return telemetry_pb2.GetTraceResponse(
            trace_id=trace_id, spans=[_trace_span(row) for row in rows]
        )

    async def RecordUsage(self, request: Any, context: aio.ServicerContext) -> Any:
        violations = validation.batch("records", request.records)
        for i, record in enumerate(request.records):
            violations += validation.usage_record(i, record)
        if violations:
            await abort_invalid(context, violations[:MAX_REPORTED_VIOLATIONS])
        records = [
            {
                "request_id": r.request_id,
                "tenant": r.tenant,
                "principal": r.principal,
                "route": r.route,
                "tool_name": r.tool_name,
                "tool_version": r.tool_version,
                "tokens_in": r.tokens_in,
                "tokens_out": r.tokens_out,
                "tool_calls": r.tool_calls,
                "cost_units": r.cost_units,
                "occurred_at_ns": r.occurred_at.ToNanoseconds(),
                "outcome": r.outcome,
                "reservation_id": r.reservation_id,
            }
            for r in request.records
        ]
        stored, duplicates = await self._ledger.record(records)
        _USAGE_STORED.add(stored)
        _USAGE_DUPLICATES.add(duplicates)
        return telemetry_pb2.RecordUsageResponse(
            stored=stored, duplicates=duplicates, price_version=self._ledger.prices.version
        )

    async def GetPrices(self, request: Any, context: aio.ServicerContext) -> Any:
        table = self._ledger.prices
        return telemetry_pb2.GetPricesResponse(
            version=table.version,
            currency=table.currency,
            input_per_1k_tokens_micros=table.input_per_1k_tokens_micros,
            output_per_1k_tokens_micros=table.output_per_1k_tokens_micros,
            per_tool_call_micros=table.per_tool_call_micros,
            per_cost_unit_micros=table.per_cost_unit_micros,
        )

    async def GetCost(self, request: Any, context: aio.ServicerContext) -> Any:
        violations = validation.caller(request)
        keys = [_COST_KEYS.get(g) for g in request.group_by]
        if None in keys or len(set(keys)) != len(keys):
            violations.append(("group_by", "distinct values of TENANT, PRINCIPAL, TOOL, DAY"))
        has_start, has_end = request.HasField("start"), request.HasField("end")
        start_ns = request.start.ToNanoseconds() if has_start else 0
        end_ns = request.end.ToNanoseconds() if has_end else 0
        if not 0 <= request.days <= MAX_COST_DAYS:
            violations.append(("days", f"between 0 and {MAX_COST_DAYS}"))
        if has_start != has_end or (has_start and request.days):
            violations.append(("start", "give start and end together, or days"))
        elif has_start and not 0 < end_ns - start_ns <= MAX_COST_DAYS * 86400 * NS_PER_S:
            violations.append(("end", f"after start, at most {MAX_COST_DAYS} days later"))
        if violations:
            await abort_invalid(context, violations)
        if not has_start:
            end_ns = time.time_ns()
            start_ns = end_ns - (request.days or DEFAULT_COST_DAYS) * 86400 * NS_PER_S
        ordered = [key for key in COST_KEYS if key in keys]
        rows = await self._ledger.cost(request.caller.tenant, ordered, start_ns, end_ns)
        return telemetry_pb2.GetCostResponse(
            rows=[telemetry_pb2.CostRow(**row) for row in rows],
            window_start=_timestamp(start_ns),
            window_end=_timestamp(end_ns),
        )

    async def SetBudget(self, request: Any, context: aio.ServicerContext) -> Any:
        violations = validation.caller(request)
        if request.tenant not in ("", request.caller.tenant):
            violations.append(("tenant", "empty or the caller's tenant"))
        violations += validation.texts("", request, (), ("principal",))
        if request.period not in _PERIODS:
            violations.append(("period", "DAY or MONTH"))
        violations += validation.amounts(
            "limits.", request.limits, ("tool_calls", "tokens", "cost_micros")
        )
        if violations:
            await abort_invalid(context, violations)
        limits = Amounts(
            request.limits.tool_calls, request.limits.tokens, request.limits.cost_micros
        )
        state = await self._ledger.set_budget(
            request.caller.tenant,
            request.principal,
            _PERIODS[request.period],
            limits,
            datetime.now(UTC),
        )
        if state is None:
            return telemetry_pb2.SetBudgetResponse(removed=True)
        return telemetry_pb2.SetBudgetResponse(budget=_budget_status(state))

    async def ListBudgets(self, request: Any, context: aio.ServicerContext) -> Any:
        if violations := validation.caller(request):
            await abort_invalid(context, violations)
        states = await self._ledger.budgets(request.caller.tenant, datetime.now(UTC))
        return telemetry_pb2.ListBudgetsResponse(budgets=[_budget_status(s) for s in states])

    async def GetBudgetState(self, request: Any, context: aio.ServicerContext) -> Any:
        if violations := validation.caller(request):
            await abort_invalid(context, violations)
        budgeted = await self._ledger.budgeted(request.caller.tenant, request.caller.subject)
        return telemetry_pb2.GetBudgetStateResponse(budgeted=budgeted)

    async def ReserveBudget(self, request: Any, context: aio.ServicerContext) -> Any:
        violations = validation.caller(request)
        violations += validation.texts("", request, ("request_id",), ())
        violations += validation.texts("caller.", request.caller, ("subject",), ())
        violations += validation.amounts("", request, ("tool_calls", "tokens", "cost_micros"))
        if not 0 <= request.ttl_seconds <= MAX_TTL_S:
            violations.append(("ttl_seconds", f"between 0 and {MAX_TTL_S}"))
        if violations:
            await abort_invalid(context, violations)
        now = datetime.now(UTC)
        outcome = await self._ledger.reserve(
            request.caller.tenant,
            request.caller.subject,
            request.request_id,
            asked=Amounts(request.tool_calls, request.tokens, request.cost_micros),
            ttl_s=request.ttl_seconds or DEFAULT_TTL_S,
            now=now,
        )
        if outcome is None:
            _RESERVATIONS.add(1, {"result": "unlimited"})
            return telemetry_pb2.ReserveBudgetResponse(unlimited=True)
        if isinstance(outcome, Reservation):
            _RESERVATIONS.add(1, {"result": "granted"})
            return telemetry_pb2.ReserveBudgetResponse(
                reserved=True,
                reservation_id=outcome.id,
                expires_at=_timestamp(outcome.expires_at_ns),
            )
        _RESERVATIONS.add(1, {"result": "refused"})
        first = outcome[0]
        more = f" (and {len(outcome) - 1} more)" if len(outcome) > 1 else ""
        # Every violated budget must reset before the same request can pass.
        resets_at = max(v.state.resets_at for v in outcome)
        await abort(
            context,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"over budget: {first.description}{more}",
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject=v.subject, description=v.description
                    )
                    for v in outcome
                ]
            ),
            retry_info((resets_at - now).total_seconds()),
        )

    async def AppendAudit(self, request: Any, context: aio.ServicerContext) -> Any:
        violations = validation.batch("events", request.events)
        for i, event in enumerate(request.events):
            violations += validation.audit_event(i, event)
        if violations:
            await abort_invalid(context, violations[:MAX_REPORTED_VIOLATIONS])
        events = [
            {
                "event_id": e.event_id,
                "occurred_at_ns": e.occurred_at.ToNanoseconds(),
                "tenant": e.tenant,
                "actor": e.actor,
                "action": e.action,
                "target": e.target,
                "outcome": e.outcome,
                "request_id": e.request_id,
                "trace_id": e.trace_id,
                "policy_version": e.policy_version,
                "contract_versions": list(e.contract_versions),
                "details_json": e.details_json,
            }
            for e in request.events
        ]
        stored, duplicates = await self._audit.append(events)
        _AUDIT_STORED.add(stored)
        _AUDIT_DUPLICATES.add(duplicates)
        return telemetry_pb2.AppendAuditResponse(stored=stored, duplicates=duplicates)

    async def ListAudit(self, request: Any, context: aio.ServicerContext) -> Any:
        violations = validation.caller(request)
        violations += validation.texts("", request, (), ("action",))
        if not 0 <= request.limit <= MAX_AUDIT_PAGE:
            violations.append(("limit", f"between 0 and {MAX_AUDIT_PAGE}"))
        token = request.page_token
        if token and not (token.isdigit() and len(token) <= 18):
            violations.append(("page_token", "a next_page_token from ListAudit"))
        if violations:
            await abort_invalid(context, violations)
        limit = request.limit or DEFAULT_AUDIT_PAGE
        since_ns = request.since.ToNanoseconds() if request.HasField("since") else 0
        rows = await self._audit.list(
            request.caller.tenant, request.action, since_ns, int(token or 0), limit + 1
        )
        page = rows[:limit]
        return telemetry_pb2.ListAuditResponse(
            events=[_stored_event(row) for row in page],
            next_page_token=str(page[-1].seq) if len(rows) > limit else "",
        )

    async def VerifyAudit(self, request: Any, context: aio.ServicerContext) -> Any:
        if violations := validation.caller(request):
            await abort_invalid(context, violations)
        verdict = await self._audit.verify(request.caller.tenant)
        response = telemetry_pb2.VerifyAuditResponse(
            ok=verdict.problem is None,
            events_checked=verdict.checked,
            head_seq=verdict.head_seq,
            head_hash=verdict.head_hash,
        )
        if verdict.problem is not None:
            problem = verdict.problem
            response.problem.CopyFrom(
                telemetry_pb2.AuditProblem(
                    kind=_PROBLEM_KINDS[problem.kind],
                    seq=problem.seq,
                    event_id=problem.event_id,
                    message=problem.message,
                )
            )
        return response

    async def GetSlo(self, request: Any, context: aio.ServicerContext) -> Any:
        violations = validation.texts("", request, (), ("name",))
        if violations:
            await abort_invalid(context, violations)
        objectives = [o for o in self._slos.objectives if request.name in ("", o.name)]
        if not objectives:
            await abort(context, grpc.StatusCode.NOT_FOUND, "no such objective")
        now_ns = time.time_ns()
        return telemetry_pb2.GetSloResponse(
            version=self._slos.version,
            objectives=[await self._objective(o, now_ns) for o in objectives],
            evaluated_at=_timestamp(now_ns),
        )

    async def _objective(self, objective: slo.Objective, now_ns: int) -> Any:
        period_s = objective.period_days * 86400
        windows = (period_s, *slo.BURN_WINDOWS_S)
        counts = await self._store.window_counts(
            objective.service,
            objective.route,
            objective.tool,
            slow_ms=objective.latency_threshold_ms,
            windows_s=windows,
            now_ns=now_ns,
        )
        errors = {w: slo.WindowCounts(total, bad) for w, (total, bad, _) in counts.items()}
        slow = {w: slo.WindowCounts(total, bad) for w, (total, _, bad) in counts.items()}
        return telemetry_pb2.SloObjective(
            name=objective.name,
            service=objective.service,
            route=objective.route,
            tool=objective.tool,
            period_days=objective.period_days,
            slis=[
                _sli_status(
                    telemetry_pb2.SLI_KIND_AVAILABILITY, objective.availability, errors, period_s
                ),
                _sli_status(
                    telemetry_pb2.SLI_KIND_LATENCY,
                    objective.latency_target,
                    slow,
                    period_s,
                    objective.latency_threshold_ms,
                ),
            ],
        )

    async def GetServiceInfo(self, request: Any, context: aio.ServicerContext) -> Any:
        return telemetry_pb2.GetServiceInfoResponse(
            info=service_info(self._settings.service_name, CONTRACT_VERSIONS)
        )


async def _prune_forever(store: SpanStore, settings: TelemetrySettings) -> None:
    """Delete spans past retention now and then every prune_interval_s; errors only log."""
    retention_ns = int(settings.retention_hours * 3600 * 1e9)
    while True:
        try:
            deleted = await store.prune(time.time_ns() - retention_ns)
            if deleted:
                log.info("pruned spans", extra={"deleted": deleted})
        except Exception:
            log.exception("pruning spans failed")
        await asyncio.sleep(settings.prune_interval_s)


async def _sweep_reservations_forever(ledger: Ledger, settings: TelemetrySettings) -> None:
    """Delete expired reservations now and then; they already stopped counting when they expired."""
    while True:
        try:
            deleted = await ledger.delete_expired(time.time_ns())
            if deleted:
                log.info("deleted expired reservations", extra={"deleted": deleted})
        except Exception:
            log.exception("deleting expired reservations failed")
        await asyncio.sleep(settings.reservation_sweep_interval_s)


def _background(coroutine: Awaitable[None]) -> Cleanup:
    task = asyncio.ensure_future(coroutine)

    async def cancel() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return cancel


def _record_own_spans(store: SpanStore, cleanups: list[Cleanup]) -> None:
    """Telemetry's spans go to its own store (see selfspans) when the SDK is installed."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        exporter = LocalSpanExporter(store, asyncio.get_running_loop())
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
        cleanups.append(exporter.close)


SERVICE_NAME = telemetry_pb2.DESCRIPTOR.services_by_name["Telemetry"].full_name
# Every RPC that carries a tenant, or reads one, is the gateway's alone (it authenticated the
# caller); auth also appends its own audit events. Spans come from every process of the mesh
# and the collector, which is why they never write tenant data (docs/security.md).
PEER_RULES = PeerRules.for_service(
    SERVICE_NAME,
    {
        "GetStats": [GATEWAY, ROUTER],
        "GetServiceInfo": [ANY_PEER],
        "GetTrace": [GATEWAY],
        "RecordUsage": [GATEWAY],
        "GetPrices": [GATEWAY],
        "GetCost": [GATEWAY],
        "SetBudget": [GATEWAY],
        "ListBudgets": [GATEWAY],
        "GetBudgetState": [GATEWAY],
        "ReserveBudget": [GATEWAY],
        "AppendAudit": [GATEWAY, AUTH],
        "ListAudit": [GATEWAY],
        "VerifyAudit": [GATEWAY],
        "GetSlo": [GATEWAY],
    },
).merged(PeerRules.for_service(TraceService.SERVICE, {"Export": [ANY_PEER]}))


def build(settings: ServiceSettings, cleanups: list[Cleanup]) -> Register:
    """Open the store and start the background tasks inside the server's event loop."""
    if not isinstance(settings, TelemetrySettings):
        raise TypeError("telemetry needs TelemetrySettings")

    # Bad configuration fails start-up, before anything is served.
    with setting_guard(settings, "prices_file", "point {setting} at a valid price table"):
        prices = PriceTable.load(settings.prices_file)
    with setting_guard(settings, "slo_file", "point {setting} at a valid SLO file"):
        slos = slo.SloConfig.load(settings.slo_file)

    async def register(server: aio.Server) -> Registered:
        url = settings.resolved_database_url()
        # At head, or migrated to it under the schema lock, or refused with what to run.
        await check_schema(url, MIGRATIONS, migrate_on_start=settings.migrate_on_start)
        database = Database(url)
        cleanups.append(database.close)
        store = SpanStore(database)
        _record_own_spans(store, cleanups)
        ledger = Ledger(database, prices)
        forwarder = None
        if settings.forward_otlp_endpoint:
            forwarder = Forwarder(settings.forward_otlp_endpoint, settings.forward_queue_batches)
            cleanups.append(_background(forwarder.run()))
        cleanups.append(_background(_prune_forever(store, settings)))
        cleanups.append(_background(_sweep_reservations_forever(ledger, settings)))
        telemetry_pb2_grpc.add_TelemetryServicer_to_server(
            TelemetryServicer(settings, store, ledger, AuditLog(database), slos), server
        )
        TraceService(store, forwarder).add_to_server(server)
        return Registered([SERVICE_NAME, TraceService.SERVICE], peers=PEER_RULES)

    return register
