"""The Router gRPC service: Route, InvokeTool, ListTools, GetServiceInfo."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import grpc
from grpc import aio
from jsonschema import ValidationError

from services.kit.buildinfo import service_info
from services.kit.errors import abort, abort_invalid, retry_info
from services.router.invoke import Executor, ToolRunError
from services.router.notes import NotesStore
from services.router.registry import Registry, SideEffect, Tool, ToolContext, is_allowed
from services.router.routing import Candidate, RoutePool, RoutingBusyError
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

_SIDE_EFFECTS = {
    SideEffect.READ_ONLY: router_pb2.SIDE_EFFECT_READ_ONLY,
    SideEffect.WRITE: router_pb2.SIDE_EFFECT_WRITE,
}


def contract_message(tool: Tool) -> router_pb2.ToolContract:
    spec = tool.spec
    return router_pb2.ToolContract(
        name=spec.name,
        version=spec.version,
        description=spec.description,
        input_schema_json=json.dumps(spec.input_schema, sort_keys=True),
        output_schema_json=json.dumps(spec.output_schema, sort_keys=True),
        side_effect=_SIDE_EFFECTS[spec.side_effect],
        cost_units=spec.cost_units,
        timeout_ms=spec.timeout_ms,
        fallback_answer=spec.fallback_answer,
    )


def _parts(candidate: Candidate) -> router_pb2.ConfidenceParts:
    return router_pb2.ConfidenceParts(
        intent=candidate.intent, schema_fit=candidate.schema_fit, health=candidate.health
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
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._registry = registry
        self._router = router
        self._executor = executor
        self._notes = notes
        self._clock = clock

    async def Route(
        self, request: router_pb2.RouteRequest, context: aio.ServicerContext
    ) -> router_pb2.RouteResponse:
        if len(request.prompt) > MAX_PROMPT_CHARS:
            await abort_invalid(context, [("prompt", f"longer than {MAX_PROMPT_CHARS} characters")])
        try:
            decision = await self._router.route(request.prompt, request.allowed_tools)
        except RoutingBusyError as error:
            await abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the router is busy scoring long prompts ({error}); retry later",
                retry_info(ROUTE_RETRY_AFTER_S),
            )
        response = router_pb2.RouteResponse(
            matched=decision.matched,
            threshold=decision.threshold,
            reason=decision.reason,
            rules_version=decision.rules_version,
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
        tool = self._registry.get(request.tool_name, request.tool_version)
        if tool is None:
            what = (
                f"tool {request.tool_name} has no version {request.tool_version}"
                if self._registry.has_name(request.tool_name)
                else f"tool {request.tool_name} is not registered"
            )
            await abort(context, grpc.StatusCode.NOT_FOUND, what)
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
        try:
            run = await self._executor.run(tool, arguments, tool_context, budget_s)
        except ToolRunError as error:
            details = [] if error.retry_after_s is None else [retry_info(error.retry_after_s)]
            await abort(context, error.code, error.message, *details)
        return router_pb2.InvokeToolResponse(
            tool_name=tool.spec.name,
            tool_version=tool.spec.version,
            answer=run.output.answer,
            result_json=run.result_json,
            cost_units=tool.spec.cost_units,
            replayed=run.output.replayed,
        )

    async def ListTools(
        self, request: router_pb2.ListToolsRequest, context: aio.ServicerContext
    ) -> router_pb2.ListToolsResponse:
        allowed: Iterable[str] = request.allowed_tools or ["*"]
        return router_pb2.ListToolsResponse(
            tools=[
                contract_message(tool)
                for tool in self._registry.all()
                if is_allowed(tool.spec.name, allowed)
            ]
        )

    async def GetServiceInfo(
        self, request: router_pb2.GetServiceInfoRequest, context: aio.ServicerContext
    ) -> router_pb2.GetServiceInfoResponse:
        return router_pb2.GetServiceInfoResponse(info=service_info("router", CONTRACT_VERSIONS))
