"""The Telemetry RPCs: validate, scope to the caller's tenant, ask the stores, convert.

Every RPC that takes a Caller is the gateway's alone (services.telemetry.app.PEER_RULES): the
gateway authenticated the token and checked the scope, and telemetry scopes every read and
write by ``caller.tenant`` (services.telemetry.access decides where the platform operator may
see or act beyond it). Bad input answers INVALID_ARGUMENT naming the field before anything is
converted or stored.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc import aio

from services.kit.buildinfo import service_info
from services.kit.errors import abort, abort_invalid, retry_info
from services.kit.metrics import meter
from services.kit.peers import parse_aliases, peer_common_name
from services.kit.reloadable import Reloadable
from services.telemetry import access, convert, slo, validation
from services.telemetry.audit import AuditLog
from services.telemetry.auditing import AuditCheckpoints, ChainBroken
from services.telemetry.ledger import COST_KEYS, Amounts, Ledger, Reservation
from services.telemetry.records import RequestRecords
from services.telemetry.settings import TelemetrySettings
from services.telemetry.stats import summarize
from services.telemetry.store import SpanStore
from toolmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc

CONTRACT_VERSIONS = ["toolmesh.telemetry.v1", "opentelemetry.proto.collector.trace.v1"]

NS_PER_S = 1_000_000_000
DEFAULT_WINDOW_S = 3600
MAX_WINDOW_S = 30 * 24 * 3600
DEFAULT_HEALTH_WINDOW_S = 900
MAX_HEALTH_WINDOW_S = 86400
DEFAULT_COST_DAYS = 30
MAX_COST_DAYS = 366
DEFAULT_TTL_S = 60
MAX_TTL_S = 3600
DEFAULT_AUDIT_PAGE = 100
MAX_AUDIT_PAGE = 1000
NO_SUCH_TRACE = "no span of this trace is stored"
MAX_RELEASE_VERSIONS = 8
_UNIT_KINDS = {
    telemetry_pb2.RELEASE_UNIT_KIND_TOOL: "tool",
    telemetry_pb2.RELEASE_UNIT_KIND_ROUTING: "routing",
    telemetry_pb2.RELEASE_UNIT_KIND_PROMPT: "prompt",
}

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


class TelemetryServicer(telemetry_pb2_grpc.TelemetryServicer):
    def __init__(
        self,
        *,
        settings: TelemetrySettings,
        store: SpanStore,
        ledger: Ledger,
        records: RequestRecords,
        audit: AuditLog,
        checkpoints: AuditCheckpoints,
        slos: Reloadable[slo.SloConfig],
        configs: Sequence[Reloadable[Any]] = (),
    ) -> None:
        self._settings = settings
        self._store = store
        self._ledger = ledger
        self._records = records
        self._audit = audit
        self._checkpoints = checkpoints
        self._slo_config = slos
        # Reloaded files (prices, SLOs) whose versions GetServiceInfo names.
        self._configs = configs
        self._aliases = parse_aliases(settings.peer_aliases)
        self._peers_authenticated = settings.tls_enabled and settings.tls_require_client_auth

    @property
    def _slos(self) -> slo.SloConfig:
        return self._slo_config.current

    def _peer_role(self, context: aio.ServicerContext) -> str | None:
        """The calling peer's mesh role, or None without peer authentication (development)."""
        if not self._peers_authenticated:
            return None
        name = peer_common_name(context)
        return self._aliases.get(name, name)

    # -- statistics, traces, SLOs, tool health -------------------------------------------------

    async def GetStats(
        self, request: telemetry_pb2.GetStatsRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.GetStatsResponse:
        violations = validation.caller("", request.caller)
        grouping = convert.GROUPINGS.get(request.group_by)
        if grouping is None:
            violations.append(("group_by", "choose SERVICE, ROUTE or TOOL"))
        if not 0 <= request.window_seconds <= MAX_WINDOW_S:
            violations.append(("window_seconds", f"between 0 and {MAX_WINDOW_S} (30 days)"))
        violations += validation.texts("", request, (), ("service",))
        if violations or grouping is None:
            await abort_invalid(context, violations)
        end_ns = time.time_ns()
        start_ns = end_ns - (request.window_seconds or DEFAULT_WINDOW_S) * NS_PER_S
        samples = await self._records.samples(
            grouping, access.readable_tenant(request.caller), start_ns, end_ns, request.service
        )
        return telemetry_pb2.GetStatsResponse(
            rows=[convert.stats_row(grouping, g, request.service) for g in summarize(samples)],
            window_start=convert.timestamp(start_ns),
            window_end=convert.timestamp(end_ns),
        )

    async def GetTrace(
        self, request: telemetry_pb2.GetTraceRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.GetTraceResponse:
        trace_id = request.trace_id.lower()
        violations = validation.caller("", request.caller)
        if not validation.TRACE_ID.fullmatch(trace_id) or trace_id == "0" * 32:
            violations.append(("trace_id", "32 hexadecimal characters, not all 0"))
        if violations:
            await abort_invalid(context, violations)
        rows = await self._store.trace(trace_id)
        tenant = access.readable_tenant(request.caller)
        if rows and tenant is not None:
            owners = {row.tenant for row in rows if row.tenant}
            if tenant not in owners:
                owners |= await self._records.trace_tenants(trace_id)
            # Spans another tenant's request left in the trace (a reused trace id) stay out.
            rows = [row for row in rows if row.tenant in ("", tenant)] if tenant in owners else []
        if not rows:
            # The same answer whether the trace is unknown or another tenant's.
            await abort(context, grpc.StatusCode.NOT_FOUND, NO_SUCH_TRACE)
        return telemetry_pb2.GetTraceResponse(
            trace_id=trace_id, spans=[convert.trace_span(row) for row in rows]
        )

    async def GetSlo(
        self, request: telemetry_pb2.GetSloRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.GetSloResponse:
        if violations := validation.texts("", request, (), ("name",)):
            await abort_invalid(context, violations)
        slos = self._slos  # one version for the whole answer, whatever a reload does meanwhile
        objectives = [o for o in slos.objectives if request.name in ("", o.name)]
        if not objectives:
            await abort(context, grpc.StatusCode.NOT_FOUND, "no such objective")
        now_ns = time.time_ns()
        return telemetry_pb2.GetSloResponse(
            version=slos.version,
            objectives=[await self._objective(o, now_ns) for o in objectives],
            evaluated_at=convert.timestamp(now_ns),
        )

    async def _objective(self, objective: slo.Objective, now_ns: int) -> telemetry_pb2.SloObjective:
        period_s = objective.period_days * 86400
        counts = await self._records.window_counts(
            objective.service,
            objective.route,
            objective.tool,
            slow_ms=objective.latency_threshold_ms,
            windows_s=(period_s, *slo.BURN_WINDOWS_S),
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
                convert.sli_status(
                    telemetry_pb2.SLI_KIND_AVAILABILITY, objective.availability, errors, period_s
                ),
                convert.sli_status(
                    telemetry_pb2.SLI_KIND_LATENCY,
                    objective.latency_target,
                    slow,
                    period_s,
                    objective.latency_threshold_ms,
                ),
            ],
        )

    async def GetToolHealth(
        self, request: telemetry_pb2.GetToolHealthRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.GetToolHealthResponse:
        if not 0 <= request.window_seconds <= MAX_HEALTH_WINDOW_S:
            await abort_invalid(
                context, [("window_seconds", f"between 0 and {MAX_HEALTH_WINDOW_S} (1 day)")]
            )
        end_ns = time.time_ns()
        start_ns = end_ns - (request.window_seconds or DEFAULT_HEALTH_WINDOW_S) * NS_PER_S
        tools = await self._records.tool_health(start_ns, end_ns)
        return telemetry_pb2.GetToolHealthResponse(
            tools=[
                telemetry_pb2.ToolHealth(
                    tool_name=t.tool_name,
                    tool_version=t.tool_version,
                    calls=t.calls,
                    failures=t.failures,
                    success_rate=1 - t.failures / t.calls,
                )
                for t in tools
            ],
            window_start=convert.timestamp(start_ns),
            window_end=convert.timestamp(end_ns),
        )

    async def GetReleaseFigures(
        self, request: telemetry_pb2.GetReleaseFiguresRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.GetReleaseFiguresResponse:
        """Per-version figures of a release unit, each over its own window, judged against the
        unit's SLO objective (services.telemetry.slo.unit_objective)."""
        kind = _UNIT_KINDS.get(request.kind)
        violations = validation.release_figures(request, kind, MAX_RELEASE_VERSIONS)
        slos = self._slos
        objective = slo.unit_objective(slos, kind or "", request.name)
        if request.objective:
            named = next((o for o in slos.objectives if o.name == request.objective), None)
            if named is None:
                violations.append(("objective", "no such objective"))
            else:
                objective = named
        if violations or kind is None:
            await abort_invalid(context, violations)
        figures = []
        for window in request.versions:
            start_ns, end_ns = validation.stamp_ns(window.start), validation.stamp_ns(window.end)
            samples = await self._records.version_samples(
                kind,
                request.name,
                window.version,
                tenant=request.tenant,
                service=objective.service,
                start_ns=start_ns,
                end_ns=end_ns,
                slow_ms=objective.latency_threshold_ms,
            )
            figures.append(convert.version_figures(window, samples, objective))
        return telemetry_pb2.GetReleaseFiguresResponse(
            versions=figures,
            objective=objective.name,
            availability_target=float(objective.availability),
            latency_threshold_ms=objective.latency_threshold_ms,
            latency_target=float(objective.latency_target),
        )

    # -- usage, cost, budgets ------------------------------------------------------------------

    async def RecordUsage(
        self, request: telemetry_pb2.RecordUsageRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.RecordUsageResponse:
        violations = validation.batch("records", request.records)
        for i, record in enumerate(request.records):
            violations += validation.usage_record(i, record)
        if violations:
            await abort_invalid(context, violations)
        stored, duplicates = await self._ledger.record(
            [convert.usage_row(r) for r in request.records]
        )
        _USAGE_STORED.add(stored)
        _USAGE_DUPLICATES.add(duplicates)
        return telemetry_pb2.RecordUsageResponse(
            stored=stored, duplicates=duplicates, price_version=self._ledger.prices.version
        )

    async def GetPrices(
        self, request: telemetry_pb2.GetPricesRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.GetPricesResponse:
        table = self._ledger.prices
        return telemetry_pb2.GetPricesResponse(
            version=table.version,
            currency=table.currency,
            input_per_1k_tokens_micros=table.input_per_1k_tokens_micros,
            output_per_1k_tokens_micros=table.output_per_1k_tokens_micros,
            per_tool_call_micros=table.per_tool_call_micros,
            per_cost_unit_micros=table.per_cost_unit_micros,
            models=[
                telemetry_pb2.ModelPrice(
                    model=name,
                    input_per_1k_tokens_micros=price.input_per_1k_tokens_micros,
                    output_per_1k_tokens_micros=price.output_per_1k_tokens_micros,
                )
                for name, price in sorted(table.models.items())
            ],
        )

    async def GetCost(
        self, request: telemetry_pb2.GetCostRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.GetCostResponse:
        violations = validation.caller("", request.caller)
        keys = [convert.COST_KEYS.get(g) for g in request.group_by]
        if None in keys or len(set(keys)) != len(keys):
            violations.append(
                ("group_by", "distinct values of TENANT, PRINCIPAL, TOOL, DAY, MODEL")
            )
        if not 0 <= request.days <= MAX_COST_DAYS:
            violations.append(("days", f"between 0 and {MAX_COST_DAYS}"))
        window = validation.timestamp("", request, "start", required=False)
        window += validation.timestamp("", request, "end", required=False)
        has_start, has_end = request.HasField("start"), request.HasField("end")
        if window:
            violations += window
        elif has_start != has_end or (has_start and request.days):
            violations.append(("start", "give start and end together, or days"))
        elif has_start:
            span_ns = validation.stamp_ns(request.end) - validation.stamp_ns(request.start)
            if not 0 < span_ns <= MAX_COST_DAYS * 86400 * NS_PER_S:
                violations.append(("end", f"after start, at most {MAX_COST_DAYS} days later"))
        if violations:
            await abort_invalid(context, violations)
        if has_start:
            start_ns, end_ns = validation.stamp_ns(request.start), validation.stamp_ns(request.end)
        else:
            end_ns = time.time_ns()
            start_ns = end_ns - (request.days or DEFAULT_COST_DAYS) * 86400 * NS_PER_S
        ordered = [key for key in COST_KEYS if key in keys]
        rows = await self._ledger.cost(request.caller.tenant, ordered, start_ns, end_ns)
        return telemetry_pb2.GetCostResponse(
            rows=[telemetry_pb2.CostRow(**row) for row in rows],
            window_start=convert.timestamp(start_ns),
            window_end=convert.timestamp(end_ns),
        )

    async def SetBudget(
        self, request: telemetry_pb2.SetBudgetRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.SetBudgetResponse:
        violations = validation.caller("", request.caller)
        violations += validation.texts("", request, (), ("tenant", "principal"))
        if request.period not in convert.PERIODS:
            violations.append(("period", "DAY or MONTH"))
        violations += validation.amounts(
            "limits.", request.limits, ("tool_calls", "tokens", "cost_micros")
        )
        if violations:
            await abort_invalid(context, violations)
        tenant = access.target_tenant(request.caller, request.tenant)
        if tenant is None:
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                access.another_tenant_refusal("setting the budget"),
            )
        limits = Amounts(
            request.limits.tool_calls, request.limits.tokens, request.limits.cost_micros
        )
        state = await self._ledger.set_budget(
            tenant, request.principal, convert.PERIODS[request.period], limits, datetime.now(UTC)
        )
        if state is None:
            return telemetry_pb2.SetBudgetResponse(removed=True)
        return telemetry_pb2.SetBudgetResponse(budget=convert.budget_status(state))

    async def ListBudgets(
        self, request: telemetry_pb2.ListBudgetsRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.ListBudgetsResponse:
        if violations := validation.caller("", request.caller):
            await abort_invalid(context, violations)
        states = await self._ledger.budgets(request.caller.tenant, datetime.now(UTC))
        return telemetry_pb2.ListBudgetsResponse(budgets=[convert.budget_status(s) for s in states])

    async def GetBudgetState(
        self, request: telemetry_pb2.GetBudgetStateRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.GetBudgetStateResponse:
        violations = validation.caller("", request.caller)
        violations += validation.texts("caller.", request.caller, (), ("subject",))
        if violations:
            await abort_invalid(context, violations)
        budgeted = await self._ledger.budgeted(request.caller.tenant, request.caller.subject)
        return telemetry_pb2.GetBudgetStateResponse(budgeted=budgeted)

    async def ReserveBudget(
        self, request: telemetry_pb2.ReserveBudgetRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.ReserveBudgetResponse:
        violations = validation.caller("", request.caller)
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
            top_up=request.top_up,
        )
        if outcome is None:
            _RESERVATIONS.add(1, {"result": "unlimited"})
            return telemetry_pb2.ReserveBudgetResponse(unlimited=True)
        if isinstance(outcome, Reservation):
            _RESERVATIONS.add(1, {"result": "granted"})
            return telemetry_pb2.ReserveBudgetResponse(
                reserved=True,
                reservation_id=outcome.id,
                expires_at=convert.timestamp(outcome.expires_at_ns),
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

    # -- audit trail ---------------------------------------------------------------------------

    async def AppendAudit(
        self, request: telemetry_pb2.AppendAuditRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.AppendAuditResponse:
        violations = validation.batch("events", request.events)
        for i, event in enumerate(request.events):
            violations += validation.audit_event(i, event)
        if violations:
            await abort_invalid(context, violations)
        role = self._peer_role(context)
        for i, event in enumerate(request.events):
            refusal = access.audit_action_refusal(role, event.action)
            if refusal is not None:
                await abort(context, grpc.StatusCode.PERMISSION_DENIED, f"events[{i}]: {refusal}")
        stored, duplicates = await self._audit.append(
            [convert.audit_row(e) for e in request.events]
        )
        _AUDIT_STORED.add(stored)
        _AUDIT_DUPLICATES.add(duplicates)
        return telemetry_pb2.AppendAuditResponse(stored=stored, duplicates=duplicates)

    async def ListAudit(
        self, request: telemetry_pb2.ListAuditRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.ListAuditResponse:
        violations = validation.caller("", request.caller)
        violations += validation.texts("", request, (), ("action",))
        violations += validation.timestamp("", request, "since", required=False)
        if not 0 <= request.limit <= MAX_AUDIT_PAGE:
            violations.append(("limit", f"between 0 and {MAX_AUDIT_PAGE}"))
        token = request.page_token
        if token and not (token.isdigit() and len(token) <= 18):
            violations.append(("page_token", "a next_page_token from ListAudit"))
        if violations:
            await abort_invalid(context, violations)
        limit = request.limit or DEFAULT_AUDIT_PAGE
        since_ns = validation.stamp_ns(request.since) if request.HasField("since") else 0
        rows = await self._audit.page(
            request.caller.tenant, request.action, since_ns, int(token or 0), limit + 1
        )
        page = rows[:limit]
        return telemetry_pb2.ListAuditResponse(
            events=[convert.stored_event(row) for row in page],
            next_page_token=str(page[-1].seq) if len(rows) > limit else "",
        )

    async def VerifyAudit(
        self, request: telemetry_pb2.VerifyAuditRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.VerifyAuditResponse:
        if violations := validation.caller("", request.caller):
            await abort_invalid(context, violations)
        tenant = request.caller.tenant
        verdict = await self._audit.verify(tenant, await self._checkpoints.trust(tenant))
        return convert.verdict(verdict)

    async def CheckpointAudit(
        self, request: telemetry_pb2.CheckpointAuditRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.CheckpointAuditResponse:
        if violations := validation.caller("", request.caller):
            await abort_invalid(context, violations)
        try:
            signed = await self._checkpoints.checkpoint(request.caller.tenant)
        except ChainBroken as broken:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the chain does not verify, nothing was signed: {broken.problem.message}",
            )
        if signed is None:
            return telemetry_pb2.CheckpointAuditResponse()
        return telemetry_pb2.CheckpointAuditResponse(checkpoint=convert.checkpoint(signed))

    async def GetServiceInfo(
        self, request: telemetry_pb2.GetServiceInfoRequest, context: aio.ServicerContext
    ) -> telemetry_pb2.GetServiceInfoResponse:
        info = service_info(self._settings.service_name, CONTRACT_VERSIONS)
        for config in self._configs:
            info.attributes.update(config.attributes())
        return telemetry_pb2.GetServiceInfoResponse(info=info)
