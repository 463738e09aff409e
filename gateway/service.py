"""The Gateway servicer: validate, authenticate, then orchestrate the inner services.

Reliability (docs/reliability.md): every downstream call gets what is left of the request's
budget minus a reserve to answer, under its dependency's circuit breaker (gateway.reliability);
failures degrade as DESIGN.md's failure table says; a turn memory could not take is committed to
the durable outbox before the answer is sent (gateway.outbox), or the Run fails UNAVAILABLE;
Runs and tool calls over their caps are refused at once with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from typing import NoReturn

import grpc
from google.protobuf.message import Message
from grpc import aio
from opentelemetry import trace
from pydantic import ValidationError

from gateway.accounting import (
    AUTH_FAILURE,
    BUDGET_DENIED,
    GATEWAY_CONTRACTS,
    PERMISSION_DENIED,
    TOOL_WRITE,
    Accounting,
    audit_event,
    count_reservation,
    run_event_id,
    usage_record,
    verified_identity,
)
from gateway.authn import AuthState, AuthUnavailableError, Policy, Principal, TokenError
from gateway.authz import (
    SCOPE_OPS_READ,
    SCOPE_READ,
    Decision,
    authorize_tool,
    side_effect_name,
)
from gateway.clients import Clients
from gateway.operations import Operations
from gateway.outbox import KIND_AUDIT, KIND_MEMORY, KIND_USAGE, GatewayOutbox
from gateway.reliability import FALLBACKS, Bulkhead, DependencyError, Guard
from gateway.settings import GatewaySettings
from gateway.validation import HistoryInput, RunInput, StatsInput
from services.kit.bearer import bearer_token
from services.kit.buildinfo import service_info
from services.kit.context import request_id_var
from services.kit.deadlines import Deadline, DeadlineSpentError
from services.kit.errors import abort, abort_invalid, forward, retry_info, violations_from
from services.kit.pricing import cost_micros
from services.kit.tracing import current_trace_id
from toolmesh.auth.v1 import auth_pb2
from toolmesh.common.v1 import common_pb2
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from toolmesh.memory.v1 import memory_pb2
from toolmesh.router.v1 import router_pb2
from toolmesh.telemetry.v1 import telemetry_pb2

log = logging.getLogger("toolmesh.gateway")

CONTRACT_VERSIONS = ["toolmesh.gateway.v1"]
# Request ids derived from idempotency keys live in their own UUID namespace.
_IDEMPOTENCY_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:toolmesh:gateway:idempotency")
ROUTER_FALLBACK = (
    "The tool router is unavailable right now, so no tool could run. Please try again."
)
TOOL_FALLBACK = "The tool {name} could not answer right now. Please try again."
# Tool errors that mean "the tool said no" (an explanation), not "the tool failed" (fallback).
_TOOL_REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}
# Memory refusing the turns themselves: replaying them would fail forever, so they are not queued.
_PERMANENT_WRITE_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED}
# Time kept after the outbox write to send the answer (or the UNAVAILABLE).
_ANSWER_MARGIN_S = 0.02
# Longest an audit event of a refusal may hold up the refusal itself.
_REFUSAL_AUDIT_S = 0.5
# The usage record's outcome for each Run outcome.
_USAGE_OUTCOMES = {
    gateway_pb2.OUTCOME_TOOL_ANSWERED: "ok",
    gateway_pb2.OUTCOME_FALLBACK: "fallback",
    gateway_pb2.OUTCOME_NO_MATCH: "no_match",
}


def request_id_for(principal: Principal, idempotency_key: str) -> str:
    """A fresh id, or one derived from the key so a retried call gets the same id."""
    if not idempotency_key:
        return uuid.uuid4().hex
    name = "\x1f".join((principal.tenant, principal.subject, idempotency_key))
    return uuid.uuid5(_IDEMPOTENCY_NAMESPACE, name).hex


def whitespace_tokens(text: str) -> int:
    return len(text.split())


def caller_proto(principal: Principal) -> common_pb2.Caller:
    return common_pb2.Caller(
        subject=principal.subject,
        tenant=principal.tenant,
        scopes=sorted(principal.scopes),
        roles=list(principal.roles),
    )


def _rpc_name() -> str:
    """The RPC being served, from the server span's name (the audit target of a refusal)."""
    name = getattr(trace.get_current_span(), "name", "")
    return name if isinstance(name, str) and name.startswith("/") else "toolmesh.gateway.v1.Gateway"


@dataclass
class _Run:
    """One Run in flight: who asked, its budget, and what it has learned so far."""

    context: aio.ServicerContext
    deadline: Deadline
    principal: Principal
    policy: Policy
    allowed: frozenset[str]
    input: RunInput
    request_id: str
    caller: common_pb2.Caller
    answer: str = ""
    outcome: gateway_pb2.Outcome = gateway_pb2.OUTCOME_UNSPECIFIED
    degraded: list[str] = field(default_factory=list)
    tool: router_pb2.ToolContract | None = None
    result_json: str = ""
    tool_calls: int = 0
    cost_units: int = 0
    # The budget reservation this Run's usage record commits ("" when none was needed).
    reservation_id: str = ""
    # Audit events committed with the Run's usage record (tool.write).
    audit: list[telemetry_pb2.AuditEvent] = field(default_factory=list)

    def degrade(self, what: str) -> None:
        """Name what was degraded in the answer, and count the fallback by dependency."""
        if what not in self.degraded:
            self.degraded.append(what)
            dependency, _, tool = what.partition(":")
            FALLBACKS.add(1, {"dependency": dependency, "tool": tool})


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(
        self,
        settings: GatewaySettings,
        auth_state: AuthState,
        clients: Clients,
        guard: Guard,
        outbox: GatewayOutbox,
        *,
        accounting: Accounting,
    ) -> None:
        self._settings = settings
        self._auth = auth_state
        self._clients = clients
        self._guard = guard
        self._outbox = outbox
        self._accounting = accounting
        self._runs = Bulkhead("runs", settings.max_inflight_runs)
        self._tool_calls = Bulkhead("tool_calls", settings.max_inflight_per_tool)

    # -- shared steps -------------------------------------------------------------------------

    def _deadline(self, context: aio.ServicerContext) -> Deadline:
        return Deadline.for_request(
            context.time_remaining(),
            default_s=self._settings.default_deadline_s,
            max_s=self._settings.max_deadline_s,
            reserve_ms=self._settings.deadline_reserve_ms,
        )

    async def _timeout(self, context: aio.ServicerContext, deadline: Deadline, hop: str) -> float:
        try:
            return deadline.timeout()
        except DeadlineSpentError:
            await abort(
                context, grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline exhausted before {hop}"
            )

    async def _shed(self, context: aio.ServicerContext, what: str) -> NoReturn:
        await abort(
            context,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{what} at capacity; retry later",
            retry_info(self._settings.shed_retry_after_ms / 1000),
        )

    async def _authenticate(
        self, context: aio.ServicerContext, scope: str = ""
    ) -> tuple[Principal, Policy]:
        token = bearer_token(context.invocation_metadata())
        if not token:
            await self._audit_auth_failure(context, "", "missing bearer token")
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
        try:
            principal, policy = await self._auth.verify(token)
        except AuthUnavailableError as exc:
            await abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                str(exc),
                retry_info(self._settings.auth_refresh_s),
            )
        except TokenError as exc:
            log.info("token rejected", extra={"reason": exc.reason})
            await self._audit_auth_failure(context, token, exc.reason)
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, exc.reason)
        if scope and scope not in principal.scopes:
            log.info(
                "authorization",
                extra={
                    "decision": "deny",
                    "reason": f"missing scope {scope}",
                    "missing_scope": scope,
                    "tenant": principal.tenant,
                    "subject": principal.subject,
                    "policy_version": policy.version,
                },
            )
            await self._audit_refusal(
                context,
                audit_event(
                    tenant=principal.tenant,
                    actor=principal.subject,
                    action=PERMISSION_DENIED,
                    target=_rpc_name(),
                    outcome="denied",
                    request_id=request_id_var.get(),
                    trace_id=current_trace_id(),
                    policy_version=policy.version,
                    contract_versions=GATEWAY_CONTRACTS,
                    details={"reason": f"missing scope {scope}", "missing_scope": scope},
                ),
            )
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, f"missing scope {scope}")
        return principal, policy

    # -- audit of refusals ----------------------------------------------------------------------

    async def _audit_refusal(
        self, context: aio.ServicerContext, *events: telemetry_pb2.AuditEvent
    ) -> None:
        """Commit a refusal's audit events to the outbox before refusing (bounded by what is
        left of the caller's deadline); a failure is logged and the refusal stands."""
        remaining = context.time_remaining()
        bound = _REFUSAL_AUDIT_S if remaining is None else min(_REFUSAL_AUDIT_S, remaining)
        try:
            async with asyncio.timeout(max(bound - _ANSWER_MARGIN_S, 0.001)):
                await self._outbox.put_many([(KIND_AUDIT, e.event_id, e) for e in events])
        except Exception as exc:
            log.error(
                "audit event not stored",
                extra={
                    "actions": [e.action for e in events],
                    "error": f"{type(exc).__name__}: {exc}",
                },
            )

    async def _audit_auth_failure(
        self, context: aio.ServicerContext, token: str, reason: str
    ) -> None:
        """auth.failure, at most ``audit_auth_failures_per_s`` per replica; never the token.

        The tenant and actor are recorded only when the token's signature verifies (an expired
        or revoked token, say); otherwise the tenant is "_unknown"."""
        if not self._accounting.auth_failures.allow():
            return
        try:
            snapshot = self._auth.snapshot()
        except AuthUnavailableError:
            snapshot = None
        tenant, subject, token_id = verified_identity(token, snapshot) if token else ("", "", "")
        details = {"reason": reason}
        if token_id:
            details["token_id"] = token_id
        await self._audit_refusal(
            context,
            audit_event(
                tenant=tenant,
                actor=subject,
                action=AUTH_FAILURE,
                target=_rpc_name(),
                outcome="refused",
                request_id=request_id_var.get(),
                trace_id=current_trace_id(),
                policy_version=snapshot.policy.version if snapshot else "",
                contract_versions=GATEWAY_CONTRACTS,
                details=details,
            ),
        )

    def _run_event(
        self, run: _Run, action: str, target: str, outcome: str, **details: object
    ) -> telemetry_pb2.AuditEvent:
        if run.tool is not None:
            details.setdefault("tool", f"{run.tool.name}@{run.tool.version}")
        return audit_event(
            tenant=run.principal.tenant,
            actor=run.principal.subject,
            action=action,
            target=target,
            outcome=outcome,
            request_id=run.request_id,
            trace_id=current_trace_id(),
            policy_version=run.policy.version,
            details=details,
            # A Run's tool.write is recorded once however often the Run is retried.
            event_id=run_event_id(run.request_id, action) if action == TOOL_WRITE else "",
        )

    async def _forward_error(
        self, context: aio.ServicerContext, error: DependencyError, prefix: bool = True
    ) -> NoReturn:
        """The inner service's code and details; transport failures, timeouts and an open
        breaker are summarised instead, since their text (addresses, connection errors)
        describes our network to the caller."""
        service, code, err = error.dependency, error.code, error.rpc_error
        log.info("forwarding error", extra={"dependency": service, "error": str(error)})
        if err is None or code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        ):
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                await abort(context, code, f"{service} did not answer in time")
            retry_after = error.retry_after_s or self._settings.shed_retry_after_ms / 1000
            await abort(context, code, f"{service} is unavailable", retry_info(retry_after))
        message = f"{service}: {err.details()}" if prefix else err.details() or ""
        await forward(context, err, message)

    # -- Run ----------------------------------------------------------------------------------

    async def Run(
        self, request: gateway_pb2.RunRequest, context: aio.ServicerContext
    ) -> gateway_pb2.RunResponse:
        """Answer a prompt with a tool, following DESIGN.md's request flow.

        Over ``max_inflight_runs`` the Run is refused at once (RESOURCE_EXHAUSTED, RetryInfo):
        queueing it would only turn overload into timeouts.
        """
        if not self._runs.try_enter():
            await self._shed(context, "gateway")
        try:
            return await self._run(request, context)
        finally:
            self._runs.leave()

    async def _run(
        self, request: gateway_pb2.RunRequest, context: aio.ServicerContext
    ) -> gateway_pb2.RunResponse:
        deadline = self._deadline(context)
        try:
            run_input = RunInput(
                session_id=request.session_id,
                prompt=request.prompt,
                idempotency_key=request.idempotency_key,
            )
        except ValidationError as exc:
            await abort_invalid(context, violations_from(exc))
        principal, policy = await self._authenticate(context)
        request_id = request_id_for(principal, run_input.idempotency_key)
        request_id_var.set(request_id)
        span = trace.get_current_span()
        span.set_attribute("toolmesh.tenant", principal.tenant)
        span.set_attribute("toolmesh.request_id", request_id)
        run = _Run(
            context=context,
            deadline=deadline,
            principal=principal,
            policy=policy,
            allowed=policy.allowed_tools(principal.tenant),
            input=run_input,
            request_id=request_id,
            caller=caller_proto(principal),
        )
        if not run.allowed:
            self._log_decision(run, Decision(False, "tenant has no allowed tools"))
            await self._audit_refusal(
                context,
                self._run_event(
                    run,
                    PERMISSION_DENIED,
                    f"tenant:{principal.tenant}",
                    "denied",
                    reason="tenant has no allowed tools",
                ),
            )
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"tenant {principal.tenant} may use no tools (policy {policy.version})",
            )

        route = await self._recall_and_route(run)
        parts = route.parts if route is not None else router_pb2.ConfidenceParts()
        if route is None:
            run.answer, run.outcome = ROUTER_FALLBACK, gateway_pb2.OUTCOME_FALLBACK
            run.degrade("router")
        elif not route.matched:
            run.answer = (
                "No tool is confident enough to answer this "
                f"(best confidence {route.confidence:.2f}, threshold {route.threshold:.2f}). "
                f"Router: {route.reason or 'no reason given'}"
            )
            run.outcome = gateway_pb2.OUTCOME_NO_MATCH
        else:
            await self._authorize(run, route.tool)
            await self._reserve(run, route.tool)
            await self._invoke(run, route)

        usage = common_pb2.Usage(
            tokens_in=whitespace_tokens(run_input.prompt),
            tokens_out=whitespace_tokens(run.answer),
            tool_calls=run.tool_calls,
            cost_units=run.cost_units,
        )
        await self._remember(run, usage)
        price = self._accounting.prices.price(
            usage.tokens_in, usage.tokens_out, usage.tool_calls, usage.cost_units
        )
        tool_name = run.tool.name if run.tool else ""
        outcome_name = gateway_pb2.Outcome.Name(run.outcome)
        span.set_attribute("gen_ai.tool.name", tool_name)
        span.set_attribute("gen_ai.usage.input_tokens", usage.tokens_in)
        span.set_attribute("gen_ai.usage.output_tokens", usage.tokens_out)
        span.set_attribute("toolmesh.outcome", outcome_name)
        span.set_attribute("toolmesh.degraded", list(run.degraded))
        log.info(
            "run answered",
            extra={"outcome": outcome_name, "tool": tool_name, "degraded": run.degraded},
        )
        return gateway_pb2.RunResponse(
            request_id=request_id,
            trace_id=current_trace_id(),
            answer=run.answer,
            tool_name=tool_name,
            tool_version=run.tool.version if run.tool else "",
            confidence=route.confidence if route is not None else 0.0,
            confidence_parts=gateway_pb2.ConfidenceParts(
                intent=parts.intent, schema_fit=parts.schema_fit, health=parts.health
            ),
            usage=usage,
            degraded=run.degraded,
            outcome=run.outcome,
            result_json=run.result_json,
            cost_micros=price.cost_micros,
            currency=price.currency,
            price_version=price.version,
        )

    async def _recall_and_route(self, run: _Run) -> router_pb2.RouteResponse | None:
        """Recall history and route concurrently (one hop of latency instead of two).

        Because the hops run side by side the router routes on the prompt alone; the history
        read still tells the caller, through ``degraded``, whether memory is reachable. Both
        are tasks of this handler: if the caller cancels, both downstream calls are cancelled.
        """
        timeout = await self._timeout(run.context, run.deadline, "memory and router")
        history = asyncio.create_task(
            self._guard.call(
                "memory",
                self._clients.memory.GetHistory,
                memory_pb2.GetHistoryRequest(
                    caller=run.caller,
                    session_id=run.input.session_id,
                    limit=self._settings.history_turns,
                ),
                timeout,
            )
        )
        route = asyncio.create_task(
            self._guard.call(
                "router",
                self._clients.router.Route,
                router_pb2.RouteRequest(
                    caller=run.caller,
                    request_id=run.request_id,
                    prompt=run.input.prompt,
                    allowed_tools=sorted(run.allowed),
                ),
                timeout,
            )
        )
        try:
            results = await asyncio.gather(history, route, return_exceptions=True)
        finally:
            for task in (history, route):
                task.cancel()
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, DependencyError):
                raise result
        history_result, route_result = results
        if isinstance(history_result, DependencyError):
            log.warning("memory read failed", extra={"error": str(history_result)})
            run.degrade("memory")
        if isinstance(route_result, DependencyError):
            log.warning("routing failed", extra={"error": str(route_result)})
            return None
        assert isinstance(route_result, router_pb2.RouteResponse)
        return route_result

    def _log_decision(self, run: _Run, decision: Decision) -> None:
        """The authorization audit line: who, what, why, and under which policy version."""
        log.info(
            "authorization",
            extra={
                "decision": "allow" if decision.allowed else "deny",
                "reason": decision.reason,
                "missing_scope": decision.missing_scope,
                "tenant": run.principal.tenant,
                "subject": run.principal.subject,
                "token_id": run.principal.token_id,
                "policy_version": run.policy.version,
            },
        )

    async def _authorize(self, run: _Run, tool: router_pb2.ToolContract) -> None:
        decision = authorize_tool(run.principal, tool, run.allowed)
        self._log_decision(run, decision)
        if not decision.allowed:
            await self._audit_refusal(
                run.context,
                audit_event(
                    tenant=run.principal.tenant,
                    actor=run.principal.subject,
                    action=PERMISSION_DENIED,
                    target=tool.name,
                    outcome="denied",
                    request_id=run.request_id,
                    trace_id=current_trace_id(),
                    policy_version=run.policy.version,
                    details={
                        "reason": decision.reason,
                        "missing_scope": decision.missing_scope,
                        "tool": f"{tool.name}@{tool.version}",
                    },
                ),
            )
            await abort(run.context, grpc.StatusCode.PERMISSION_DENIED, decision.reason)

    async def _reserve(self, run: _Run, tool: router_pb2.ToolContract) -> None:
        """Reserve one tool call (and estimated tokens and cost) against the caller's budgets
        before the tool runs; the Run's usage record commits it (gateway.accounting).

        Callers known to have no budget skip the hop. Over budget: telemetry's
        RESOURCE_EXHAUSTED (message naming the budget and its reset, QuotaFailure, RetryInfo)
        reaches the caller unchanged and no tool runs. Ledger unreachable: UNAVAILABLE, unless
        ``budget_fail_open`` (then the tool runs unchecked and "budget" is degraded).
        """
        budgets = self._accounting.budgets
        if budgets.known(run.caller) is False:
            return
        tokens_in = whitespace_tokens(run.input.prompt)
        tokens_out = self._settings.budget_output_tokens_estimate
        table = self._accounting.prices.table
        estimate = cost_micros(table, tokens_in, tokens_out, 1, tool.cost_units) if table else 0
        try:
            timeout = run.deadline.timeout(self._settings.budget_call_timeout_ms / 1000)
        except DeadlineSpentError:
            # No time left for the tool either: _invoke answers its contract fallback.
            return
        try:
            reply = await self._guard.call(
                "telemetry",
                self._clients.telemetry.ReserveBudget,
                telemetry_pb2.ReserveBudgetRequest(
                    caller=run.caller,
                    request_id=run.request_id,
                    tool_calls=1,
                    tokens=tokens_in + tokens_out,
                    cost_micros=estimate,
                    ttl_seconds=self._settings.budget_reservation_ttl_s,
                ),
                timeout,
            )
        except DependencyError as err:
            if err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.rpc_error is not None:
                count_reservation("refused")
                budgets.learn(run.caller, True)
                log.info("budget refused", extra={"tool": tool.name, "reason": err.reason})
                await self._audit_refusal(
                    run.context,
                    self._run_event(run, BUDGET_DENIED, tool.name, "denied", reason=err.reason),
                )
                await forward(run.context, err.rpc_error)
            count_reservation("unavailable")
            if self._settings.budget_fail_open:
                log.warning("budget ledger unreachable; failing open", extra={"error": str(err)})
                run.degrade("budget")
                return
            log.warning("budget ledger unreachable; failing closed", extra={"error": str(err)})
            await abort(
                run.context,
                grpc.StatusCode.UNAVAILABLE,
                "the budget ledger is unavailable, so no tool may run; retry later",
                retry_info(err.retry_after_s or self._settings.shed_retry_after_ms / 1000),
            )
        budgets.learn(run.caller, not reply.unlimited)
        if reply.reserved:
            count_reservation("granted")
            run.reservation_id = reply.reservation_id
        else:
            count_reservation("unlimited")

    async def _invoke(self, run: _Run, route: router_pb2.RouteResponse) -> None:
        """Run the tool; failures become the contract's fallback, refusals an explanation.

        The call is under the tool's own breaker ("tool:<name>"), so one hanging tool cannot
        open the router's breaker for every other tool.
        """
        tool = route.tool
        run.tool = tool
        write = tool.side_effect != router_pb2.SIDE_EFFECT_READ_ONLY
        fallback = tool.fallback_answer or TOOL_FALLBACK.format(name=tool.name)
        try:
            timeout = run.deadline.timeout()
        except DeadlineSpentError:
            log.warning("no time left to run the tool", extra={"tool": tool.name})
            run.answer, run.outcome = fallback, gateway_pb2.OUTCOME_FALLBACK
            run.degrade(f"tool:{tool.name}")
            return
        if not self._tool_calls.try_enter(tool.name):
            await self._shed(run.context, f"tool {tool.name}")
        run.tool_calls = 1
        try:
            reply = await self._guard.call(
                f"tool:{tool.name}",
                self._clients.router.InvokeTool,
                router_pb2.InvokeToolRequest(
                    caller=run.caller,
                    request_id=run.request_id,
                    session_id=run.input.session_id,
                    tool_name=tool.name,
                    tool_version=tool.version,
                    arguments_json=route.arguments_json,
                    # The request id is stable across retries with the same idempotency key.
                    idempotency_key=run.request_id if write else "",
                    allowed_tools=sorted(run.allowed),
                ),
                timeout,
            )
        except DependencyError as err:
            run.outcome = gateway_pb2.OUTCOME_FALLBACK
            if write and err.tried:
                run.audit.append(self._run_event(run, TOOL_WRITE, tool.name, "failure"))
            if err.code == grpc.StatusCode.PERMISSION_DENIED:
                await self._audit_refusal(
                    run.context,
                    *run.audit,
                    self._run_event(run, PERMISSION_DENIED, tool.name, "denied", reason=err.reason),
                )
                await self._forward_error(run.context, err)
            if err.code in _TOOL_REFUSALS and err.tried:
                run.answer = f"The tool {tool.name} refused the arguments: {err.reason}"
                log.info("tool refused", extra={"tool": tool.name, "code": err.code.name})
                return
            if not err.tried:
                run.tool_calls = 0
            log.warning("tool failed; contract fallback", extra={"error": str(err)})
            run.answer = fallback
            run.degrade(f"tool:{tool.name}")
            return
        finally:
            self._tool_calls.leave(tool.name)
        run.answer = reply.answer
        run.result_json = reply.result_json
        run.cost_units = tool.cost_units
        run.outcome = gateway_pb2.OUTCOME_TOOL_ANSWERED
        if write:
            run.audit.append(self._run_event(run, TOOL_WRITE, tool.name, "success"))

    async def _remember(self, run: _Run, usage: common_pb2.Usage) -> None:
        """Store the user turn and the answer, the usage record and the audit events before
        answering; never acknowledge a lost turn or an unrecorded cost.

        AppendTurns is tried directly (at most ``memory_write_timeout_ms``, within the budget);
        the usage record (committing the Run's reservation) and audit events always go to the
        durable outbox, together with the turns when memory failed, its breaker is open, or no
        time is left: one outbox transaction per Run, replayed later (memory de-duplicates by
        request id, telemetry by request id and event id). If the outbox write fails, the Run
        fails UNAVAILABLE: the caller must not think it was stored.
        """
        tool = run.tool if run.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED else None
        request = memory_pb2.AppendTurnsRequest(
            caller=run.caller,
            session_id=run.input.session_id,
            request_id=run.request_id,
            turns=[
                common_pb2.Turn(
                    role=common_pb2.TURN_ROLE_USER,
                    content=run.input.prompt,
                    request_id=run.request_id,
                ),
                common_pb2.Turn(
                    role=common_pb2.TURN_ROLE_ASSISTANT,
                    content=run.answer,
                    request_id=run.request_id,
                    tool_name=tool.name if tool else "",
                    tool_version=tool.version if tool else "",
                ),
            ],
        )
        try:
            timeout: float | None = run.deadline.timeout(
                self._settings.memory_write_timeout_ms / 1000
            )
        except DeadlineSpentError:
            timeout = None
        entries: list[tuple[str, str, Message]] = [
            (
                KIND_USAGE,
                run.request_id,
                usage_record(
                    request_id=run.request_id,
                    caller=run.caller,
                    tool_name=run.tool.name if run.tool else "",
                    tool_version=run.tool.version if run.tool else "",
                    usage=usage,
                    outcome=_USAGE_OUTCOMES.get(run.outcome, "error"),
                    reservation_id=run.reservation_id,
                ),
            ),
            *((KIND_AUDIT, event.event_id, event) for event in run.audit),
        ]
        if timeout is None:
            # No time for a hop: the outbox (a local fsync) still fits in the reserve.
            log.info("no time left for memory; turn deferred to the outbox")
            entries.append((KIND_MEMORY, run.request_id, request))
        else:
            try:
                await self._guard.call("memory", self._clients.memory.AppendTurns, request, timeout)
            except DependencyError as err:
                run.degrade("memory")
                if err.code in _PERMANENT_WRITE_ERRORS and err.tried:
                    log.error("memory refused the turns", extra={"error": str(err)})
                else:
                    log.warning(
                        "memory write failed; turn goes to the outbox", extra={"error": str(err)}
                    )
                    entries.append((KIND_MEMORY, run.request_id, request))
        try:
            async with asyncio.timeout(max(run.deadline.remaining() - _ANSWER_MARGIN_S, 0.001)):
                await self._outbox.put_many(entries)
        except Exception as exc:
            log.error(
                "outbox write failed; turn or usage not stored, run not acknowledged",
                extra={"error": f"{type(exc).__name__}: {exc}"},
            )
            await abort(
                run.context,
                grpc.StatusCode.UNAVAILABLE,
                "the conversation turn could not be stored; retry with the same idempotency key",
                retry_info(self._settings.shed_retry_after_ms / 1000),
            )

    # -- the other RPCs -----------------------------------------------------------------------

    async def ListTools(
        self, request: gateway_pb2.ListToolsRequest, context: aio.ServicerContext
    ) -> gateway_pb2.ListToolsResponse:
        """The tools on the caller's allowlist; an empty allowlist never asks the router."""
        deadline = self._deadline(context)
        principal, policy = await self._authenticate(context, SCOPE_READ)
        allowed = policy.allowed_tools(principal.tenant)
        if not allowed:
            return gateway_pb2.ListToolsResponse()
        timeout = await self._timeout(context, deadline, "router")
        try:
            reply = await self._guard.call(
                "router",
                self._clients.router.ListTools,
                router_pb2.ListToolsRequest(allowed_tools=sorted(allowed)),
                timeout,
            )
        except DependencyError as err:
            await self._forward_error(context, err)
        return gateway_pb2.ListToolsResponse(
            tools=[
                gateway_pb2.Tool(
                    name=t.name,
                    version=t.version,
                    description=t.description,
                    side_effect=side_effect_name(t.side_effect),
                    cost_units=t.cost_units,
                    timeout_ms=t.timeout_ms,
                    input_schema_json=t.input_schema_json,
                    output_schema_json=t.output_schema_json,
                )
                for t in reply.tools
            ]
        )

    async def GetHistory(
        self, request: gateway_pb2.GetHistoryRequest, context: aio.ServicerContext
    ) -> gateway_pb2.GetHistoryResponse:
        """A session's turns, always within the caller's own tenant (memory scopes by caller)."""
        deadline = self._deadline(context)
        try:
            query = HistoryInput(session_id=request.session_id, limit=request.limit)
        except ValidationError as exc:
            await abort_invalid(context, violations_from(exc))
        principal, _ = await self._authenticate(context, SCOPE_READ)
        timeout = await self._timeout(context, deadline, "memory")
        try:
            reply = await self._guard.call(
                "memory",
                self._clients.memory.GetHistory,
                memory_pb2.GetHistoryRequest(
                    caller=caller_proto(principal), session_id=query.session_id, limit=query.limit
                ),
                timeout,
            )
        except DependencyError as err:
            await self._forward_error(context, err)
        if not reply.turns:
            # No turns for this tenant: the same answer whether the session does not exist or
            # belongs to another tenant, so a caller learns nothing about other tenants.
            await abort(context, grpc.StatusCode.NOT_FOUND, "no such session")
        return gateway_pb2.GetHistoryResponse(turns=reply.turns)

    async def IssueToken(
        self, request: gateway_pb2.IssueTokenRequest, context: aio.ServicerContext
    ) -> gateway_pb2.IssueTokenResponse:
        """Forwarded to auth as is; auth's status codes and details reach the caller unchanged."""
        deadline = self._deadline(context)
        timeout = await self._timeout(context, deadline, "auth")
        try:
            reply = await self._guard.call(
                "auth",
                self._clients.auth.IssueToken,
                auth_pb2.IssueTokenRequest(
                    client_id=request.client_id,
                    client_secret=request.client_secret,
                    scopes=request.scopes,
                ),
                timeout,
            )
        except DependencyError as err:
            await self._forward_error(context, err, prefix=False)
        return gateway_pb2.IssueTokenResponse(
            access_token=reply.access_token,
            token_type=reply.token_type,
            expires_in=reply.expires_in,
            scopes=reply.scopes,
            token_id=reply.token_id,
        )

    async def GetStats(
        self, request: gateway_pb2.GetStatsRequest, context: aio.ServicerContext
    ) -> gateway_pb2.GetStatsResponse:
        deadline = self._deadline(context)
        try:
            query = StatsInput(window_seconds=request.window_seconds, service=request.service)
        except ValidationError as exc:
            await abort_invalid(context, violations_from(exc))
        await self._authenticate(context, SCOPE_OPS_READ)
        timeout = await self._timeout(context, deadline, "telemetry")
        try:
            reply = await self._guard.call(
                "telemetry",
                self._clients.telemetry.GetStats,
                telemetry_pb2.GetStatsRequest(
                    group_by=request.group_by,
                    window_seconds=query.window_seconds,
                    service=query.service,
                ),
                timeout,
            )
        except DependencyError as err:
            await self._forward_error(context, err)
        return gateway_pb2.GetStatsResponse(rows=reply.rows)

    async def GetServiceInfo(
        self, request: gateway_pb2.GetServiceInfoRequest, context: aio.ServicerContext
    ) -> gateway_pb2.GetServiceInfoResponse:
        """Any valid token may ask; only IssueToken is open to unauthenticated callers."""
        await self._authenticate(context)
        return gateway_pb2.GetServiceInfoResponse(info=service_info("gateway", CONTRACT_VERSIONS))

    # -- operator views, in gateway.operations --------------------------------------------------

    @property
    def _operations(self) -> Operations:
        return Operations(
            telemetry=self._clients.telemetry,
            authenticate=self._authenticate,
            deadline=self._deadline,
            timeout=self._timeout,
            call=self._guard.call,
            forward_error=self._forward_error,
        )

    async def GetTrace(
        self, request: gateway_pb2.GetTraceRequest, context: aio.ServicerContext
    ) -> gateway_pb2.GetTraceResponse:
        return await self._operations.GetTrace(request, context)

    async def GetCost(
        self, request: gateway_pb2.GetCostRequest, context: aio.ServicerContext
    ) -> gateway_pb2.GetCostResponse:
        return await self._operations.GetCost(request, context)

    async def SetBudget(
        self, request: gateway_pb2.SetBudgetRequest, context: aio.ServicerContext
    ) -> gateway_pb2.SetBudgetResponse:
        return await self._operations.SetBudget(request, context)

    async def ListBudgets(
        self, request: gateway_pb2.ListBudgetsRequest, context: aio.ServicerContext
    ) -> gateway_pb2.ListBudgetsResponse:
        return await self._operations.ListBudgets(request, context)

    async def ListAudit(
        self, request: gateway_pb2.ListAuditRequest, context: aio.ServicerContext
    ) -> gateway_pb2.ListAuditResponse:
        return await self._operations.ListAudit(request, context)

    async def VerifyAudit(
        self, request: gateway_pb2.VerifyAuditRequest, context: aio.ServicerContext
    ) -> gateway_pb2.VerifyAuditResponse:
        return await self._operations.VerifyAudit(request, context)

    async def GetSlo(
        self, request: gateway_pb2.GetSloRequest, context: aio.ServicerContext
    ) -> gateway_pb2.GetSloResponse:
        return await self._operations.GetSlo(request, context)
