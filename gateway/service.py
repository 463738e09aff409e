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
from grpc import aio
from opentelemetry import trace
from pydantic import ValidationError

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
from gateway.outbox import KIND_MEMORY, GatewayOutbox
from gateway.reliability import FALLBACKS, Bulkhead, DependencyError, Guard
from gateway.settings import GatewaySettings
from gateway.validation import HistoryInput, RunInput, StatsInput
from services.kit.buildinfo import service_info
from services.kit.context import request_id_var
from services.kit.deadlines import Deadline, DeadlineSpentError
from services.kit.errors import abort, abort_invalid, forward, retry_info, violations_from
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


def bearer_token(context: aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


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
    ) -> None:
        self._settings = settings
        self._auth = auth_state
        self._clients = clients
        self._guard = guard
        self._outbox = outbox
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
        token = bearer_token(context)
        if not token:
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
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, f"missing scope {scope}")
        return principal, policy

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
            await self._invoke(run, route)

        await self._remember(run)
        tool_name = run.tool.name if run.tool else ""
        outcome_name = gateway_pb2.Outcome.Name(run.outcome)
        span.set_attribute("gen_ai.tool.name", tool_name)
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
            usage=common_pb2.Usage(
                tokens_in=whitespace_tokens(run_input.prompt),
                tokens_out=whitespace_tokens(run.answer),
                tool_calls=run.tool_calls,
                cost_units=run.cost_units,
            ),
            degraded=run.degraded,
            outcome=run.outcome,
            result_json=run.result_json,
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
            await abort(run.context, grpc.StatusCode.PERMISSION_DENIED, decision.reason)

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
            if err.code == grpc.StatusCode.PERMISSION_DENIED:
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

    async def _remember(self, run: _Run) -> None:
        """Store the user turn and the answer before answering; never acknowledge a lost turn.

        AppendTurns is tried directly (at most ``memory_write_timeout_ms``, within the budget);
        when memory fails, its breaker is open, or no time is left, the request is committed to
        the durable outbox and replayed later (memory de-duplicates by request id). If even the
        outbox write fails, the Run fails UNAVAILABLE: the caller must not think it was stored.
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
        if timeout is None:
            # No time for a hop: the outbox (a local fsync) still fits in the reserve.
            log.info("no time left for memory; turn deferred to the outbox")
        else:
            try:
                await self._guard.call("memory", self._clients.memory.AppendTurns, request, timeout)
                return
            except DependencyError as err:
                if err.code in _PERMANENT_WRITE_ERRORS and err.tried:
                    log.error("memory refused the turns", extra={"error": str(err)})
                    run.degrade("memory")
                    return
                log.warning(
                    "memory write failed; turn goes to the outbox", extra={"error": str(err)}
                )
                run.degrade("memory")
        try:
            async with asyncio.timeout(max(run.deadline.remaining() - _ANSWER_MARGIN_S, 0.001)):
                await self._outbox.put(KIND_MEMORY, run.request_id, request)
        except Exception as exc:
            log.error(
                "outbox write failed; turn not stored, run not acknowledged",
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
