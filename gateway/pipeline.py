"""The governed pipeline: every tool call a caller asks for goes through these steps, in order.

    admit         the gateway's bulkhead, then the caller's tenant's: a brief wait for a slot,
                  then RESOURCE_EXHAUSTED with RetryInfo, so one tenant cannot starve others
    authenticate  the bearer JWT, verified locally (gateway.access); refusals audited
    claim         a request with an idempotency key claims its request id in memory: the same
                  key and content gets the original answer back (not run, not charged again);
                  other content, or another session, is FAILED_PRECONDITION
    select        Run: the router picks the tool and its arguments by its rules
      || reserve  the budget reservation runs alongside: every request is checked against
                  the caller's budgets, whether or not a tool ends up running
    consult       Run, when the rules found no tool and the router has a model: the session's
                  recent turns from memory || the reservation raised to the model's token
                  bound, then the router asks the model (its pick is scored and refused like
                  a rule's); a rules-routed Run never pays for this step
    authorize     the tool against the tenant's allowlist and the scope its side effect needs
                  (a model's pick exactly like a rule's)
    invoke        the tool in the router, under its breaker and bulkhead, within the deadline
    phrase        for a tenant whose answers the model phrases: the answer, streamed from the
                  tool's result (its tokens reserved before the tool ran); result_json stays
    remember      the turns and the answer to memory (completing the claim), else the outbox
    account       the usage record (the model's real token counts, priced per model) and audit
                  events, committed to the outbox with the turns
    answer        RunStream has told the caller each step as it happened (routed, tool
                  started and finished, answer text); Run and RunStream share every step

The request's deadline is a budget that shrinks across these hops (services.kit.deadlines);
each hop also has its own cap, so a hung dependency costs a bounded share of it. Failures
degrade as DESIGN.md's failure table says and are named in the answer's ``degraded``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import NoReturn

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio
from opentelemetry import trace
from pydantic import ValidationError

from gateway.access import ANSWER_MARGIN_S, Access, caller_proto
from gateway.accounting import Accounting, Price, count_reservation, usage_record
from gateway.authn import Policy, Principal
from gateway.authz import Decision, authorize_tool
from gateway.clients import Clients
from gateway.outbox import KIND_AUDIT, KIND_MEMORY, KIND_USAGE
from gateway.reliability import FALLBACKS, Bulkhead, DependencyError, Guard, Shed
from gateway.settings import GatewaySettings
from gateway.validation import CallToolInput, RunInput
from services.kit.audit import DENIED, FAILURE, SUCCESS, audit_event, derived_event_id
from services.kit.context import request_id_var
from services.kit.deadlines import Deadline, DeadlineSpentError
from services.kit.errors import abort, abort_invalid, forward, retry_info, violations_from
from services.kit.outbox import MessageOutbox
from services.kit.tracecontext import link_caller_context
from services.kit.tracing import current_trace_id
from toolmesh.common.v1 import audit_pb2, common_pb2
from toolmesh.gateway.v1 import gateway_pb2
from toolmesh.memory.v1 import memory_pb2
from toolmesh.router.v1 import router_pb2
from toolmesh.telemetry.v1 import telemetry_pb2

log = logging.getLogger("toolmesh.gateway")

RUN = "/toolmesh.gateway.v1.Gateway/Run"
RUN_STREAM = "/toolmesh.gateway.v1.Gateway/RunStream"
CALL_TOOL = "/toolmesh.gateway.v1.Gateway/CallTool"
# Contracts a request's audit events name.
CONTRACTS = ("toolmesh.gateway.v1", "toolmesh.router.v1")
# Request ids derived from idempotency keys live in their own UUID namespace.
_IDEMPOTENCY_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:toolmesh:gateway:idempotency")
# The breaker of the router's model calls: a slow model must not open the router's own breaker.
MODEL = "router:model"
ROUTER_FALLBACK = (
    "The tool router is unavailable right now, so no tool could run. Please try again."
)
TOOL_FALLBACK = "The tool {name} could not answer right now. Please try again."
# Tool errors that mean "the tool said no" (an explanation), not "the tool failed" (fallback).
_TOOL_REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}
# Memory refusing the turns themselves: replaying them would fail forever, so they are not queued.
_PERMANENT_WRITE_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED}
# The usage record's outcome for each outcome.
_USAGE_OUTCOMES = {
    gateway_pb2.OUTCOME_TOOL_ANSWERED: "ok",
    gateway_pb2.OUTCOME_FALLBACK: "fallback",
    gateway_pb2.OUTCOME_NO_MATCH: "no_match",
    gateway_pb2.OUTCOME_TOOL_ERROR: "tool_error",
}


def request_id_for(principal: Principal, idempotency_key: str) -> str:
    """A fresh id, or one derived from the key so a retried call gets the same id."""
    if not idempotency_key:
        return uuid.uuid4().hex
    name = "\x1f".join((principal.tenant, principal.subject, idempotency_key))
    return uuid.uuid5(_IDEMPOTENCY_NAMESPACE, name).hex


def content_fingerprint(kind: str, session_id: str, *content: str) -> str:
    """What an idempotency key is bound to: the kind of request and everything it asks."""
    canonical = json.dumps([kind, session_id, *content], ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class Flight:
    """One request in flight: who asked, its budget, and what it has learned so far."""

    context: aio.ServicerContext
    deadline: Deadline
    principal: Principal
    policy: Policy
    allowed: frozenset[str]
    # The RPC served (its full name: usage records and audit events name it).
    rpc: str
    session_id: str
    request_id: str
    caller: common_pb2.Caller
    # Run: the prompt. CallTool: the arguments the caller chose.
    prompt: str = ""
    arguments_json: str = ""
    # Set for a request with an idempotency key: what the key is bound to.
    fingerprint: str = ""
    # The request id's claim is ours; and whether the tool was asked to run (from then on the
    # claim is never given back: the tool may have acted).
    claimed: bool = False
    invoked: bool = False
    # When the request arrived (the deadline's clock), and how its tool invocation went.
    started: float = 0.0
    tool_outcome: telemetry_pb2.ToolOutcome = telemetry_pb2.TOOL_OUTCOME_UNSPECIFIED
    tool_duration_ms: float = 0.0
    acknowledged_at: Timestamp = field(default_factory=Timestamp)
    answer: str = ""
    outcome: gateway_pb2.Outcome = gateway_pb2.OUTCOME_UNSPECIFIED
    degraded: list[str] = field(default_factory=list)
    tool: router_pb2.ToolContract | None = None
    result_json: str = ""
    tool_calls: int = 0
    cost_units: int = 0
    # The budget reservation this request's usage record commits ("" when none was needed).
    reservation_id: str = ""
    # Audit events committed with the request's usage record (tool.write).
    audit: list[telemetry_pb2.AuditEvent] = field(default_factory=list)
    # Model tokens used so far, as the provider counted them, the model, and the prompt
    # template versions used (a refused request is still charged for them).
    tokens_in: int = 0
    tokens_out: int = 0
    model: str = ""
    prompts: list[router_pb2.PromptRef] = field(default_factory=list)
    # The routing rules version that routed a Run ("" when the router was not reached).
    rules_version: str = ""
    # RunStream's sink for progress events; None for Run and CallTool.
    emit: Callable[[gateway_pb2.RunStreamResponse], None] | None = None
    # True once answer text was streamed (the answer is then not sent again as one chunk).
    streamed_answer: bool = False
    # True once the reservation was raised to the model calls' bounds (once per request).
    raised: bool = False

    def tell(self, event: gateway_pb2.RunStreamResponse) -> None:
        if self.emit is not None:
            self.emit(event)

    def used(self, usage: router_pb2.ModelUsage) -> None:
        """Add a model call's tokens; its prompt version joins the ones named."""
        self.tokens_in += usage.input_tokens
        self.tokens_out += usage.output_tokens
        self.model = self.model or usage.model
        if usage.HasField("prompt") and usage.prompt not in self.prompts:
            self.prompts.append(usage.prompt)

    def degrade(self, what: str) -> None:
        """Name what was degraded in the answer, and count the fallback by dependency."""
        if what not in self.degraded:
            self.degraded.append(what)
            dependency, _, tool = what.partition(":")
            FALLBACKS.add(1, {"dependency": dependency, "tool": tool})

    def event(
        self,
        action: int,
        target: str,
        outcome: str,
        **details: object,
    ) -> telemetry_pb2.AuditEvent:
        """An audit event of this request. Its tool.write is recorded once however often the
        request is retried with the same idempotency key (the id derives from the request id)."""
        if self.tool is not None:
            details.setdefault("tool", f"{self.tool.name}@{self.tool.version}")
        once = action == audit_pb2.AUDIT_ACTION_TOOL_WRITE
        return audit_event(
            action=action,
            tenant=self.principal.tenant,
            actor=self.principal.subject,
            target=target,
            outcome=outcome,
            request_id=self.request_id,
            trace_id=current_trace_id(),
            policy_version=self.policy.version,
            contract_versions=CONTRACTS,
            details=details,
            event_id=derived_event_id(self.request_id, "tool.write") if once else "",
        )


class Pipeline:
    def __init__(
        self,
        *,
        settings: GatewaySettings,
        access: Access,
        clients: Clients,
        guard: Guard,
        outbox: MessageOutbox,
        accounting: Accounting,
    ) -> None:
        self._settings = settings
        self._access = access
        self._clients = clients
        self._guard = guard
        self._outbox = outbox
        self._accounting = accounting
        self._gateway = Bulkhead("runs", settings.max_inflight_runs)
        self._tenants = Bulkhead("tenant", settings.max_inflight_per_tenant)
        self._tools = Bulkhead("tool_calls", settings.max_inflight_per_tool)

    def deadline(self, context: aio.ServicerContext) -> Deadline:
        return Deadline.for_request(
            context.time_remaining(),
            default_s=self._settings.default_deadline_s,
            max_s=self._settings.max_deadline_s,
            reserve_ms=self._settings.deadline_reserve_ms,
        )

    # -- admit ------------------------------------------------------------------------------

    @asynccontextmanager
    async def _admitted(
        self, bulkhead: Bulkhead, key: str, deadline: Deadline, context: aio.ServicerContext
    ) -> AsyncIterator[None]:
        """A slot of ``bulkhead`` for ``key``, waiting at most ``admission_wait_ms`` (and never
        past the deadline); full for that long: RESOURCE_EXHAUSTED with RetryInfo."""
        wait_s = min(self._settings.admission_wait_ms / 1000, max(deadline.remaining() / 2, 0))
        try:
            async with bulkhead.slot(key, wait_s):
                yield
        except Shed:
            what = {"runs": "gateway", "tenant": f"tenant {key}"}.get(bulkhead.name, key)
            await abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{what} at capacity; retry later",
                retry_info(self._settings.shed_retry_after_ms / 1000),
            )

    # -- Run and CallTool: admit, validate, authenticate -------------------------------------

    async def run(
        self,
        request: gateway_pb2.RunRequest,
        context: aio.ServicerContext,
        emit: Callable[[gateway_pb2.RunStreamResponse], None] | None = None,
    ) -> gateway_pb2.RunResponse:
        """Answer a prompt with the tool the router picks; ``emit`` receives RunStream's
        progress events as the steps happen."""
        deadline = self.deadline(context)
        started = deadline.clock()
        async with self._admitted(self._gateway, "", deadline, context):
            try:
                run_input = RunInput(
                    session_id=request.session_id,
                    prompt=request.prompt,
                    idempotency_key=request.idempotency_key,
                )
            except ValidationError as exc:
                await abort_invalid(context, violations_from(exc))
            principal, policy = await self._access.authenticate(context)
            async with self._admitted(self._tenants, principal.tenant, deadline, context):
                flight = self._flight(
                    context,
                    deadline,
                    principal,
                    policy,
                    rpc=RUN if emit is None else RUN_STREAM,
                    session_id=run_input.session_id,
                    idempotency_key=run_input.idempotency_key,
                    content=(run_input.prompt,),
                    started=started,
                )
                flight.prompt = run_input.prompt
                flight.emit = emit
                async with self._accounted_if_refused(flight):
                    return await self._fly_run(flight, run_input.idempotency_key)

    async def run_stream(
        self, request: gateway_pb2.RunStreamRequest, context: aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.RunStreamResponse]:
        """Run, telling each step as it happens; the last event is the whole response.

        The request flies in its own task, so events reach the caller while it runs; the
        caller going away cancels the task, and with it whatever hop is in flight (the model's
        generation stops with the router's stream)."""
        events: asyncio.Queue[gateway_pb2.RunStreamResponse | None] = asyncio.Queue()

        async def fly() -> gateway_pb2.RunResponse:
            try:
                return await self.run(
                    gateway_pb2.RunRequest(
                        session_id=request.session_id,
                        prompt=request.prompt,
                        idempotency_key=request.idempotency_key,
                    ),
                    context,
                    emit=events.put_nowait,
                )
            finally:
                events.put_nowait(None)

        task = asyncio.create_task(fly(), name="run-stream")
        try:
            while (event := await events.get()) is not None:
                yield event
            response = await task
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        yield gateway_pb2.RunStreamResponse(final=response)

    async def call_tool(
        self, request: gateway_pb2.CallToolRequest, context: aio.ServicerContext
    ) -> gateway_pb2.CallToolResponse:
        """Run the tool the caller chose, with its arguments."""
        deadline = self.deadline(context)
        started = deadline.clock()
        async with self._admitted(self._gateway, "", deadline, context):
            try:
                call = CallToolInput(
                    tool=request.tool,
                    version=request.version,
                    arguments_json=request.arguments_json,
                    session_id=request.session_id,
                    idempotency_key=request.idempotency_key,
                )
            except ValidationError as exc:
                await abort_invalid(context, violations_from(exc))
            principal, policy = await self._access.authenticate(context)
            async with self._admitted(self._tenants, principal.tenant, deadline, context):
                flight = self._flight(
                    context,
                    deadline,
                    principal,
                    policy,
                    rpc=CALL_TOOL,
                    session_id=call.session_id,
                    idempotency_key=call.idempotency_key,
                    content=(call.tool, call.version, call.canonical_arguments()),
                    started=started,
                )
                flight.arguments_json = call.arguments_json
                async with self._accounted_if_refused(flight):
                    return await self._fly_call(flight, call)

    def _flight(
        self,
        context: aio.ServicerContext,
        deadline: Deadline,
        principal: Principal,
        policy: Policy,
        *,
        rpc: str,
        session_id: str,
        idempotency_key: str,
        content: tuple[str, ...],
        started: float,
    ) -> Flight:
        request_id = request_id_for(principal, idempotency_key)
        request_id_var.set(request_id)
        span = trace.get_current_span()
        link_caller_context(span)
        span.set_attribute("toolmesh.tenant", principal.tenant)
        span.set_attribute("toolmesh.request_id", request_id)
        return Flight(
            context=context,
            deadline=deadline,
            principal=principal,
            policy=policy,
            allowed=policy.allowed_tools(principal.tenant),
            rpc=rpc,
            session_id=session_id,
            request_id=request_id,
            caller=caller_proto(principal),
            # Run and RunStream are one request kind: a retry by either gets the first's answer.
            fingerprint=(
                content_fingerprint(RUN if rpc == RUN_STREAM else rpc, session_id, *content)
                if idempotency_key
                else ""
            ),
            started=started,
        )

    # -- the two flows, step by step ------------------------------------------------------------

    async def _fly_run(self, flight: Flight, idempotency_key: str) -> gateway_pb2.RunResponse:
        if not flight.allowed:
            await self._refuse_empty_allowlist(flight)
        if idempotency_key:
            stored = await self._claim(flight)
            if stored is not None:
                replay = gateway_pb2.RunResponse.FromString(stored)
                replay.replayed = True
                return replay
        async with self._released_if_refused(flight):
            return await self._run_claimed(flight)

    async def _run_claimed(self, flight: Flight) -> gateway_pb2.RunResponse:
        route = await self._select_and_reserve(flight)
        if route is not None and route.HasField("model_plan"):
            route = await self._consult(flight, route)
        if route is not None:
            flight.rules_version = route.rules_version
        self._tell_routed(flight, route)
        if route is None:
            flight.answer, flight.outcome = ROUTER_FALLBACK, gateway_pb2.OUTCOME_FALLBACK
            flight.degrade("router")
        elif not route.matched:
            flight.answer = (
                "No tool is confident enough to answer this "
                f"(best confidence {route.confidence:.2f}, threshold {route.threshold:.2f}). "
                f"Router: {route.reason or 'no reason given'}"
            )
            flight.outcome = gateway_pb2.OUTCOME_NO_MATCH
        else:
            await self._run_pick(flight, route)
        if not flight.streamed_answer:
            flight.tell(
                gateway_pb2.RunStreamResponse(
                    answer_chunk=gateway_pb2.AnswerChunk(text=flight.answer)
                )
            )
        parts = route.parts if route is not None else router_pb2.ConfidenceParts()
        usage = self._usage_so_far(flight)
        price = self._price(usage)
        tool = flight.tool
        response = gateway_pb2.RunResponse(
            request_id=flight.request_id,
            trace_id=current_trace_id(),
            answer=flight.answer,
            tool_name=tool.name if tool else "",
            tool_version=tool.version if tool else "",
            confidence=route.confidence if route is not None else 0.0,
            confidence_parts=gateway_pb2.ConfidenceParts(
                intent=parts.intent, schema_fit=parts.schema_fit, health=parts.health
            ),
            usage=usage,
            outcome=flight.outcome,
            result_json=flight.result_json,
            cost_micros=price.cost_micros,
            currency=price.currency,
            price_version=price.version,
            route_method=route.method if route is not None else router_pb2.ROUTE_METHOD_UNSPECIFIED,
            prompts=flight.prompts,
            rules_version=flight.rules_version,
        )
        await self._remember(flight, usage, response)
        response.degraded.extend(flight.degraded)
        self._record_answer(flight, usage)
        return response

    def _usage_so_far(self, flight: Flight) -> common_pb2.Usage:
        """The model's tokens as the provider counted them (none for a rules-only Run)."""
        return common_pb2.Usage(
            tokens_in=flight.tokens_in,
            tokens_out=flight.tokens_out,
            tool_calls=flight.tool_calls,
            cost_units=flight.cost_units,
            model=flight.model,
        )

    async def _run_pick(self, flight: Flight, route: router_pb2.RouteResponse) -> None:
        """Authorize the router's pick (a rule's or the model's alike), reserve a phrased
        answer's tokens, invoke the tool, and let the model phrase its answer."""
        tool = route.tool
        await self._authorize(flight, tool)
        phrased = route.HasField("answer_plan")
        if phrased and not flight.raised:
            # Rules-routed, answer phrased: its tokens are reserved before the tool runs.
            await self._top_up(flight, [route.answer_plan])
        started = gateway_pb2.ToolStarted(tool_name=tool.name, tool_version=tool.version)
        flight.tell(gateway_pb2.RunStreamResponse(tool_started=started))
        await self._invoke(flight, tool, route.arguments_json)
        finished = gateway_pb2.ToolFinished(
            tool_name=tool.name, outcome=flight.outcome, duration_ms=flight.tool_duration_ms
        )
        flight.tell(gateway_pb2.RunStreamResponse(tool_finished=finished))
        if phrased and flight.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED:
            await self._phrase(flight, route)

    def _tell_routed(self, flight: Flight, route: router_pb2.RouteResponse | None) -> None:
        matched = route is not None and route.matched
        flight.tell(
            gateway_pb2.RunStreamResponse(
                routed=gateway_pb2.Routed(
                    tool_name=route.tool.name if route is not None and matched else "",
                    tool_version=route.tool.version if route is not None and matched else "",
                    confidence=route.confidence if route is not None else 0.0,
                    route_method=(
                        route.method if route is not None else router_pb2.ROUTE_METHOD_UNSPECIFIED
                    ),
                    reason=route.reason if route is not None else "router unavailable",
                )
            )
        )

    async def _fly_call(self, flight: Flight, call: CallToolInput) -> gateway_pb2.CallToolResponse:
        if not flight.allowed:
            await self._refuse_empty_allowlist(flight)
        tool = await self._resolve(flight, call.tool, call.version)
        await self._authorize(flight, tool)
        if tool.side_effect != router_pb2.SIDE_EFFECT_READ_ONLY and not call.idempotency_key:
            await abort_invalid(
                flight.context,
                [("idempotency_key", f"required for the write-capable tool {tool.name}")],
            )
        if call.idempotency_key:
            stored = await self._claim(flight)
            if stored is not None:
                replay = gateway_pb2.CallToolResponse.FromString(stored)
                replay.replayed = True
                return replay
        async with self._released_if_refused(flight):
            return await self._call_claimed(flight, tool, call)

    async def _call_claimed(
        self, flight: Flight, tool: router_pb2.ToolContract, call: CallToolInput
    ) -> gateway_pb2.CallToolResponse:
        await self._reserve(flight, tool.cost_units)
        await self._invoke(flight, tool, call.arguments_json)
        # No model read or wrote anything: a direct call uses no tokens.
        usage = common_pb2.Usage(tool_calls=flight.tool_calls, cost_units=flight.cost_units)
        price = self._price(usage)
        response = gateway_pb2.CallToolResponse(
            request_id=flight.request_id,
            trace_id=current_trace_id(),
            tool_name=tool.name,
            tool_version=tool.version,
            answer=flight.answer,
            result_json=flight.result_json,
            outcome=flight.outcome,
            usage=usage,
            cost_micros=price.cost_micros,
            currency=price.currency,
            price_version=price.version,
        )
        await self._remember(flight, usage, response)
        response.degraded.extend(flight.degraded)
        self._record_answer(flight, usage)
        return response

    async def _refuse_empty_allowlist(self, flight: Flight) -> NoReturn:
        reason = "tenant has no allowed tools"
        self._log_decision(flight, Decision(False, reason))
        await self._access.audit_refusal(
            flight.context,
            flight.event(
                audit_pb2.AUDIT_ACTION_PERMISSION_DENIED,
                f"tenant:{flight.principal.tenant}",
                DENIED,
                reason=reason,
            ),
        )
        await abort(
            flight.context,
            grpc.StatusCode.PERMISSION_DENIED,
            f"tenant {flight.principal.tenant} may use no tools (policy {flight.policy.version})",
        )

    # -- claim --------------------------------------------------------------------------------

    async def _claim(self, flight: Flight) -> bytes | None:
        """Claim the request id for this content; returns the stored answer of a completed
        request with the same content, or aborts. Memory unreachable: UNAVAILABLE, because
        without the claim the key's promise (never run twice) cannot be kept."""
        context = flight.context
        lease_s = flight.deadline.remaining() + self._settings.idempotency_lease_grace_s
        try:
            reply = await self._guard.call(
                "memory",
                self._clients.memory.ClaimRequest,
                memory_pb2.ClaimRequestRequest(
                    caller=flight.caller,
                    request_id=flight.request_id,
                    session_id=flight.session_id,
                    fingerprint=flight.fingerprint,
                    lease_ms=max(1, min(int(lease_s * 1000), 600_000)),
                ),
                flight.deadline.timeout(self._settings.memory_write_timeout_ms / 1000),
            )
        except DeadlineSpentError:
            await abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exhausted")
        except DependencyError as err:
            log.warning("idempotency claim failed", extra={"error": str(err)})
            await abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "the idempotency key cannot be checked right now; retry with the same key",
                retry_info(err.retry_after_s or self._settings.shed_retry_after_ms / 1000),
            )
        if reply.state == memory_pb2.CLAIM_STATE_CLAIMED:
            flight.claimed = True
            return None
        if reply.state == memory_pb2.CLAIM_STATE_COMPLETED and reply.response:
            log.info("idempotent replay", extra={"request_id": flight.request_id})
            return bytes(reply.response)
        if reply.state == memory_pb2.CLAIM_STATE_IN_PROGRESS:
            left = reply.lease_expires_at.ToNanoseconds() / 1e9 - time.time()
            await abort(
                context,
                grpc.StatusCode.ABORTED,
                "a request with this idempotency key is still in progress; retry later",
                retry_info(max(0.1, min(left, 5.0))),
            )
        if reply.state == memory_pb2.CLAIM_STATE_COMPLETED:
            message = "the idempotency key was already used; its answer is no longer kept"
        elif reply.conflict == "session":
            message = "the idempotency key was already used in another session"
        else:
            message = "the idempotency key was already used for a different request"
        await abort(context, grpc.StatusCode.FAILED_PRECONDITION, message)

    @asynccontextmanager
    async def _released_if_refused(self, flight: Flight) -> AsyncIterator[None]:
        """A request refused after claiming its id but before its tool was asked to run (a
        budget, scope or allowlist refusal) gives the claim back, so that a retry with the
        same key is not told "in progress" until the lease runs out. Best effort: a claim not
        given back simply expires."""
        try:
            yield
        except aio.AbortError:
            if flight.claimed and not flight.invoked:
                with contextlib.suppress(DependencyError, DeadlineSpentError):
                    await self._guard.call(
                        "memory",
                        self._clients.memory.ReleaseRequest,
                        memory_pb2.ReleaseRequestRequest(
                            caller=flight.caller,
                            request_id=flight.request_id,
                            fingerprint=flight.fingerprint,
                        ),
                        flight.deadline.timeout(self._settings.memory_write_timeout_ms / 1000),
                    )
            raise

    # -- resolve (CallTool) ---------------------------------------------------------------------

    async def _resolve(self, flight: Flight, name: str, version: str) -> router_pb2.ToolContract:
        """The contract the call will run; NOT_FOUND (and the router's other refusals) reach
        the caller unchanged, the router being down is UNAVAILABLE."""
        try:
            reply = await self._guard.call(
                "router",
                self._clients.router.ResolveTool,
                router_pb2.ResolveToolRequest(
                    caller=flight.caller,
                    tool_name=name,
                    tool_version=version,
                    allowed_tools=sorted(flight.allowed),
                    # Under a canary the version is assigned per (tenant, session), or per
                    # request (stable across retries with the same idempotency key).
                    session_id=flight.session_id,
                    request_id=flight.request_id,
                ),
                flight.deadline.timeout(self._settings.route_timeout_ms / 1000),
            )
        except DeadlineSpentError:
            await abort(flight.context, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exhausted")
        except DependencyError as err:
            await self._access.forward_error(flight.context, err)
        tool: router_pb2.ToolContract = reply.tool
        flight.tool = tool
        return tool

    # -- select || reserve ----------------------------------------------------------------------

    async def _select_and_reserve(self, flight: Flight) -> router_pb2.RouteResponse | None:
        """Route and reserve concurrently (one hop of latency instead of two). A budget refusal
        wins over whatever the router said; the router failing means the fallback answer."""
        try:
            timeout = flight.deadline.timeout(self._settings.route_timeout_ms / 1000)
        except DeadlineSpentError:
            await abort(flight.context, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exhausted")
        route = asyncio.create_task(
            self._guard.call(
                "router",
                self._clients.router.Route,
                router_pb2.RouteRequest(
                    caller=flight.caller,
                    request_id=flight.request_id,
                    prompt=flight.prompt,
                    allowed_tools=sorted(flight.allowed),
                    session_id=flight.session_id,
                ),
                timeout,
            )
        )
        try:
            await self._reserve(flight)
            routed: router_pb2.RouteResponse = await route
        except DependencyError as err:
            log.warning("routing failed", extra={"error": str(err)})
            return None
        finally:
            route.cancel()
        return routed

    # -- consult (the model, when the rules found no tool) ------------------------------------

    async def _consult(
        self, flight: Flight, rules: router_pb2.RouteResponse
    ) -> router_pb2.RouteResponse:
        """Let the model choose: read the session's recent turns while the reservation is
        raised to the model's bound (a refusal stops here, before any model call), then Route
        again with the history and ``allow_model``. The router scores the model's pick like a
        rule's; the router failing leaves the rules' answer (no tool), "model" degraded."""
        plans = [rules.model_plan]
        if rules.HasField("answer_plan"):
            plans.append(rules.answer_plan)
        history = asyncio.create_task(self._history(flight))
        try:
            await self._top_up(flight, plans)
            turns = await history
        finally:
            history.cancel()
        try:
            timeout = flight.deadline.timeout(self._settings.model_route_timeout_ms / 1000)
            routed: router_pb2.RouteResponse = await self._guard.call(
                MODEL,
                self._clients.router.Route,
                router_pb2.RouteRequest(
                    caller=flight.caller,
                    request_id=flight.request_id,
                    prompt=flight.prompt,
                    history=turns,
                    allowed_tools=sorted(flight.allowed),
                    allow_model=True,
                    session_id=flight.session_id,
                ),
                timeout,
            )
        except (DependencyError, DeadlineSpentError) as err:
            log.warning("routing with the model failed", extra={"error": str(err)})
            flight.degrade("model")
            return rules
        if routed.HasField("model_usage"):
            flight.used(routed.model_usage)
        for what in routed.degraded:
            flight.degrade(what)
        return routed

    async def _history(self, flight: Flight) -> list[common_pb2.Turn]:
        """The session's most recent turns, oldest first; memory failing means none
        ("memory" degraded), never a failed request."""
        if not flight.session_id or not self._settings.model_history_turns:
            return []
        try:
            reply = await self._guard.call(
                "memory",
                self._clients.memory.GetHistory,
                memory_pb2.GetHistoryRequest(
                    caller=flight.caller,
                    session_id=flight.session_id,
                    limit=self._settings.model_history_turns,
                ),
                flight.deadline.timeout(self._settings.memory_read_timeout_ms / 1000),
            )
        except (DependencyError, DeadlineSpentError) as err:
            log.warning("history unavailable; the model goes without", extra={"error": str(err)})
            flight.degrade("memory")
            return []
        return list(reply.turns)

    # -- phrase -------------------------------------------------------------------------------

    async def _phrase(self, flight: Flight, route: router_pb2.RouteResponse) -> None:
        """The model phrases the answer from the tool's result, streamed to a RunStream caller
        as it comes; the model failing keeps the tool's own answer ("model" degraded)."""
        tool = flight.tool
        assert tool is not None
        pieces: list[str] = []
        usage = router_pb2.ModelUsage()

        async def read(call: aio.UnaryStreamCall) -> None:
            async for reply in call:
                if reply.text:
                    pieces.append(reply.text)
                    flight.streamed_answer = flight.emit is not None
                    flight.tell(
                        gateway_pb2.RunStreamResponse(
                            answer_chunk=gateway_pb2.AnswerChunk(text=reply.text)
                        )
                    )
                if reply.HasField("usage"):
                    usage.CopyFrom(reply.usage)

        call: aio.UnaryStreamCall | None = None

        async def start() -> None:
            nonlocal call
            call = self._clients.router.PhraseAnswer(
                router_pb2.PhraseAnswerRequest(
                    caller=flight.caller,
                    request_id=flight.request_id,
                    prompt=flight.prompt,
                    tool_name=tool.name,
                    tool_version=tool.version,
                    tool_answer=flight.answer,
                    result_json=flight.result_json,
                    arguments_json=route.arguments_json,
                    model=flight.model,
                    session_id=flight.session_id,
                ),
                timeout=timeout,
            )
            await read(call)

        try:
            timeout = flight.deadline.timeout(self._settings.model_route_timeout_ms / 1000)
            await self._guard.run(MODEL, start, timeout)
        except (DependencyError, DeadlineSpentError) as err:
            log.warning("the model could not phrase the answer", extra={"error": str(err)})
            flight.degrade("model")
        finally:
            # Cancelling the stream is what stops the model's generation in the router.
            if call is not None and not call.done():
                call.cancel()
        if usage.input_tokens or usage.output_tokens:
            flight.used(usage)
        elif pieces:
            # The stream broke after the model had worked: charged at the planned bound.
            plan = route.answer_plan
            flight.used(
                router_pb2.ModelUsage(
                    model=flight.model or plan.model,
                    input_tokens=plan.max_input_tokens,
                    output_tokens=len(pieces),
                    prompt=plan.prompt,
                )
            )
        text = "".join(pieces).strip()
        if text and "model" not in flight.degraded:
            flight.answer = text

    async def _reserve(self, flight: Flight, cost_units: int = 0) -> None:
        """Reserve one tool call and its estimated cost against the caller's budgets; the
        usage record commits it. No tokens: only a model uses them, and a Run that turns out
        to need one raises this reservation first (``_top_up``).

        Callers known to have no budget skip the hop. Over budget: telemetry's
        RESOURCE_EXHAUSTED (naming the budget and its reset, QuotaFailure, RetryInfo) reaches
        the caller unchanged and nothing runs. Ledger unreachable: UNAVAILABLE, unless
        ``budget_fail_open`` (then the request runs unchecked and "budget" is degraded).
        """
        budgets = self._accounting.budgets
        known = budgets.known(flight.caller)
        if known is False:
            return
        estimate = self._accounting.prices.estimate(0, 0, cost_units, [])
        if known:
            leased, reservation_id = await self._accounting.leases.draw(
                flight.caller, estimate, lambda calls, cost: self._lease(flight, calls, cost)
            )
            if leased:
                count_reservation("leased")
                flight.reservation_id = reservation_id
                return
        reply = await self._ask_reservation(flight, tokens=0, cost=estimate, top_up=False)
        if reply is None:
            return
        budgets.learn(flight.caller, not reply.unlimited)
        if reply.reserved:
            count_reservation("granted")
            flight.reservation_id = reply.reservation_id
        else:
            count_reservation("unlimited")

    async def _lease(self, flight: Flight, calls: int, cost: int) -> str | None:
        """A lease of ``calls`` tool calls for the caller (its own reservation in telemetry);
        None when not granted, for any reason: the request then reserves by itself, and that
        reservation's answer (a refusal, an unreachable ledger) is the one the caller gets."""
        try:
            reply = await self._guard.call(
                "telemetry",
                self._clients.telemetry.ReserveBudget,
                telemetry_pb2.ReserveBudgetRequest(
                    caller=flight.caller,
                    request_id=uuid.uuid4().hex,
                    tool_calls=calls,
                    cost_micros=cost,
                    ttl_seconds=self._settings.budget_reservation_ttl_s,
                ),
                flight.deadline.timeout(self._settings.budget_call_timeout_ms / 1000),
            )
        except (DependencyError, DeadlineSpentError):
            return None
        if reply.unlimited:
            self._accounting.budgets.learn(flight.caller, False)
        return reply.reservation_id if reply.reserved else None

    async def _ask_reservation(
        self, flight: Flight, *, tokens: int, cost: int, top_up: bool
    ) -> telemetry_pb2.ReserveBudgetResponse | None:
        """ReserveBudget; None when the ledger failed open (refusals abort the request)."""
        try:
            timeout = flight.deadline.timeout(self._settings.budget_call_timeout_ms / 1000)
        except DeadlineSpentError:
            await abort(flight.context, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exhausted")
        try:
            reply: telemetry_pb2.ReserveBudgetResponse = await self._guard.call(
                "telemetry",
                self._clients.telemetry.ReserveBudget,
                telemetry_pb2.ReserveBudgetRequest(
                    caller=flight.caller,
                    request_id=flight.request_id,
                    tool_calls=1,
                    tokens=tokens,
                    cost_micros=cost,
                    ttl_seconds=self._settings.budget_reservation_ttl_s,
                    top_up=top_up,
                ),
                timeout,
            )
        except DependencyError as err:
            await self._reservation_failed(flight, err)
            return None
        return reply

    async def _top_up(self, flight: Flight, plans: list[router_pb2.ModelPlan]) -> None:
        """Before a model call: raise the request's reservation to the calls' token bounds
        (each an upper bound, so concurrent requests never pass a token limit together) and
        their cost at the dearest model that may serve them. Callers without a budget, and a
        ledger that failed open, skip it."""
        flight.raised = True
        if self._accounting.budgets.known(flight.caller) is False or "budget" in flight.degraded:
            return
        tokens_in = sum(plan.max_input_tokens for plan in plans)
        tokens_out = sum(plan.max_output_tokens for plan in plans)
        models = sorted({m for plan in plans for m in (plan.model, plan.fallback_model) if m})
        cost = self._accounting.prices.estimate(tokens_in, tokens_out, 0, models)
        reply = await self._ask_reservation(
            flight, tokens=tokens_in + tokens_out, cost=cost, top_up=True
        )
        if reply is not None and reply.reserved:
            count_reservation("raised")
            flight.reservation_id = reply.reservation_id

    async def _reservation_failed(self, flight: Flight, err: DependencyError) -> None:
        if err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.rpc_error is not None:
            count_reservation("refused")
            self._accounting.budgets.learn(flight.caller, True)
            log.info("budget refused", extra={"reason": err.reason})
            await self._access.audit_refusal(
                flight.context,
                flight.event(
                    audit_pb2.AUDIT_ACTION_BUDGET_DENIED, flight.rpc, DENIED, reason=err.reason
                ),
            )
            await forward(flight.context, err.rpc_error)
        count_reservation("unavailable")
        if self._settings.budget_fail_open:
            log.warning("budget ledger unreachable; failing open", extra={"error": str(err)})
            flight.degrade("budget")
            return
        log.warning("budget ledger unreachable; failing closed", extra={"error": str(err)})
        await abort(
            flight.context,
            grpc.StatusCode.UNAVAILABLE,
            "the budget ledger is unavailable, so no tool may run; retry later",
            retry_info(err.retry_after_s or self._settings.shed_retry_after_ms / 1000),
        )

    # -- authorize ------------------------------------------------------------------------------

    def _log_decision(self, flight: Flight, decision: Decision) -> None:
        """The authorization audit line: who, what, why, and under which policy version."""
        log.info(
            "authorization",
            extra={
                "decision": "allow" if decision.allowed else "deny",
                "reason": decision.reason,
                "missing_scope": decision.missing_scope,
                "tenant": flight.principal.tenant,
                "subject": flight.principal.subject,
                "token_id": flight.principal.token_id,
                "policy_version": flight.policy.version,
            },
        )

    async def _authorize(self, flight: Flight, tool: router_pb2.ToolContract) -> None:
        decision = authorize_tool(flight.principal, tool, flight.allowed)
        self._log_decision(flight, decision)
        if decision.allowed:
            return
        refusal = flight.event(
            audit_pb2.AUDIT_ACTION_PERMISSION_DENIED,
            tool.name,
            DENIED,
            reason=decision.reason,
            missing_scope=decision.missing_scope,
            tool=f"{tool.name}@{tool.version}",
        )
        await self._access.audit_refusal(flight.context, refusal)
        await abort(flight.context, grpc.StatusCode.PERMISSION_DENIED, decision.reason)

    def _usage(
        self,
        flight: Flight,
        usage: common_pb2.Usage,
        outcome: str,
        status: grpc.StatusCode = grpc.StatusCode.OK,
        request_id: str = "",
    ) -> telemetry_pb2.UsageRecord:
        return usage_record(
            request_id=request_id or flight.request_id,
            route=flight.rpc,
            caller=flight.caller,
            tool_name=flight.tool.name if flight.tool else "",
            tool_version=flight.tool.version if flight.tool else "",
            usage=usage,
            outcome=outcome,
            reservation_id=flight.reservation_id,
            status=status,
            duration_ms=(flight.deadline.clock() - flight.started) * 1000,
            tool_outcome=flight.tool_outcome,
            tool_duration_ms=flight.tool_duration_ms,
            trace_id=current_trace_id(),
            prompts=[f"{p.name}@{p.version}" for p in flight.prompts],
            rules_version=flight.rules_version,
        )

    @asynccontextmanager
    async def _accounted_if_refused(self, flight: Flight) -> AsyncIterator[None]:
        """A request refused after authentication (scope, allowlist, budget, idempotency, an
        unavailable dependency) still leaves its compact record: statistics count it, and a
        budget reservation it took is committed at nothing instead of held until it expires.
        The record has its own id, so a retry with the same idempotency key is billed under
        the request id as usual."""
        try:
            yield
        except aio.AbortError:
            code = flight.context.code()
            status = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
            # Model tokens spent before the refusal (a write tool the model picked for a
            # caller without tools:write) are charged like any others.
            usage = self._usage_so_far(flight)
            record = self._usage(flight, usage, "refused", status, uuid.uuid4().hex)
            await self._access.put_refusal(
                flight.context, [(KIND_USAGE, record.request_id, record)]
            )
            raise

    # -- invoke ---------------------------------------------------------------------------------

    async def _invoke(
        self, flight: Flight, tool: router_pb2.ToolContract, arguments_json: str
    ) -> None:
        """Run the tool; failures become the contract's fallback, refusals an explanation.

        The call is under the tool's own breaker ("tool:<name>") and bulkhead, so one hanging
        tool cannot open the router's breaker or take the slots of every other tool.
        """
        flight.tool = tool
        write = tool.side_effect != router_pb2.SIDE_EFFECT_READ_ONLY
        fallback = tool.fallback_answer or TOOL_FALLBACK.format(name=tool.name)
        if flight.deadline.spent():
            log.warning("no time left to run the tool", extra={"tool": tool.name})
            flight.answer, flight.outcome = fallback, gateway_pb2.OUTCOME_FALLBACK
            flight.degrade(f"tool:{tool.name}")
            return
        async with self._admitted(self._tools, tool.name, flight.deadline, flight.context):
            flight.invoked = True
            invoked_at = flight.deadline.clock()
            try:
                reply = await self._guard.call(
                    f"tool:{tool.name}",
                    self._clients.router.InvokeTool,
                    router_pb2.InvokeToolRequest(
                        caller=flight.caller,
                        request_id=flight.request_id,
                        session_id=flight.session_id,
                        tool_name=tool.name,
                        tool_version=tool.version,
                        arguments_json=arguments_json,
                        # The request id is stable across retries with the same key.
                        idempotency_key=flight.request_id if write else "",
                        allowed_tools=sorted(flight.allowed),
                    ),
                    flight.deadline.timeout(),
                )
            except DeadlineSpentError:
                reply = None
            except DependencyError as err:
                flight.tool_duration_ms = (flight.deadline.clock() - invoked_at) * 1000
                await self._tool_failed(flight, tool, err, write, fallback)
                return
            flight.tool_duration_ms = (flight.deadline.clock() - invoked_at) * 1000
        if reply is None:
            flight.answer, flight.outcome = fallback, gateway_pb2.OUTCOME_FALLBACK
            flight.degrade(f"tool:{tool.name}")
            return
        flight.tool_calls = 1
        # The tool worked as its contract says, also when it reported an error for this input.
        flight.tool_outcome = (
            telemetry_pb2.TOOL_OUTCOME_REFUSED
            if reply.tool_error
            else telemetry_pb2.TOOL_OUTCOME_OK
        )
        flight.answer = reply.answer
        flight.result_json = reply.result_json
        flight.cost_units = tool.cost_units
        flight.outcome = (
            gateway_pb2.OUTCOME_TOOL_ERROR
            if reply.tool_error
            else gateway_pb2.OUTCOME_TOOL_ANSWERED
        )
        if write:
            flight.audit.append(flight.event(audit_pb2.AUDIT_ACTION_TOOL_WRITE, tool.name, SUCCESS))

    async def _tool_failed(
        self,
        flight: Flight,
        tool: router_pb2.ToolContract,
        err: DependencyError,
        write: bool,
        fallback: str,
    ) -> None:
        flight.outcome = gateway_pb2.OUTCOME_FALLBACK
        flight.tool_calls = 1 if err.tried else 0
        if err.tried:
            refused = err.code in _TOOL_REFUSALS
            flight.tool_outcome = (
                telemetry_pb2.TOOL_OUTCOME_REFUSED if refused else telemetry_pb2.TOOL_OUTCOME_FAILED
            )
        if write and err.tried:
            flight.audit.append(flight.event(audit_pb2.AUDIT_ACTION_TOOL_WRITE, tool.name, FAILURE))
        if err.code == grpc.StatusCode.PERMISSION_DENIED:
            await self._access.audit_refusal(
                flight.context,
                *flight.audit,
                flight.event(
                    audit_pb2.AUDIT_ACTION_PERMISSION_DENIED, tool.name, DENIED, reason=err.reason
                ),
            )
            await self._access.forward_error(flight.context, err)
        if err.code in _TOOL_REFUSALS and err.tried:
            if flight.rpc == CALL_TOOL:
                # The caller chose these arguments: its mistake, with the router's details.
                await self._access.forward_error(flight.context, err, prefix=False)
            flight.answer = f"The tool {tool.name} refused the arguments: {err.reason}"
            log.info("tool refused", extra={"tool": tool.name, "code": err.code.name})
            return
        log.warning("tool failed; contract fallback", extra={"error": str(err)})
        flight.answer = fallback
        flight.degrade(f"tool:{tool.name}")

    # -- remember, account, answer --------------------------------------------------------------

    def _price(self, usage: common_pb2.Usage) -> Price:
        return self._accounting.prices.price(
            usage.tokens_in, usage.tokens_out, usage.tool_calls, usage.cost_units, usage.model
        )

    def _record_answer(self, flight: Flight, usage: common_pb2.Usage) -> None:
        """What the request's span and log line say about how it was answered."""
        outcome_name = gateway_pb2.Outcome.Name(flight.outcome)
        tool_name = flight.tool.name if flight.tool else ""
        span = trace.get_current_span()
        span.set_attribute("gen_ai.tool.name", tool_name)
        # The versions that served the request (a release may have assigned a candidate).
        if flight.tool is not None:
            span.set_attribute("toolmesh.tool.version", flight.tool.version)
        if flight.rules_version:
            span.set_attribute("toolmesh.rules.version", flight.rules_version)
        span.set_attribute("gen_ai.usage.input_tokens", usage.tokens_in)
        span.set_attribute("gen_ai.usage.output_tokens", usage.tokens_out)
        span.set_attribute("toolmesh.outcome", outcome_name)
        if flight.model:
            span.set_attribute("toolmesh.model", flight.model)
        if flight.prompts:
            span.set_attribute(
                "toolmesh.prompts", [f"{p.name}@{p.version}" for p in flight.prompts]
            )
        span.set_attribute("toolmesh.degraded", list(flight.degraded))
        log.info(
            "request answered",
            extra={"outcome": outcome_name, "tool": tool_name, "degraded": flight.degraded},
        )

    async def _remember(self, flight: Flight, usage: common_pb2.Usage, response: Message) -> None:
        """Store the turns and the answer, the usage record and the audit events before
        answering; never acknowledge a lost turn or an unrecorded cost.

        AppendTurns is tried directly (at most ``memory_write_timeout_ms``, within the budget)
        and completes the idempotency claim with the answer; the usage record (committing the
        reservation) and audit events always go to the durable outbox, together with the turns
        when memory failed, its breaker is open, or no time is left: one outbox transaction per
        request, replayed later (memory de-duplicates by request id and stores the turns in
        acknowledgment order, telemetry by request id and event id). If the outbox write
        fails, the request fails UNAVAILABLE: the caller must not think it was stored.
        """
        flight.acknowledged_at.GetCurrentTime()
        turns = memory_pb2.AppendTurnsRequest(
            caller=flight.caller,
            session_id=flight.session_id,
            request_id=flight.request_id,
            turns=self._turns(flight),
            acknowledged_at=flight.acknowledged_at,
            fingerprint=flight.fingerprint,
            response=response.SerializeToString() if flight.fingerprint else b"",
        )
        entries: list[tuple[str, str, Message]] = [
            (
                KIND_USAGE,
                flight.request_id,
                self._usage(flight, usage, _USAGE_OUTCOMES.get(flight.outcome, "error")),
            ),
            *((KIND_AUDIT, event.event_id, event) for event in flight.audit),
        ]
        # A CallTool outside a session without an idempotency key leaves nothing in memory.
        remembered = bool(turns.turns or turns.fingerprint)
        if remembered and not await self._append_turns(flight, turns):
            entries.append((KIND_MEMORY, flight.request_id, turns))
        try:
            left = flight.deadline.remaining() - ANSWER_MARGIN_S
            async with asyncio.timeout(max(left, 0.001)):
                await self._outbox.put_many(entries)
        except Exception as exc:
            log.error(
                "outbox write failed; turn or usage not stored, request not acknowledged",
                extra={"error": f"{type(exc).__name__}: {exc}"},
            )
            await abort(
                flight.context,
                grpc.StatusCode.UNAVAILABLE,
                "the conversation turn could not be stored; retry with the same idempotency key",
                retry_info(self._settings.shed_retry_after_ms / 1000),
            )

    def _turns(self, flight: Flight) -> list[common_pb2.Turn]:
        """The exchange as the session's turns: the prompt (or the call) and the answer."""
        if not flight.session_id:
            return []
        tool = flight.tool
        answered = flight.outcome in (
            gateway_pb2.OUTCOME_TOOL_ANSWERED,
            gateway_pb2.OUTCOME_TOOL_ERROR,
        )
        asked = flight.prompt
        if flight.rpc == CALL_TOOL and tool is not None:
            asked = f"[call {tool.name}@{tool.version}] {flight.arguments_json}"
        return [
            common_pb2.Turn(
                role=common_pb2.TURN_ROLE_USER, content=asked, request_id=flight.request_id
            ),
            common_pb2.Turn(
                role=common_pb2.TURN_ROLE_ASSISTANT,
                content=flight.answer,
                request_id=flight.request_id,
                tool_name=tool.name if tool and answered else "",
                tool_version=tool.version if tool and answered else "",
            ),
        ]

    async def _append_turns(self, flight: Flight, turns: memory_pb2.AppendTurnsRequest) -> bool:
        """True when memory took the turns now; False when they must go to the outbox."""
        try:
            timeout = flight.deadline.timeout(self._settings.memory_write_timeout_ms / 1000)
        except DeadlineSpentError:
            # No time for a hop: the outbox (a local fsync) still fits in the reserve.
            log.info("no time left for memory; turn deferred to the outbox")
            return False
        try:
            await self._guard.call("memory", self._clients.memory.AppendTurns, turns, timeout)
        except DependencyError as err:
            flight.degrade("memory")
            if err.code in _PERMANENT_WRITE_ERRORS and err.tried:
                log.error("memory refused the turns", extra={"error": str(err)})
                return True
            log.warning("memory write failed; turn goes to the outbox", extra={"error": str(err)})
            return False
        return True
