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
from gateway.authn import Principal
from gateway.authz import SCOPE_OPS_READ
from gateway.reliability import DependencyError, Guard
from services.kit import scopes
from services.kit.audit import FAILURE, SUCCESS, audit_event
from services.kit.context import request_id_var
from services.kit.deadlines import Deadline
from services.kit.errors import abort, abort_invalid
from services.kit.limits import MAX_AMOUNT, MAX_KEY_CHARS
from services.kit.timestamps import timestamp_problem
from services.kit.tracing import current_trace_id
from toolmesh.common.v1 import audit_pb2, common_pb2
from toolmesh.gateway.v1 import gateway_pb2
from toolmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc

SCOPE_ADMIN = "admin"
TELEMETRY = "telemetry"

TRACE_ID = re.compile(r"[0-9a-f]{32}")
# Telemetry's limits (services.kit.limits), checked here first so bad input never leaves the
# gateway.
MAX_COST_DAYS = 366
MAX_COST_WINDOW_NS = MAX_COST_DAYS * 86400 * 1_000_000_000
MAX_AUDIT_PAGE = 1000
NO_SUCH_TRACE = "no such trace"

_COST_GROUPS = {
    telemetry_pb2.COST_GROUP_BY_TENANT,
    telemetry_pb2.COST_GROUP_BY_PRINCIPAL,
    telemetry_pb2.COST_GROUP_BY_TOOL,
    telemetry_pb2.COST_GROUP_BY_DAY,
    telemetry_pb2.COST_GROUP_BY_MODEL,
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
        found.append(("group_by", "distinct values of TENANT, PRINCIPAL, TOOL, DAY, MODEL"))
    if not 0 <= request.days <= MAX_COST_DAYS:
        found.append(("days", f"between 0 and {MAX_COST_DAYS}"))
    has_start, has_end = request.HasField("start"), request.HasField("end")
    if has_start != has_end or (has_start and request.days):
        found.append(("start", "give start and end together, or days"))
    elif has_start:
        problems = [(n, timestamp_problem(getattr(request, n))) for n in ("start", "end")]
        found += [(name, problem) for name, problem in problems if problem]
        if found:
            return found
        span = request.end.ToNanoseconds() - request.start.ToNanoseconds()
        if not 0 < span <= MAX_COST_WINDOW_NS:
            found.append(("end", f"after start, at most {MAX_COST_DAYS} days later"))
    return found


def budget_violations(request: gateway_pb2.SetBudgetRequest) -> Violations:
    found = _key("principal", request.principal) + _key("tenant", request.tenant)
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
    if request.HasField("since"):
        problem = timestamp_problem(request.since)
        if problem is not None:
            found.append(("since", problem))
        elif request.since.ToNanoseconds() < 0:
            found.append(("since", "after 1970"))
    return found


def slo_violations(request: gateway_pb2.GetSloRequest) -> Violations:
    return _key("name", request.name)


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
            # Telemetry scopes the trace to the caller's tenant: another tenant's trace is
            # NOT_FOUND exactly like an unknown one.
            reply = await self.guard.call(
                TELEMETRY,
                self.telemetry.GetTrace,
                telemetry_pb2.GetTraceRequest(
                    trace_id=request.trace_id.lower(), caller=caller_proto(principal)
                ),
                timeout,
            )
        except DependencyError as err:
            if err.code == grpc.StatusCode.NOT_FOUND and err.tried:
                await abort(context, grpc.StatusCode.NOT_FOUND, NO_SUCH_TRACE)
            await self.access.forward_error(context, err)
        return gateway_pb2.GetTraceResponse(spans=reply.spans)

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
        """Sets (or removes) a budget; another tenant's needs platform:admin. The change is
        audited in the acting caller's tenant (and, for another tenant's budget, in that
        tenant's trail too), whether telemetry accepted it or not."""
        deadline = self.deadline(context)
        if violations := budget_violations(request):
            await abort_invalid(context, violations)
        other = bool(request.tenant)
        principal, policy = await self.access.authenticate(
            context, scopes.PLATFORM_ADMIN if other else SCOPE_ADMIN
        )
        tenant = request.tenant or principal.tenant
        timeout = await hop_timeout(context, deadline, TELEMETRY)
        details: dict[str, object] = {
            "tenant": tenant,
            "principal": request.principal,
            "period": telemetry_pb2.BudgetPeriod.Name(request.period),
            "tool_calls": request.limits.tool_calls,
            "tokens": request.limits.tokens,
            "cost_micros": request.limits.cost_micros,
        }
        try:
            reply = await self.guard.call(
                TELEMETRY,
                self.telemetry.SetBudget,
                telemetry_pb2.SetBudgetRequest(
                    caller=caller_proto(principal),
                    tenant=tenant,
                    principal=request.principal,
                    period=request.period,
                    limits=request.limits,
                ),
                timeout,
            )
        except DependencyError as err:
            await self._audit_budget(context, principal, policy.version, FAILURE, details)
            await self.access.forward_error(context, err)
        await self._audit_budget(context, principal, policy.version, SUCCESS, details)
        response = gateway_pb2.SetBudgetResponse(removed=reply.removed)
        if reply.HasField("budget"):
            response.budget.CopyFrom(reply.budget)
        return response

    async def _audit_budget(
        self,
        context: aio.ServicerContext,
        principal: Principal,
        policy_version: str,
        outcome: str,
        details: dict[str, object],
    ) -> None:
        tenant = str(details["tenant"])
        events = [
            audit_event(
                action=audit_pb2.AUDIT_ACTION_BUDGET_SET,
                tenant=chain,
                actor=principal.subject,
                target=f"budget:{tenant}",
                outcome=outcome,
                request_id=request_id_var.get(),
                trace_id=current_trace_id(),
                policy_version=policy_version,
                contract_versions=("toolmesh.gateway.v1",),
                details={**details, "actor_tenant": principal.tenant},
            )
            for chain in sorted({principal.tenant, tenant})
        ]
        await self.access.audit_refusal(context, *events)

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
            dead_letter_notices=reply.dead_letter_notices,
            pruned_through_seq=reply.pruned_through_seq,
        )
        if reply.HasField("problem"):
            response.problem.CopyFrom(reply.problem)
        if reply.HasField("last_checkpoint"):
            response.last_checkpoint.CopyFrom(reply.last_checkpoint)
        return response

    async def CheckpointAudit(
        self, request: gateway_pb2.CheckpointAuditRequest, context: aio.ServicerContext
    ) -> gateway_pb2.CheckpointAuditResponse:
        reply = await self._ask(
            context,
            SCOPE_ADMIN,
            [],
            self.telemetry.CheckpointAudit,
            lambda caller: telemetry_pb2.CheckpointAuditRequest(caller=caller),
        )
        response = gateway_pb2.CheckpointAuditResponse()
        if reply.HasField("checkpoint"):
            response.checkpoint.CopyFrom(reply.checkpoint)
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
