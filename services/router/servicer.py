"""The Router gRPC service: routing and running tools (built-in and backend ones), and the
tool backends' registry (register, list, remove; tool versions and approval of drifts).

Tenancy: a tenant's backends (and their tools) are visible and usable only with its caller
tenant; shared backends (registered with ``shared`` by a caller with ``platform:admin``) by
every tenant. Anything another tenant owns is NOT_FOUND, exactly like a name never registered.
"""

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
from services.router.backends.admin import BackendAdmin
from services.router.backends.config import KIND_TO_PROTO, Kind
from services.router.backends.manager import MISSING, SUSPENDED
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
        *,
        backends: BackendAdmin,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._registry = registry
        self._router = router
        self._executor = executor
        self._notes = notes
        self._backends = backends
        self._clock = clock

    async def _find(
        self, context: aio.ServicerContext, tenant: str, name: str, version: str
    ) -> Tool:
        """The tool ``name`` at ``version`` (latest published when empty) as ``tenant`` sees
        it; NOT_FOUND (or FAILED_PRECONDITION for a suspended drift) otherwise."""
        if "." not in name:
            tool = self._registry.get(name, version) if version else self._registry.latest(name)
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
        tool = runtime.tools.get(tool_name)
        if tool is None or status is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"tool {name} is not registered")
        if status == SUSPENDED:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"tool {name} is suspended: its backend now declares it write-capable; an "
                "operator must approve the new contract",
            )
        if version and version != tool.spec.version:
            served = tool.spec.version
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"tool {name} has no served version {version} (the served version is {served})",
            )
        return tool

    async def Route(
        self, request: router_pb2.RouteRequest, context: aio.ServicerContext
    ) -> router_pb2.RouteResponse:
        if len(request.prompt) > MAX_PROMPT_CHARS:
            await abort_invalid(context, [("prompt", f"longer than {MAX_PROMPT_CHARS} characters")])
        try:
            decision = await self._router.route(
                request.prompt, request.allowed_tools, request.caller.tenant
            )
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
            tool_error=run.output.tool_error,
        )

    async def ListTools(
        self, request: router_pb2.ListToolsRequest, context: aio.ServicerContext
    ) -> router_pb2.ListToolsResponse:
        allowed: Iterable[str] = request.allowed_tools or ["*"]
        # The version each tool serves (its latest release); ListToolVersions has the history.
        builtin = {t.spec.name: self._registry.latest(t.spec.name) for t in self._registry.all()}
        tools = [
            *(tool for tool in builtin.values() if tool is not None),
            *self._backends.served_tools(request.caller.tenant),
        ]
        return router_pb2.ListToolsResponse(
            tools=[contract_message(tool) for tool in tools if is_allowed(tool.spec.name, allowed)]
        )

    async def ResolveTool(
        self, request: router_pb2.ResolveToolRequest, context: aio.ServicerContext
    ) -> router_pb2.ResolveToolResponse:
        problems = [] if request.tool_name else [("tool_name", "required")]
        if len(request.tool_name) > MAX_KEY_CHARS:
            problems.append(("tool_name", f"longer than {MAX_KEY_CHARS} characters"))
        if problems:
            await abort_invalid(context, problems)
        tool = await self._find(
            context, request.caller.tenant, request.tool_name, request.tool_version
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

    async def GetServiceInfo(
        self, request: router_pb2.GetServiceInfoRequest, context: aio.ServicerContext
    ) -> router_pb2.GetServiceInfoResponse:
        return router_pb2.GetServiceInfoResponse(info=service_info("router", CONTRACT_VERSIONS))
