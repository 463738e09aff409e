"""The Router gRPC service: routing and running tools (built-in and backend ones), and the
tool backends' registry (register, list, remove; tool versions and approval of drifts).

Tenancy: a tenant's backends (and their tools) are visible and usable only with its caller
tenant; shared backends (registered with ``shared`` by a caller with ``platform:admin``) by
every tenant. Anything another tenant owns is NOT_FOUND, exactly like a name never registered.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import grpc
from grpc import aio
from jsonschema import ValidationError
from opentelemetry import trace

from services.kit.buildinfo import service_info
from services.kit.errors import abort, abort_invalid, retry_info
from services.kit.reloadable import Reloadable
from services.router.backends.admin import BackendAdmin
from services.router.backends.config import KIND_TO_PROTO, Kind
from services.router.backends.manager import MISSING, SUSPENDED
from services.router.invoke import Executor, RunResult, ToolRunError
from services.router.models.admin import PromptAdmin, prompt_ref
from services.router.models.provider import ModelRefusedError, ModelUnavailableError
from services.router.models.routing import ModelRouter, Plan, Proposal, Usage
from services.router.notes import NotesStore
from services.router.registry import Registry, SideEffect, Tool, ToolContext, is_allowed
from services.router.releases.admin import ReleaseAdmin
from services.router.releases.model import ROUTING_UNIT
from services.router.releases.shadow import (
    Outcome,
    RouteCall,
    ShadowRunner,
    decision_outcome,
    error_outcome,
    tool_outcome,
)
from services.router.releases.view import CANDIDATE, STABLE
from services.router.routing import Candidate, Decision, RoutePool, RoutingBusyError
from services.router.rules import RuleBook
from services.router.served import Served
from toolmesh.router.v1 import router_pb2, router_pb2_grpc

CONTRACT_VERSIONS = ["toolmesh.router.v1"]
MAX_PROMPT_CHARS = 8000
MAX_ARGUMENTS_BYTES = 64 * 1024
# Identifiers are stored in 128-character columns.
MAX_KEY_CHARS = 128
# Time kept back from the caller's deadline so the answer still reaches it.
DEADLINE_RESERVE_S = 0.02
# Suggested wait when too many long prompts are queued for scoring.
ROUTE_RETRY_AFTER_S = 0.5
# Time kept back from the caller's deadline for answering after a model call.
MODEL_RESERVE_S = 0.1
# A stable call's failures a shadow copy is compared on: the tool's own answers (a refusal of
# the arguments included), not the mesh refusing to run it (busy, circuit open).
_NOT_RUN = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
MAX_RESULT_CHARS = 256 * 1024

_SIDE_EFFECTS = {
    SideEffect.READ_ONLY: router_pb2.SIDE_EFFECT_READ_ONLY,
    SideEffect.WRITE: router_pb2.SIDE_EFFECT_WRITE,
}


def contract_message(tool: Tool) -> router_pb2.ToolContract:
    spec = tool.spec
    origin = tool.origin
    output = json.dumps(spec.output_schema, sort_keys=True)
    if origin is not None and not spec.output_schema:
        output = ""  # the backend declared no structured result
    return router_pb2.ToolContract(
        name=spec.name,
        version=spec.version,
        description=spec.description,
        input_schema_json=json.dumps(spec.input_schema, sort_keys=True),
        output_schema_json=output,
        side_effect=_SIDE_EFFECTS[spec.side_effect],
        cost_units=spec.cost_units,
        timeout_ms=spec.timeout_ms,
        fallback_answer=spec.fallback_answer,
        backend=origin.backend if origin else "",
        backend_kind=(
            KIND_TO_PROTO[Kind(origin.kind)] if origin else router_pb2.BACKEND_KIND_BUILTIN
        ),
        fingerprint=origin.fingerprint if origin else spec.fingerprint(),
    )


def _parts(candidate: Candidate | Proposal) -> router_pb2.ConfidenceParts:
    return router_pb2.ConfidenceParts(
        intent=candidate.intent, schema_fit=candidate.schema_fit, health=candidate.health
    )


def _usage_message(usage: Usage) -> router_pb2.ModelUsage:
    return router_pb2.ModelUsage(
        model=usage.model,
        provider=usage.provider,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        duration_ms=usage.duration_ms,
        reported=usage.reported,
        prompt=prompt_ref(usage.prompt),
    )


def _describe(error: ValidationError) -> str:
    """What the value violated, without echoing the caller's value back."""
    if error.validator in ("required", "additionalProperties"):
        return error.message
    return f"must satisfy {error.validator}: {json.dumps(error.validator_value)[:80]}"


class _InexactNumber(ValueError):
    """A JSON number that a double cannot carry: refused rather than silently changed."""


def _no_constant(name: str) -> Any:
    """NaN and Infinity are not JSON, though Python's parser accepts them."""
    raise ValueError(f"{name} is not valid JSON")


def _exact_float(text: str) -> float:
    """A JSON number with a fraction or exponent, only if a double holds exactly the value
    written (as its shortest text): 1e400 would become infinity, 1e-400 zero, and
    1.00000000000000000001 one, each a different question than the caller asked."""
    number = float(text)
    if Decimal(repr(number)) != Decimal(text):
        raise _InexactNumber(
            f"number {text[:40]} cannot be carried exactly by a double (out of range or too "
            "many digits); send it as text where the tool accepts text"
        )
    return number


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(
        self,
        registry: Registry,
        router: RoutePool,
        executor: Executor,
        notes: NotesStore,
        *,
        backends: BackendAdmin,
        prompts: PromptAdmin,
        served: Served,
        releases: ReleaseAdmin,
        shadow: ShadowRunner,
        model: ModelRouter | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
        rule_files: Reloadable[RuleBook] | None = None,
    ) -> None:
        self._registry = registry
        # The mounted rules files (their version and digest in GetServiceInfo).
        self._rule_files = rule_files
        self._router = router
        self._executor = executor
        self._notes = notes
        self._backends = backends
        self._prompts = prompts
        self._served = served
        self._releases = releases
        self._shadow = shadow
        self._model = model
        self._clock = clock
        self._monotonic = monotonic

    async def _find(
        self, context: aio.ServicerContext, tenant: str, name: str, version: str, draw: str = ""
    ) -> Tool:
        """The tool ``name`` at ``version`` as ``tenant`` sees it (without a version: the one
        serving (tenant, draw), its stable version unless a canary assigns the candidate);
        NOT_FOUND (or FAILED_PRECONDITION for a suspended drift) otherwise."""
        if "." not in name:
            if version:
                tool = self._registry.get(name, version)
            else:
                picked = self._served.pick(tenant, name, draw)
                tool = picked.tool if picked is not None else None
            if tool is None:
                what = (
                    f"tool {name} has no version {version}"
                    if self._registry.has_name(name)
                    else f"tool {name} is not registered"
                )
                await abort(context, grpc.StatusCode.NOT_FOUND, what)
            return tool
        found = self._backends.manager.tool(tenant, name)
        if found is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"tool {name} is not registered")
        runtime, tool_name = found
        status = runtime.status.get(tool_name)
        if status == MISSING:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"tool {name} is no longer offered by backend {runtime.name}",
            )
        if status is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"tool {name} is not registered")
        if version:
            found_tool = runtime.published.get(tool_name, {}).get(version)
            if found_tool is None:
                served = ", ".join(sorted(runtime.published.get(tool_name, {}))) or "none"
                await abort(
                    context,
                    grpc.StatusCode.NOT_FOUND,
                    f"tool {name} has no served version {version} (served: {served})",
                )
            suspended = runtime.suspended(tool_name, found_tool.spec.side_effect)
        else:
            picked = self._served.pick(tenant, name, draw)
            found_tool = picked.tool if picked is not None else None
            suspended = found_tool is None and status == SUSPENDED
        if suspended:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"tool {name} is suspended: its backend now declares it write-capable; an "
                "operator must approve the new contract and release it",
            )
        if found_tool is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"tool {name} is not registered")
        return found_tool

    async def Route(
        self, request: router_pb2.RouteRequest, context: aio.ServicerContext
    ) -> router_pb2.RouteResponse:
        """The rules first; when they find no tool (or the tenant asks the model first) and a
        model is configured: without ``allow_model`` the plan of the model call, with it the
        model's proposal, scored like a rule's (the rules' answer stands if the model fails)."""
        if len(request.prompt) > MAX_PROMPT_CHARS:
            await abort_invalid(context, [("prompt", f"longer than {MAX_PROMPT_CHARS} characters")])
        if len(request.session_id) > MAX_KEY_CHARS:
            await abort_invalid(
                context, [("session_id", f"longer than {MAX_KEY_CHARS} characters")]
            )
        tenant = request.caller.tenant
        # Under a release, versions are assigned per (tenant, session).
        draw = request.session_id or request.request_id
        model = self._model
        model_first = model is not None and model.settings.model_first_for(tenant)
        rules, arm = self._served.rules_for(tenant, draw)
        lookup = self._served.lookup(tenant, draw)
        allowed = list(request.allowed_tools)
        started = time.perf_counter()
        try:
            decision = await self._router.route(
                request.prompt, allowed, tenant, router=rules, lookup=lookup
            )
        except RoutingBusyError as error:
            await abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the router is busy scoring long prompts ({error}); retry later",
                retry_info(ROUTE_RETRY_AFTER_S),
            )
        span = trace.get_current_span()
        span.set_attribute("toolmesh.rules.version", decision.rules_version)
        span.set_attribute("toolmesh.rules.release_arm", arm)
        self._shadow_route(RouteCall(request.prompt, allowed, tenant, lookup), decision, started)
        response = self._rules_response(decision)
        if model is None or (decision.matched and not model_first):
            if model is not None and decision.matched:
                await self._plan_answer(model, response, request.prompt, tenant, draw)
            return response
        offered = model.offer(self._allowed_tools(tenant, allowed, draw))
        if not offered:
            return response
        if not request.allow_model:
            plan = await model.route_plan(tenant, offered, request.prompt, session=draw)
            response.matched = False
            response.ClearField("tool")
            response.arguments_json = ""
            response.model_plan.CopyFrom(self._plan_message(model, plan))
            await self._plan_answer(model, response, request.prompt, tenant, draw)
            return response
        try:
            proposal = await model.propose(
                tenant,
                offered,
                request.prompt,
                request.history,
                self._model_deadline(context),
                session=draw,
            )
        except (ModelUnavailableError, ModelRefusedError) as error:
            response.degraded.append("model")
            response.reason = f"{response.reason}; the model could not be consulted ({error})"
            return response
        if not proposal.matched and decision.matched:
            # Model first, and the model found nothing: the rules' answer stands.
            response.model_usage.CopyFrom(_usage_message(proposal.usage))
            response.reason = f"{response.reason} (the model: {proposal.reason})"
            return response
        routed = self._model_response(response, proposal)
        if routed.matched:
            await self._plan_answer(model, routed, request.prompt, tenant, draw)
        return routed

    def _shadow_route(self, asked: RouteCall, decision: Decision, started: float) -> None:
        """While a routing release shadows, score a share of prompts with its rules too."""
        release = self._served.view.shadowing(ROUTING_UNIT)
        if release is None or not self._shadow.wanted(release):
            return
        candidate = self._served.routers.get(release.candidate_version)
        if candidate is None or decision.rules_version != release.stable_version:
            return
        stable = decision_outcome(decision, (time.perf_counter() - started) * 1000)
        self._shadow.route(release, candidate, asked, stable)

    def _rules_response(self, decision: Decision) -> router_pb2.RouteResponse:
        response = router_pb2.RouteResponse(
            matched=decision.matched,
            threshold=decision.threshold,
            reason=decision.reason,
            rules_version=decision.rules_version,
            method=router_pb2.ROUTE_METHOD_RULES,
            candidates=[
                router_pb2.Candidate(
                    tool_name=c.tool.spec.name, confidence=c.confidence, parts=_parts(c)
                )
                for c in decision.candidates
            ],
        )
        best = decision.best
        if best is not None:
            response.confidence = best.confidence
            response.parts.CopyFrom(_parts(best))
            if decision.matched:
                response.tool.CopyFrom(contract_message(best.tool))
                response.arguments_json = decision.arguments_json
        return response

    def _model_response(
        self, rules: router_pb2.RouteResponse, proposal: Proposal
    ) -> router_pb2.RouteResponse:
        response = router_pb2.RouteResponse(
            matched=proposal.matched,
            threshold=rules.threshold,
            reason=proposal.reason,
            rules_version=rules.rules_version,
            method=router_pb2.ROUTE_METHOD_MODEL,
            confidence=proposal.confidence,
            parts=_parts(proposal),
            model_usage=_usage_message(proposal.usage),
        )
        if proposal.tool is not None:
            response.candidates.append(
                router_pb2.Candidate(
                    tool_name=proposal.tool.spec.name,
                    confidence=proposal.confidence,
                    parts=_parts(proposal),
                )
            )
        if proposal.matched and proposal.tool is not None:
            response.tool.CopyFrom(contract_message(proposal.tool))
            response.arguments_json = json.dumps(proposal.arguments)
        return response

    def _plan_message(self, model: ModelRouter, plan: Plan) -> router_pb2.ModelPlan:
        return router_pb2.ModelPlan(
            model=model.model,
            fallback_model=model.fallback_model,
            max_input_tokens=plan.max_input_tokens,
            max_output_tokens=plan.max_output_tokens,
            prompt=prompt_ref(plan.prompt),
        )

    async def _plan_answer(
        self,
        model: ModelRouter,
        response: router_pb2.RouteResponse,
        prompt: str,
        tenant: str,
        session: str,
    ) -> None:
        """The answer's plan, for a tenant whose answers the model phrases."""
        if model.settings.phrased_for(tenant):
            plan = await model.answer_plan(tenant, prompt, response.tool.name, session=session)
            response.answer_plan.CopyFrom(self._plan_message(model, plan))

    def _allowed_tools(self, tenant: str, allowed: Iterable[str], draw: str) -> list[Tool]:
        """The version serving (tenant, draw) of every tool the caller may use."""
        allowed = list(allowed)
        names = {tool.spec.name for tool in self._registry.all()}
        names |= {tool.spec.name for tool in self._backends.served_tools(tenant)}
        picks = [self._served.pick(tenant, name, draw) for name in sorted(names)]
        return [p.tool for p in picks if p is not None and is_allowed(p.tool.spec.name, allowed)]

    def _model_deadline(self, context: aio.ServicerContext) -> float:
        """When a model call must be done: within the model timeout and the caller's deadline,
        less the time the answer needs to reach the caller."""
        assert self._model is not None
        budget = self._model.settings.timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining - MODEL_RESERVE_S)
        return self._monotonic() + budget

    async def _check_request(
        self, request: router_pb2.InvokeToolRequest, context: aio.ServicerContext
    ) -> tuple[Tool, dict[str, Any]]:
        """The tool and parsed arguments, or the precise error for the first thing wrong."""
        problems = [
            (field, "required")
            for field, value in (
                ("caller.tenant", request.caller.tenant),
                ("tool_name", request.tool_name),
                ("tool_version", request.tool_version),
            )
            if not value
        ]
        for field, value in (
            ("caller.tenant", request.caller.tenant),
            ("session_id", request.session_id),
            ("request_id", request.request_id),
            ("idempotency_key", request.idempotency_key),
        ):
            if len(value) > MAX_KEY_CHARS:
                problems.append((field, f"longer than {MAX_KEY_CHARS} characters"))
        if len(request.arguments_json.encode()) > MAX_ARGUMENTS_BYTES:
            problems.append(("arguments_json", f"larger than {MAX_ARGUMENTS_BYTES} bytes"))
        if problems:
            await abort_invalid(context, problems)
        tool = await self._find(
            context, request.caller.tenant, request.tool_name, request.tool_version
        )
        if not is_allowed(tool.spec.name, request.allowed_tools):
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"tool {tool.spec.name} is not on the caller's allowed tools",
            )
        try:
            arguments = json.loads(
                request.arguments_json or "{}",
                parse_constant=_no_constant,
                parse_float=_exact_float,
            )
        except _InexactNumber as error:
            await abort_invalid(context, [("arguments_json", str(error))])
        except ValueError:
            await abort_invalid(context, [("arguments_json", "is not valid JSON")])
        errors = sorted(tool.input_validator.iter_errors(arguments), key=lambda e: e.json_path)
        if errors:
            await abort_invalid(
                context,
                [(f"arguments_json{e.json_path.removeprefix('$')}", _describe(e)) for e in errors],
            )
        if tool.spec.side_effect is SideEffect.WRITE and not request.idempotency_key:
            await abort_invalid(
                context,
                [("idempotency_key", f"required for the write tool {tool.spec.name}")],
            )
        return tool, arguments

    async def InvokeTool(
        self, request: router_pb2.InvokeToolRequest, context: aio.ServicerContext
    ) -> router_pb2.InvokeToolResponse:
        tool, arguments = await self._check_request(request, context)
        budget_s = tool.spec.timeout_ms / 1000
        remaining = context.time_remaining()
        if remaining is not None:
            budget_s = min(budget_s, remaining - DEADLINE_RESERVE_S)
        if budget_s <= 0:
            await abort(
                context,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no time left to run tool {tool.spec.name}",
            )
        tool_context = ToolContext(
            tenant=request.caller.tenant,
            session_id=request.session_id,
            request_id=request.request_id,
            idempotency_key=request.idempotency_key,
            notes=self._notes,
            now=self._clock,
        )
        span = trace.get_current_span()
        span.set_attribute("toolmesh.tool.version", tool.spec.version)
        span.set_attribute("toolmesh.tool.release_arm", self._arm(request.caller.tenant, tool))
        started = time.perf_counter()
        try:
            run = await self._executor.run(tool, arguments, tool_context, budget_s)
        except ToolRunError as error:
            if error.code not in _NOT_RUN:
                ms = (time.perf_counter() - started) * 1000
                self._shadow_tool(tool, arguments, tool_context, error_outcome(error, ms))
            details = [] if error.retry_after_s is None else [retry_info(error.retry_after_s)]
            await abort(context, error.code, error.message, *details)
        self._shadow_tool(tool, arguments, tool_context, self._outcome(run, started))
        return router_pb2.InvokeToolResponse(
            tool_name=tool.spec.name,
            tool_version=tool.spec.version,
            answer=run.output.answer,
            result_json=run.result_json,
            cost_units=tool.spec.cost_units,
            replayed=run.output.replayed,
            tool_error=run.output.tool_error,
        )

    def _arm(self, tenant: str, tool: Tool) -> str:
        """ "candidate" when ``tool`` is the candidate of its unit's release, else "stable"."""
        unit = self._served.unit_of(tenant, tool.spec.name)
        release = self._served.view.release(unit) if unit is not None else None
        if release is not None and tool.spec.version == release.candidate_version:
            return CANDIDATE
        return STABLE

    @staticmethod
    def _outcome(run: RunResult, started: float) -> Outcome:
        ms = (time.perf_counter() - started) * 1000
        return tool_outcome(run.result_json, run.output.answer, run.output.tool_error, ms)

    def _shadow_tool(
        self, tool: Tool, arguments: dict[str, Any], ctx: ToolContext, stable: Outcome
    ) -> None:
        """While the tool's release shadows, copy a share of its stable calls (read-only
        tools only) to the candidate, after this call's answer."""
        if tool.spec.side_effect is not SideEffect.READ_ONLY:
            return
        unit = self._served.unit_of(ctx.tenant, tool.spec.name)
        release = self._served.view.shadowing(unit) if unit is not None else None
        if release is None or tool.spec.version != release.stable_version:
            return
        if not self._shadow.wanted(release):
            return
        name = tool.spec.name
        if "." in name:
            candidate = self._backends.manager.served(ctx.tenant, name, release.candidate_version)
        else:
            candidate = self._registry.get(name, release.candidate_version)
        if candidate is not None:
            self._shadow.tool(release, candidate, arguments, ctx, stable)

    async def ListTools(
        self, request: router_pb2.ListToolsRequest, context: aio.ServicerContext
    ) -> router_pb2.ListToolsResponse:
        allowed: Iterable[str] = request.allowed_tools or ["*"]
        # The stable version of each tool; ListToolVersions has the history.
        tools = [
            *self._served.stable_builtins(),
            *self._backends.served_tools(request.caller.tenant),
        ]
        return router_pb2.ListToolsResponse(
            tools=[contract_message(tool) for tool in tools if is_allowed(tool.spec.name, allowed)]
        )

    async def ResolveTool(
        self, request: router_pb2.ResolveToolRequest, context: aio.ServicerContext
    ) -> router_pb2.ResolveToolResponse:
        problems = [] if request.tool_name else [("tool_name", "required")]
        for field, value in (
            ("tool_name", request.tool_name),
            ("session_id", request.session_id),
            ("request_id", request.request_id),
        ):
            if len(value) > MAX_KEY_CHARS:
                problems.append((field, f"longer than {MAX_KEY_CHARS} characters"))
        if problems:
            await abort_invalid(context, problems)
        # Sticky per session; a call outside a session draws by its request (a random one
        # when it names none).
        draw = request.session_id or request.request_id or uuid.uuid4().hex
        tool = await self._find(
            context, request.caller.tenant, request.tool_name, request.tool_version, draw
        )
        if not is_allowed(tool.spec.name, request.allowed_tools):
            # Not on the caller's allowlist: exactly like a tool that does not exist.
            await abort(
                context, grpc.StatusCode.NOT_FOUND, f"tool {request.tool_name} is not registered"
            )
        return router_pb2.ResolveToolResponse(tool=contract_message(tool))

    async def RegisterBackend(
        self, request: router_pb2.RegisterBackendRequest, context: aio.ServicerContext
    ) -> router_pb2.RegisterBackendResponse:
        backend = await self._backends.register(request, context)
        return router_pb2.RegisterBackendResponse(backend=backend)

    async def ListBackends(
        self, request: router_pb2.ListBackendsRequest, context: aio.ServicerContext
    ) -> router_pb2.ListBackendsResponse:
        return router_pb2.ListBackendsResponse(
            backends=await self._backends.list_backends(request.caller, context)
        )

    async def RemoveBackend(
        self, request: router_pb2.RemoveBackendRequest, context: aio.ServicerContext
    ) -> router_pb2.RemoveBackendResponse:
        await self._backends.remove(request.caller, request.name, context)
        return router_pb2.RemoveBackendResponse()

    async def ListToolVersions(
        self, request: router_pb2.ListToolVersionsRequest, context: aio.ServicerContext
    ) -> router_pb2.ListToolVersionsResponse:
        if "." not in request.tool_name:
            versions = [
                router_pb2.ToolVersion(
                    contract=contract_message(tool), state=router_pb2.TOOL_VERSION_STATE_PUBLISHED
                )
                for tool in self._registry.all()
                if tool.spec.name == request.tool_name
            ]
            if not versions:
                await abort(
                    context,
                    grpc.StatusCode.NOT_FOUND,
                    f"tool {request.tool_name[:MAX_KEY_CHARS]} is not registered",
                )
            return router_pb2.ListToolVersionsResponse(versions=versions)
        return router_pb2.ListToolVersionsResponse(
            versions=await self._backends.versions(request.caller, request.tool_name, context)
        )

    async def ApproveToolVersion(
        self, request: router_pb2.ApproveToolVersionRequest, context: aio.ServicerContext
    ) -> router_pb2.ApproveToolVersionResponse:
        if request.tool_name and "." not in request.tool_name:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "built-in tools are versioned with the router's code; only backend tools "
                "have contracts to approve",
            )
        version = await self._backends.approve(request, context)
        return router_pb2.ApproveToolVersionResponse(version=version)

    async def PhraseAnswer(
        self, request: router_pb2.PhraseAnswerRequest, context: aio.ServicerContext
    ) -> AsyncIterator[router_pb2.PhraseAnswerResponse]:
        model = self._model
        if model is None:
            await abort(
                context, grpc.StatusCode.FAILED_PRECONDITION, "no model is configured to answer"
            )
        problems = []
        if not request.caller.tenant:
            problems.append(("caller.tenant", "required"))
        if len(request.prompt) > MAX_PROMPT_CHARS:
            problems.append(("prompt", f"longer than {MAX_PROMPT_CHARS} characters"))
        for name in ("tool_answer", "result_json", "arguments_json"):
            if len(getattr(request, name)) > MAX_RESULT_CHARS:
                problems.append((name, f"longer than {MAX_RESULT_CHARS} characters"))
        if len(request.tool_name) > MAX_KEY_CHARS or len(request.model) > MAX_KEY_CHARS:
            problems.append(("tool_name", f"longer than {MAX_KEY_CHARS} characters"))
        if problems:
            await abort_invalid(context, problems)
        try:
            async for piece in model.phrase(
                request.caller.tenant,
                text=request.prompt,
                tool_name=request.tool_name,
                arguments_json=request.arguments_json,
                answer=request.tool_answer,
                result_json=request.result_json,
                model=request.model,
                deadline=self._model_deadline(context),
                session=request.session_id,
            ):
                if isinstance(piece, Usage):
                    yield router_pb2.PhraseAnswerResponse(usage=_usage_message(piece))
                else:
                    yield router_pb2.PhraseAnswerResponse(text=piece)
        except ModelUnavailableError as error:
            await abort(context, grpc.StatusCode.UNAVAILABLE, f"the model cannot answer: {error}")
        except ModelRefusedError as error:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, f"the model refused: {error}")

    async def ListPrompts(
        self, request: router_pb2.ListPromptsRequest, context: aio.ServicerContext
    ) -> router_pb2.ListPromptsResponse:
        return router_pb2.ListPromptsResponse(versions=await self._prompts.list(request, context))

    async def GetPrompt(
        self, request: router_pb2.GetPromptRequest, context: aio.ServicerContext
    ) -> router_pb2.GetPromptResponse:
        return router_pb2.GetPromptResponse(version=await self._prompts.get(request, context))

    async def PublishPrompt(
        self, request: router_pb2.PublishPromptRequest, context: aio.ServicerContext
    ) -> router_pb2.PublishPromptResponse:
        version, created = await self._prompts.publish(request, context)
        return router_pb2.PublishPromptResponse(version=version, created=created)

    async def SelectPrompt(
        self, request: router_pb2.SelectPromptRequest, context: aio.ServicerContext
    ) -> router_pb2.SelectPromptResponse:
        return router_pb2.SelectPromptResponse(version=await self._prompts.select(request, context))

    async def StartRelease(
        self, request: router_pb2.StartReleaseRequest, context: aio.ServicerContext
    ) -> router_pb2.StartReleaseResponse:
        return router_pb2.StartReleaseResponse(release=await self._releases.start(request, context))

    async def GetRelease(
        self, request: router_pb2.GetReleaseRequest, context: aio.ServicerContext
    ) -> router_pb2.GetReleaseResponse:
        return router_pb2.GetReleaseResponse(release=await self._releases.get(request, context))

    async def ListReleases(
        self, request: router_pb2.ListReleasesRequest, context: aio.ServicerContext
    ) -> router_pb2.ListReleasesResponse:
        return router_pb2.ListReleasesResponse(releases=await self._releases.list(request, context))

    async def ControlRelease(
        self, request: router_pb2.ControlReleaseRequest, context: aio.ServicerContext
    ) -> router_pb2.ControlReleaseResponse:
        return router_pb2.ControlReleaseResponse(
            release=await self._releases.control(request, context)
        )

    async def GetServiceInfo(
        self, request: router_pb2.GetServiceInfoRequest, context: aio.ServicerContext
    ) -> router_pb2.GetServiceInfoResponse:
        info = service_info("router", CONTRACT_VERSIONS)
        info.attributes.update(routing_mode(self._model))
        # Which replica answered: release leases and histories name replicas by this.
        info.attributes["replica"] = self._served.view.replica
        if self._rule_files is not None:
            info.attributes.update(self._rule_files.attributes())
        info.attributes.update(rules_in_use(self._served))
        return router_pb2.GetServiceInfoResponse(info=info)


def rules_in_use(served: Served) -> dict[str, str]:
    """The routing rules versions this replica holds, the stable one, and a release's
    candidate (what `toolmesh release start routing` may name, and what serves)."""
    facts = {
        "routing_rules.loaded": ",".join(sorted(served.routers)),
        "routing_rules.stable": served.view.stable(ROUTING_UNIT) or served.rules.seed,
    }
    release = served.view.release(ROUTING_UNIT)
    if release is not None:
        facts["routing_rules.candidate"] = release.candidate_version
    return facts


def routing_mode(model: ModelRouter | None) -> dict[str, str]:
    """How this router routes, for GetServiceInfo and its start-up log line."""
    if model is None:
        return {"routing_mode": "rules"}
    mode = {
        "routing_mode": "rules+model",
        "model": model.model,
        "model_tool_choice": model.settings.tool_choice,
    }
    if model.fallback_model:
        mode["fallback_model"] = model.fallback_model
    return mode
