"""Prompt template versions: list and show (``ops:read``), publish and select (``admin``;
``platform:admin`` for a shared, platform-wide version), passed to the router, which owns the
versions and enforces tenancy. Every publication and selection is audited in the caller's
tenant's trail (``prompt.publish``, ``prompt.select``), whether it succeeded or was refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from grpc import aio

from gateway.access import caller_proto
from gateway.backends import BackendAdmin
from services.kit import scopes
from toolmesh.common.v1 import audit_pb2
from toolmesh.gateway.v1 import gateway_pb2
from toolmesh.router.v1 import router_pb2


@dataclass
class PromptAdmin:
    # Its ``ask`` authenticates with a scope, asks the router and audits the change.
    admin: BackendAdmin

    async def ListPrompts(
        self, request: gateway_pb2.ListPromptsRequest, context: aio.ServicerContext
    ) -> gateway_pb2.ListPromptsResponse:
        reply = await self.admin.ask(
            context,
            scopes.OPS_READ,
            self.admin.router.ListPrompts,
            lambda principal: router_pb2.ListPromptsRequest(
                caller=caller_proto(principal), name=request.name
            ),
        )
        return gateway_pb2.ListPromptsResponse(versions=reply.versions)

    async def GetPrompt(
        self, request: gateway_pb2.GetPromptRequest, context: aio.ServicerContext
    ) -> gateway_pb2.GetPromptResponse:
        reply = await self.admin.ask(
            context,
            scopes.OPS_READ,
            self.admin.router.GetPrompt,
            lambda principal: router_pb2.GetPromptRequest(
                caller=caller_proto(principal), name=request.name, version=request.version
            ),
        )
        return gateway_pb2.GetPromptResponse(version=reply.version)

    async def PublishPrompt(
        self, request: gateway_pb2.PublishPromptRequest, context: aio.ServicerContext
    ) -> gateway_pb2.PublishPromptResponse:
        template_sha256 = hashlib.sha256(request.template.encode()).hexdigest()
        reply = await self.admin.ask(
            context,
            scopes.PLATFORM_ADMIN if request.shared else scopes.ADMIN,
            self.admin.router.PublishPrompt,
            lambda principal: router_pb2.PublishPromptRequest(
                caller=caller_proto(principal),
                name=request.name,
                template=request.template,
                params_json=request.params_json,
                shared=request.shared,
                keep_selection=request.keep_selection,
            ),
            (
                audit_pb2.AUDIT_ACTION_PROMPT_PUBLISH,
                request.name[:64],
                {
                    "shared": request.shared,
                    "template_sha256": template_sha256,
                    "selected": not request.keep_selection,
                },
            ),
        )
        return gateway_pb2.PublishPromptResponse(version=reply.version, created=reply.created)

    async def SelectPrompt(
        self, request: gateway_pb2.SelectPromptRequest, context: aio.ServicerContext
    ) -> gateway_pb2.SelectPromptResponse:
        reply = await self.admin.ask(
            context,
            scopes.PLATFORM_ADMIN if request.shared else scopes.ADMIN,
            self.admin.router.SelectPrompt,
            lambda principal: router_pb2.SelectPromptRequest(
                caller=caller_proto(principal),
                name=request.name,
                version=request.version,
                shared=request.shared,
            ),
            (
                audit_pb2.AUDIT_ACTION_PROMPT_SELECT,
                f"{request.name[:64]}@{request.version}",
                {"shared": request.shared},
            ),
        )
        return gateway_pb2.SelectPromptResponse(version=reply.version)
