"""The Gateway servicer: one thin method per RPC.

Run goes through the governed pipeline (gateway.pipeline, read it top to bottom); the other
RPCs authenticate (gateway.access), validate, and ask one inner service; the operator views
live in gateway.operations.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator

import grpc
from grpc import aio
from pydantic import ValidationError

from gateway.access import Access, caller_proto, client_address, hop_timeout
from gateway.authz import SCOPE_OPS_READ, SCOPE_READ, side_effect_name
from gateway.backends import BackendAdmin
from gateway.clients import Clients
from gateway.operations import Operations
from gateway.pipeline import Pipeline
from gateway.prompts import PromptAdmin
from gateway.releases import ReleaseAdmin
from gateway.reliability import DependencyError, Guard
from gateway.validation import HistoryInput, StatsInput
from services.kit.allowlist import tool_allowed
from services.kit.buildinfo import service_info
from services.kit.context import CLIENT_ADDRESS_METADATA_KEY
from services.kit.errors import abort, abort_invalid, violations_from
from toolmesh.auth.v1 import auth_pb2
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from toolmesh.memory.v1 import memory_pb2
from toolmesh.router.v1 import router_pb2
from toolmesh.telemetry.v1 import telemetry_pb2

log = logging.getLogger("toolmesh.gateway")

CONTRACT_VERSIONS = ["toolmesh.gateway.v1"]


_BACKEND_KINDS: dict[int, str] = {
    router_pb2.BACKEND_KIND_BUILTIN: "builtin",
    router_pb2.BACKEND_KIND_MCP_STDIO: "mcp_stdio",
    router_pb2.BACKEND_KIND_MCP_HTTP: "mcp_http",
    router_pb2.BACKEND_KIND_GRPC: "grpc",
}
_VERSION_STATES: dict[int, str] = {
    router_pb2.TOOL_VERSION_STATE_PUBLISHED: "published",
    router_pb2.TOOL_VERSION_STATE_PENDING: "pending",
    router_pb2.TOOL_VERSION_STATE_RETIRED: "retired",
}


def tool_message(tool: router_pb2.ToolContract, state: int) -> gateway_pb2.Tool:
    return gateway_pb2.Tool(
        name=tool.name,
        version=tool.version,
        description=tool.description,
        side_effect=side_effect_name(tool.side_effect),
        cost_units=tool.cost_units,
        timeout_ms=tool.timeout_ms,
        input_schema_json=tool.input_schema_json,
        output_schema_json=tool.output_schema_json,
        backend=tool.backend,
        backend_kind=_BACKEND_KINDS.get(tool.backend_kind, "builtin"),
        fingerprint=tool.fingerprint,
        state=_VERSION_STATES.get(state, "published"),
    )


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(
        self,
        *,
        pipeline: Pipeline,
        access: Access,
        clients: Clients,
        guard: Guard,
        operations: Operations,
        backends: BackendAdmin,
    ) -> None:
        self._pipeline = pipeline
        self._access = access
        self._clients = clients
        self._guard = guard
        self._operations = operations
        self._backends = backends
        self._prompts = PromptAdmin(backends)
        self._releases = ReleaseAdmin(backends)

    async def Run(
        self, request: gateway_pb2.RunRequest, context: aio.ServicerContext
    ) -> gateway_pb2.RunResponse:
        return await self._pipeline.run(request, context)

    async def RunStream(
        self, request: gateway_pb2.RunStreamRequest, context: aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.RunStreamResponse]:
        async for event in self._pipeline.run_stream(request, context):
            yield event

    async def CallTool(
        self, request: gateway_pb2.CallToolRequest, context: aio.ServicerContext
    ) -> gateway_pb2.CallToolResponse:
        return await self._pipeline.call_tool(request, context)

    # -- the other RPCs -----------------------------------------------------------------------

    async def ListTools(
        self, request: gateway_pb2.ListToolsRequest, context: aio.ServicerContext
    ) -> gateway_pb2.ListToolsResponse:
        """The tools on the caller's allowlist (built-in, shared and its tenant's backends), or
        with ``versions_of`` one tool's contract history; an empty allowlist never asks."""
        deadline = self._pipeline.deadline(context)
        if len(request.versions_of) > 200:
            await abort_invalid(context, [("versions_of", "at most 200 characters")])
        principal, policy = await self._access.authenticate(context, SCOPE_READ)
        allowed = policy.allowed_tools(principal.tenant)
        if not allowed or (request.versions_of and not tool_allowed(request.versions_of, allowed)):
            return gateway_pb2.ListToolsResponse()
        timeout = await hop_timeout(context, deadline, "router")
        caller = caller_proto(principal)
        try:
            if request.versions_of:
                history = await self._guard.call(
                    "router",
                    self._clients.router.ListToolVersions,
                    router_pb2.ListToolVersionsRequest(
                        caller=caller, tool_name=request.versions_of
                    ),
                    timeout,
                )
                return gateway_pb2.ListToolsResponse(
                    tools=[tool_message(v.contract, v.state) for v in history.versions]
                )
            reply = await self._guard.call(
                "router",
                self._clients.router.ListTools,
                router_pb2.ListToolsRequest(allowed_tools=sorted(allowed), caller=caller),
                timeout,
            )
        except DependencyError as err:
            await self._access.forward_error(context, err)
        return gateway_pb2.ListToolsResponse(
            tools=[tool_message(t, router_pb2.TOOL_VERSION_STATE_PUBLISHED) for t in reply.tools]
        )

    async def GetHistory(
        self, request: gateway_pb2.GetHistoryRequest, context: aio.ServicerContext
    ) -> gateway_pb2.GetHistoryResponse:
        """A session's turns, always within the caller's own tenant (memory scopes by caller)."""
        deadline = self._pipeline.deadline(context)
        try:
            query = HistoryInput(session_id=request.session_id, limit=request.limit)
        except ValidationError as exc:
            await abort_invalid(context, violations_from(exc))
        principal, _ = await self._access.authenticate(context, SCOPE_READ)
        timeout = await hop_timeout(context, deadline, "memory")
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
            await self._access.forward_error(context, err)
        if not reply.turns:
            # No turns for this tenant: the same answer whether the session does not exist or
            # belongs to another tenant, so a caller learns nothing about other tenants.
            await abort(context, grpc.StatusCode.NOT_FOUND, "no such session")
        return gateway_pb2.GetHistoryResponse(turns=reply.turns)

    async def IssueToken(
        self, request: gateway_pb2.IssueTokenRequest, context: aio.ServicerContext
    ) -> gateway_pb2.IssueTokenResponse:
        """Forwarded to auth as is; auth's status codes and details reach the caller unchanged."""
        deadline = self._pipeline.deadline(context)
        timeout = await hop_timeout(context, deadline, "auth")
        try:
            # Auth throttles wrong secrets per client and source address, and trusts this
            # header only from the gateway's certificate.
            issue = functools.partial(
                self._clients.auth.IssueToken,
                metadata=((CLIENT_ADDRESS_METADATA_KEY, client_address(context)),),
            )
            reply = await self._guard.call(
                "auth",
                issue,
                auth_pb2.IssueTokenRequest(
                    client_id=request.client_id,
                    client_secret=request.client_secret,
                    scopes=request.scopes,
                ),
                timeout,
            )
        except DependencyError as err:
            await self._access.forward_error(context, err, prefix=False)
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
        deadline = self._pipeline.deadline(context)
        try:
            query = StatsInput(window_seconds=request.window_seconds, service=request.service)
        except ValidationError as exc:
            await abort_invalid(context, violations_from(exc))
        principal, _ = await self._access.authenticate(context, SCOPE_OPS_READ)
        timeout = await hop_timeout(context, deadline, "telemetry")
        try:
            reply = await self._guard.call(
                "telemetry",
                self._clients.telemetry.GetStats,
                telemetry_pb2.GetStatsRequest(
                    group_by=request.group_by,
                    window_seconds=query.window_seconds,
                    service=query.service,
                    caller=caller_proto(principal),
                ),
                timeout,
            )
        except DependencyError as err:
            await self._access.forward_error(context, err)
        return gateway_pb2.GetStatsResponse(rows=reply.rows)

    async def GetServiceInfo(
        self, request: gateway_pb2.GetServiceInfoRequest, context: aio.ServicerContext
    ) -> gateway_pb2.GetServiceInfoResponse:
        """Any valid token may ask; only IssueToken is open to unauthenticated callers."""
        await self._access.authenticate(context)
        return gateway_pb2.GetServiceInfoResponse(info=service_info("gateway", CONTRACT_VERSIONS))

    # -- operator views, in gateway.operations --------------------------------------------------

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

    async def CheckpointAudit(
        self, request: gateway_pb2.CheckpointAuditRequest, context: aio.ServicerContext
    ) -> gateway_pb2.CheckpointAuditResponse:
        return await self._operations.CheckpointAudit(request, context)

    async def VerifyAudit(
        self, request: gateway_pb2.VerifyAuditRequest, context: aio.ServicerContext
    ) -> gateway_pb2.VerifyAuditResponse:
        return await self._operations.VerifyAudit(request, context)

    async def GetSlo(
        self, request: gateway_pb2.GetSloRequest, context: aio.ServicerContext
    ) -> gateway_pb2.GetSloResponse:
        return await self._operations.GetSlo(request, context)

    # -- tool backends, in gateway.backends -----------------------------------------------------

    async def RegisterBackend(
        self, request: gateway_pb2.RegisterBackendRequest, context: aio.ServicerContext
    ) -> gateway_pb2.RegisterBackendResponse:
        return await self._backends.RegisterBackend(request, context)

    async def ListBackends(
        self, request: gateway_pb2.ListBackendsRequest, context: aio.ServicerContext
    ) -> gateway_pb2.ListBackendsResponse:
        return await self._backends.ListBackends(request, context)

    async def RemoveBackend(
        self, request: gateway_pb2.RemoveBackendRequest, context: aio.ServicerContext
    ) -> gateway_pb2.RemoveBackendResponse:
        return await self._backends.RemoveBackend(request, context)

    async def ListToolVersions(
        self, request: gateway_pb2.ListToolVersionsRequest, context: aio.ServicerContext
    ) -> gateway_pb2.ListToolVersionsResponse:
        return await self._backends.ListToolVersions(request, context)

    async def ApproveToolVersion(
        self, request: gateway_pb2.ApproveToolVersionRequest, context: aio.ServicerContext
    ) -> gateway_pb2.ApproveToolVersionResponse:
        return await self._backends.ApproveToolVersion(request, context)

    # -- prompt template versions, in gateway.prompts ----------------------------------------

    async def ListPrompts(
        self, request: gateway_pb2.ListPromptsRequest, context: aio.ServicerContext
    ) -> gateway_pb2.ListPromptsResponse:
        return await self._prompts.ListPrompts(request, context)

    async def GetPrompt(
        self, request: gateway_pb2.GetPromptRequest, context: aio.ServicerContext
    ) -> gateway_pb2.GetPromptResponse:
        return await self._prompts.GetPrompt(request, context)

    async def PublishPrompt(
        self, request: gateway_pb2.PublishPromptRequest, context: aio.ServicerContext
    ) -> gateway_pb2.PublishPromptResponse:
        return await self._prompts.PublishPrompt(request, context)

    async def SelectPrompt(
        self, request: gateway_pb2.SelectPromptRequest, context: aio.ServicerContext
    ) -> gateway_pb2.SelectPromptResponse:
        return await self._prompts.SelectPrompt(request, context)

    # -- releases, in gateway.releases ------------------------------------------------------

    async def StartRelease(
        self, request: gateway_pb2.StartReleaseRequest, context: aio.ServicerContext
    ) -> gateway_pb2.StartReleaseResponse:
        return await self._releases.StartRelease(request, context)

    async def GetRelease(
        self, request: gateway_pb2.GetReleaseRequest, context: aio.ServicerContext
    ) -> gateway_pb2.GetReleaseResponse:
        return await self._releases.GetRelease(request, context)

    async def ListReleases(
        self, request: gateway_pb2.ListReleasesRequest, context: aio.ServicerContext
    ) -> gateway_pb2.ListReleasesResponse:
        return await self._releases.ListReleases(request, context)

    async def ControlRelease(
        self, request: gateway_pb2.ControlReleaseRequest, context: aio.ServicerContext
    ) -> gateway_pb2.ControlReleaseResponse:
        return await self._releases.ControlRelease(request, context)
