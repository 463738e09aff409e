"""Operator views: GetTrace, GetCost, SetBudget, ListBudgets, ListAudit, VerifyAudit, GetSlo.

Each is authenticated like GetStats (``ops:read`` for the reads, ``admin`` for SetBudget),
validated here so bad input never reaches telemetry, and forwarded to telemetry with the
caller's identity as ``Caller``: telemetry scopes every ledger, budget and audit query by
``caller.tenant``. Telemetry's GetTrace takes no caller, so the gateway scopes traces itself:
a trace is the caller's only if one of its spans carries the caller's tenant (the gateway's
Run span sets ``toolmesh.tenant``); otherwise the answer is exactly the one for an unknown
trace id. Telemetry's own errors reach the caller with their code and google.rpc details.

The servicer (gateway.servicer) delegates to :class:`Operations`, built once by gateway.app.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from gateway.access import Access, caller_proto, hop_timeout
from gateway.authz import SCOPE_OPS_READ
from gateway.reliability import DependencyError, Guard
from services.kit.deadlines import Deadline
from services.kit.errors import abort, abort_invalid
from toolmesh.common.v1 import common_pb2
from toolmesh.gateway.v1 import gateway_pb2
from toolmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc

SCOPE_ADMIN = "admin"
TELEMETRY = "telemetry"

TRACE_ID = re.compile(r"[0-9a-f]{32}")
# Telemetry's limits, checked here first so bad input never leaves the gateway.
MAX_KEY_CHARS = 256
MAX_COST_DAYS = 366
MAX_COST_WINDOW_NS = MAX_COST_DAYS * 86400 * 1_000_000_000
MAX_AMOUNT = 10**12
MAX_AUDIT_PAGE = 1000
NO_SUCH_TRACE = "no such trace"

_COST_GROUPS = {
    telemetry_pb2.COST_GROUP_BY_TENANT,
    telemetry_pb2.COST_GROUP_BY_PRINCIPAL,
    telemetry_pb2.COST_GROUP_BY_TOOL,
    telemetry_pb2.COST_GROUP_BY_DAY,
}
_PERIODS = {telemetry_pb2.BUDGET_PERIOD_DAY, telemetry_pb2.BUDGET_PERIOD_MONTH}

Violations = list[tuple[str, str]]


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text)


def _key(field: str, value: str) -> Violations:
    if len(value) > MAX_KEY_CHARS:
        return [(field, f"at most {MAX_KEY_CHARS} characters")]
    if _has_control(value):
        return [(field, "must not contain control characters")]
    return []


def trace_violations(request: gateway_pb2.GetTraceRequest) -> Violations:
    trace_id = request.trace_id.lower()
    if not TRACE_ID.fullmatch(trace_id) or trace_id == "0" * 32:
        return [("trace_id", "32 hexadecimal characters, not all 0")]
    return []


def cost_violations(request: gateway_pb2.GetCostRequest) -> Violations:
    found: Violations = []
    groups = list(request.group_by)
    if any(g not in _COST_GROUPS for g in groups) or len(set(groups)) != len(groups):
        found.append(("group_by", "distinct values of TENANT, PRINCIPAL, TOOL, DAY"))
    if not 0 <= request.days <= MAX_COST_DAYS:
        found.append(("days", f"between 0 and {MAX_COST_DAYS}"))
    has_start, has_end = request.HasField("start"), request.HasField("end")
    if has_start != has_end or (has_start and request.days):
        found.append(("start", "give start and end together, or days"))
    elif has_start:
        span = request.end.ToNanoseconds() - request.start.ToNanoseconds()
        if not 0 < span <= MAX_COST_WINDOW_NS:
            found.append(("end", f"after start, at most {MAX_COST_DAYS} days later"))
    return found


def budget_violations(request: gateway_pb2.SetBudgetRequest) -> Violations:
    found = _key("principal", request.principal)
    if request.period not in _PERIODS:
        found.append(("period", "DAY or MONTH"))
    for name in ("tool_calls", "tokens", "cost_micros"):
        if not 0 <= getattr(request.limits, name) <= MAX_AMOUNT:
            found.append((f"limits.{name}", f"between 0 and {MAX_AMOUNT}"))
    return found


def audit_violations(request: gateway_pb2.ListAuditRequest) -> Violations:
    found = _key("action", request.action)
    if not 0 <= request.limit <= MAX_AUDIT_PAGE:
        found.append(("limit", f"between 0 and {MAX_AUDIT_PAGE}"))
    token = request.page_token
    if token and not (token.isdigit() and len(token) <= 18):
        found.append(("page_token", "a next_page_token from ListAudit"))
    if request.HasField("since") and request.since.ToNanoseconds() < 0:
        found.append(("since", "after 1970"))
    return found


def slo_violations(request: gateway_pb2.GetSloRequest) -> Violations:
    return _key("name", request.name)


def tenant_spans(
    spans: list[telemetry_pb2.TraceSpan], tenant: str
) -> list[telemetry_pb2.TraceSpan] | None:
    """The spans of a trace the tenant may see, or None when the trace is not the tenant's.

    The trace is the tenant's when a span carries its tenant; spans that carry another tenant
    (a trace id reused by another tenant's request) are left out.
    """
    if not any(span.tenant == tenant for span in spans):
        return None
    return [span for span in spans if span.tenant in ("", tenant)]


@dataclass
class Operations:
    """The operator RPCs, using the gateway's authentication, deadline and guarded calls."""

    telemetry: telemetry_pb2_grpc.TelemetryStub
    access: Access
    deadline: Callable[[aio.ServicerContext], Deadline]
    guard: Guard

    async def _ask(
        self,
        context: aio.ServicerContext,
        scope: str,
        violations: Violations,
        method: Callable[..., Any],
        build: Callable[[common_pb2.Caller], Any],
    ) -> Any:
        """Validate, authenticate with ``scope``, then call telemetry within the deadline."""
        deadline = self.deadline(context)
        if violations:
            await abort_invalid(context, violations)
        principal, _ = await self.access.authenticate(context, scope)
        timeout = await hop_timeout(context, deadline, TELEMETRY)
        try:
            return await self.guard.call(TELEMETRY, method, build(caller_proto(principal)), timeout)
        except DependencyError as err:
            await self.access.forward_error(context, err)

    async def GetTrace(
        self, request: gateway_pb2.GetTraceRequest, context: aio.ServicerContext
    ) -> gateway_pb2.GetTraceResponse:
        deadline = self.deadline(context)
        if violations := trace_violations(request):
            await abort_invalid(context, violations)
        principal, _ = await self.access.authenticate(context, SCOPE_OPS_READ)
        timeout = await hop_timeout(context, deadline, TELEMETRY)
        try:
            reply = await self.guard.call(
                TELEMETRY,
                self.telemetry.GetTrace,
                telemetry_pb2.GetTraceRequest(trace_id=request.trace_id.lower()),
                timeout,
            )
        except DependencyError as err:
            if err.code == grpc.StatusCode.NOT_FOUND and err.tried:
                await abort(context, grpc.StatusCode.NOT_FOUND, NO_SUCH_TRACE)
            await self.access.forward_error(context, err)
        spans = tenant_spans(list(reply.spans), principal.tenant)
        if spans is None:
            # Exactly the answer for an unknown trace id: nothing about other tenants leaks.
            await abort(context, grpc.StatusCode.NOT_FOUND, NO_SUCH_TRACE)
        return gateway_pb2.GetTraceResponse(spans=spans)

    async def GetCost(
        self, request: gateway_pb2.GetCostRequest, context: aio.ServicerContext
    ) -> gateway_pb2.GetCostResponse:
        def build(caller: common_pb2.Caller) -> telemetry_pb2.GetCostRequest:
            query = telemetry_pb2.GetCostRequest(
                caller=caller, days=request.days, group_by=request.group_by
            )
            if request.HasField("start"):
                query.start.CopyFrom(request.start)
            if request.HasField("end"):
                query.end.CopyFrom(request.end)
            return query

        reply = await self._ask(
            context, SCOPE_OPS_READ, cost_violations(request), self.telemetry.GetCost, build
        )
        return gateway_pb2.GetCostResponse(
            rows=reply.rows, window_start=reply.window_start, window_end=reply.window_end
        )

    async def SetBudget(
        self, request: gateway_pb2.SetBudgetRequest, context: aio.ServicerContext
    ) -> gateway_pb2.SetBudgetResponse:
        reply = await self._ask(
            context,
            SCOPE_ADMIN,
            budget_violations(request),
            self.telemetry.SetBudget,
            lambda caller: telemetry_pb2.SetBudgetRequest(
                caller=caller,
                tenant=caller.tenant,
                principal=request.principal,
                period=request.period,
                limits=request.limits,
            ),
        )
        response = gateway_pb2.SetBudgetResponse(removed=reply.removed)
        if reply.HasField("budget"):
            response.budget.CopyFrom(reply.budget)
        return response

    async def ListBudgets(
        self, request: gateway_pb2.ListBudgetsRequest, context: aio.ServicerContext
    ) -> gateway_pb2.ListBudgetsResponse:
        reply = await self._ask(
            context,
            SCOPE_OPS_READ,
            [],
            self.telemetry.ListBudgets,
            lambda caller: telemetry_pb2.ListBudgetsRequest(caller=caller),
        )
        return gateway_pb2.ListBudgetsResponse(budgets=reply.budgets)

    async def ListAudit(
        self, request: gateway_pb2.ListAuditRequest, context: aio.ServicerContext
    ) -> gateway_pb2.ListAuditResponse:
        def build(caller: common_pb2.Caller) -> telemetry_pb2.ListAuditRequest:
            query = telemetry_pb2.ListAuditRequest(
                caller=caller,
                action=request.action,
                limit=request.limit,
                page_token=request.page_token,
            )
            if request.HasField("since"):
                query.since.CopyFrom(request.since)
            return query

        reply = await self._ask(
            context, SCOPE_OPS_READ, audit_violations(request), self.telemetry.ListAudit, build
        )
        return gateway_pb2.ListAuditResponse(
            events=reply.events, next_page_token=reply.next_page_token
        )

    async def VerifyAudit(
        self, request: gateway_pb2.VerifyAuditRequest, context: aio.ServicerContext
    ) -> gateway_pb2.VerifyAuditResponse:
        reply = await self._ask(
            context,
            SCOPE_OPS_READ,
            [],
            self.telemetry.VerifyAudit,
            lambda caller: telemetry_pb2.VerifyAuditRequest(caller=caller),
        )
        response = gateway_pb2.VerifyAuditResponse(
            ok=reply.ok,
            events_checked=reply.events_checked,
            head_seq=reply.head_seq,
            head_hash=reply.head_hash,
        )
        if reply.HasField("problem"):
            response.problem.CopyFrom(reply.problem)
        return response

    async def GetSlo(
        self, request: gateway_pb2.GetSloRequest, context: aio.ServicerContext
    ) -> gateway_pb2.GetSloResponse:
        # SLOs are mesh-wide, not tenant data: telemetry's GetSlo takes no caller.
        reply = await self._ask(
            context,
            SCOPE_OPS_READ,
            slo_violations(request),
            self.telemetry.GetSlo,
            lambda caller: telemetry_pb2.GetSloRequest(name=request.name),
        )
        return gateway_pb2.GetSloResponse(
            version=reply.version, objectives=reply.objectives, evaluated_at=reply.evaluated_at
        )
