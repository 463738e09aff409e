"""The MCP server: tools/list and tools/call over streamable HTTP, each one Gateway call.

Built on the ``mcp`` SDK's low-level server (the tool list depends on who asks, so tools are
not registered up front). It runs stateless: the face keeps nothing between requests, so any
replica can answer any request behind a plain load balancer, and a replica that goes away
loses no session (a toolmesh session is named by the caller in ``_meta``, or is the caller's
default one, see mcpface.mapping). Responses are plain JSON, not SSE streams: a tool call
has one answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import mcp_types as types
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from opentelemetry import trace
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mcpface import mapping
from mcpface.auth import CALLER_SCOPE_KEY, BearerGate, Caller, TokenCheck
from mcpface.settings import McpFaceSettings
from services.kit.buildinfo import build_version
from services.kit.metrics import meter
from services.kit.tracecontext import caller_span_context
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger("toolmesh.mcpface")
tracer = trace.get_tracer("toolmesh.mcpface")
CALLS = meter().create_counter(
    "toolmesh_mcpface_calls", description="MCP tools/call requests by result"
)
CALL_SECONDS = meter().create_histogram(
    "toolmesh_mcpface_call_seconds", unit="s", description="tools/call latency through the face"
)

INSTRUCTIONS = (
    "toolmesh runs each tool under its tenant's allowlist, scopes, budgets and audit. "
    'Write-capable tools (readOnlyHint false) need a unique _meta "toolmesh/idempotencyKey" '
    'per call. Calls are remembered in a toolmesh session: pass _meta "toolmesh/sessionId" '
    "to name one; otherwise each caller has its own default session."
)
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _caller(ctx: ServerRequestContext[Any, Any]) -> Caller:
    """The caller BearerGate put in the HTTP request's scope; every MCP request has one."""
    request = ctx.request
    caller = request.scope.get(CALLER_SCOPE_KEY) if isinstance(request, Request) else None
    if not isinstance(caller, Caller):
        raise MCPError(types.INTERNAL_ERROR, "no authenticated caller")
    return caller


def _bearer(caller: Caller) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {caller.token}"),)


class UntrustedSpans:
    """Context-tier middleware: one span per MCP request, always in a new trace.

    Replaces the SDK's OpenTelemetryMiddleware, which would make a ``traceparent`` in the
    caller's ``_meta`` the parent: callers outside the mesh never choose our trace (see
    services.kit.tracecontext); their context is kept as a link.
    """

    async def __call__(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        name = ctx.params.get("name") if ctx.params else None
        target = name if isinstance(name, str) else ""
        caller_context = caller_span_context((ctx.meta or {}).items())
        links = [trace.Link(caller_context, {"toolmesh.link": "caller"})] if caller_context else []
        attributes: dict[str, Any] = {"mcp.method.name": ctx.method}
        if ctx.method == "tools/call":
            attributes["gen_ai.operation.name"] = "execute_tool"
            attributes["gen_ai.tool.name"] = target
        with tracer.start_as_current_span(
            f"{ctx.method} {target}".strip(),
            context=trace.set_span_in_context(trace.INVALID_SPAN),
            kind=trace.SpanKind.SERVER,
            attributes=attributes,
            links=links,
        ):
            return await call_next(ctx)


@dataclass
class Face:
    """The face's two MCP methods, over one gateway channel."""

    settings: McpFaceSettings
    gateway: gateway_pb2_grpc.GatewayStub
    tokens: TokenCheck

    async def list_tools(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        """The tools the caller's tenant allows (the gateway's ListTools), less those its
        scopes do not let it call."""
        caller = _caller(ctx)
        try:
            reply = await self.gateway.ListTools(
                gateway_pb2.ListToolsRequest(),
                metadata=_bearer(caller),
                timeout=self.settings.list_timeout_s,
            )
        except aio.AioRpcError as err:
            self._token_refused(err, caller)
            log.info("tools/list refused", extra={"code": err.code().name})
            raise mapping.list_error(err) from None
        tools = [mapping.mcp_tool(t) for t in reply.tools if mapping.visible(t, caller.scopes)]
        return types.ListToolsResult(tools=tools)

    async def call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        """Gateway.CallTool: the governed pipeline (allowlist, scope, idempotency, budget,
        breakers, audit, usage and cost), then its answer or refusal in MCP's terms."""
        caller = _caller(ctx)
        started = time.perf_counter()
        try:
            request = mapping.call_request(params, caller.subject)
        except mapping.MetaError as bad:
            return mapping.tool_error(
                f"Invalid call of {params.name}: {bad}", code="INVALID_ARGUMENT"
            )
        try:
            reply = await self.gateway.CallTool(
                request, metadata=_bearer(caller), timeout=self.settings.call_timeout_s
            )
        except aio.AioRpcError as err:
            self._token_refused(err, caller)
            self._log_call(params.name, err.code().name, started)
            return mapping.refusal(err, params.name)
        self._log_call(params.name, gateway_pb2.Outcome.Name(reply.outcome), started)
        return mapping.call_result(reply)

    def _token_refused(self, err: aio.AioRpcError, caller: Caller) -> None:
        """UNAUTHENTICATED after the HTTP layer let the token in (revoked or expired since):
        forget it, so the caller's next request gets HTTP 401, and say so now."""
        if err.code() != grpc.StatusCode.UNAUTHENTICATED:
            return
        self.tokens.forget(caller.token)
        raise MCPError(
            types.INVALID_REQUEST,
            f"unauthenticated: {err.details() or 'invalid token'}; obtain a new token",
        )

    def _log_call(self, tool: str, result: str, started: float) -> None:
        seconds = time.perf_counter() - started
        # By result only: tool names come from the client (an unknown one is still a label).
        CALLS.add(1, {"result": result})
        CALL_SECONDS.record(seconds, {"result": result})
        log.info(
            "tools/call",
            extra={"tool": tool, "result": result, "duration_ms": round(seconds * 1000, 2)},
        )


def transport_security(settings: McpFaceSettings) -> TransportSecuritySettings:
    """DNS-rebinding protection: the Host (and any Origin) must name this server."""
    hosts = [h.strip() for h in settings.allowed_hosts.split(",") if h.strip()]
    if not hosts and settings.host in _LOOPBACK:
        hosts = ["127.0.0.1:*", "localhost:*", "[::1]:*"]
    if not hosts:
        # Bound beyond loopback with no list: an ingress in front checks the host.
        return TransportSecuritySettings(enable_dns_rebinding_protection=False)
    origins = [f"{scheme}://{h}" for h in hosts for scheme in ("http", "https")]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins
    )


class Readiness:
    """Ready while the gateway answers its health check SERVING and the face is not draining;
    the answer is reused for ``readiness_cache_s`` so probes cost the gateway little."""

    def __init__(self, health: health_pb2_grpc.HealthStub, settings: McpFaceSettings) -> None:
        self._health = health
        self._settings = settings
        self.draining = False
        self._checked_at = float("-inf")
        self._ready = False
        self._reason = "not checked yet"

    async def check(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        now = time.monotonic()
        if now - self._checked_at < self._settings.readiness_cache_s:
            return self._ready, self._reason
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self._settings.list_timeout_s
            )
            self._ready = reply.status == health_pb2.HealthCheckResponse.SERVING
            self._reason = "gateway serving" if self._ready else "gateway not serving"
        except aio.AioRpcError as err:
            self._ready, self._reason = False, f"gateway {err.code().name}"
        self._checked_at = now
        return self._ready, self._reason


def build_app(
    settings: McpFaceSettings,
    gateway_channel: aio.Channel,
    health_channel: aio.Channel,
) -> tuple[Starlette, Readiness]:
    """The ASGI application: the MCP endpoint behind BearerGate, /healthz and /readyz."""
    stub = gateway_pb2_grpc.GatewayStub(gateway_channel)
    tokens = TokenCheck(
        stub,
        cache_s=settings.token_cache_s,
        cache_size=settings.token_cache_size,
        timeout_s=settings.list_timeout_s,
    )
    face = Face(settings=settings, gateway=stub, tokens=tokens)
    server: Server[Any] = Server(
        "toolmesh",
        version=build_version(),
        title="toolmesh",
        instructions=INSTRUCTIONS,
        on_list_tools=face.list_tools,
        on_call_tool=face.call_tool,
    )
    server.middleware = [UntrustedSpans()]
    sessions = StreamableHTTPSessionManager(
        app=server,
        json_response=True,
        stateless=True,
        security_settings=transport_security(settings),
        max_request_body_size=settings.max_request_bytes,
    )
    readiness = Readiness(health_pb2_grpc.HealthStub(health_channel), settings)
    gate = BearerGate(sessions.handle_request, tokens)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        ready, reason = await readiness.check()
        return JSONResponse({"ready": ready, "reason": reason}, status_code=200 if ready else 503)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with sessions.run():
            yield

    app = Starlette(
        routes=[
            # An ASGI app as the endpoint: the transport answers every method itself.
            Route(settings.path, endpoint=gate),
            Route("/healthz", endpoint=healthz, methods=["GET"]),
            Route("/readyz", endpoint=readyz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    return app, readiness
