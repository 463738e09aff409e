"""Tool backend administration: register, list, remove, and approve drifted contracts.

The router owns the backend registry and enforces tenancy on it (a tenant's backends exist
only for that tenant); the gateway authenticates the operator, checks the scope (``admin`` to
change, ``ops:read`` to list, ``platform:admin`` for shared backends), passes the caller on,
and records every change in the caller's tenant's audit trail, committed before the answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from gateway.access import Access, caller_proto, hop_timeout
from gateway.authn import Principal
from gateway.outbox import KIND_AUDIT
from gateway.reliability import DependencyError, Guard
from services.kit import scopes
from services.kit.audit import FAILURE, SUCCESS, audit_event
from services.kit.context import request_id_var
from services.kit.deadlines import Deadline
from services.kit.errors import abort
from services.kit.tracing import current_trace_id
from toolmesh.common.v1 import audit_pb2
from toolmesh.gateway.v1 import gateway_pb2
from toolmesh.router.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger("toolmesh.gateway.backends")

ROUTER = "router"
_CONTRACTS = ("toolmesh.gateway.v1", "toolmesh.router.v1")


@dataclass
class BackendAdmin:
    router: router_pb2_grpc.RouterStub
    access: Access
    deadline: Callable[[aio.ServicerContext], Deadline]
    guard: Guard

    async def ask(
        self,
        context: aio.ServicerContext,
        scope: str,
        method: Callable[..., Any],
        build: Callable[[Principal], Any],
        audit: tuple[int, str, dict[str, object]] | None = None,
    ) -> Any:
        """Authenticate with ``scope``, ask the router, audit the change (when ``audit`` names
        its action, target and details) whether it succeeded or was refused."""
        deadline = self.deadline(context)
        principal, policy = await self.access.authenticate(context, scope)
        timeout = await hop_timeout(context, deadline, ROUTER)
        try:
            reply = await self.guard.call(ROUTER, method, build(principal), timeout)
        except DependencyError as err:
            if audit is not None and err.tried:
                await self._audit(
                    context,
                    principal=principal,
                    policy_version=policy.version,
                    audit=audit,
                    outcome=FAILURE,
                    error=err.reason,
                )
            await self.access.forward_error(context, err, prefix=False)
        if audit is not None:
            await self._audit(
                context,
                principal=principal,
                policy_version=policy.version,
                audit=audit,
                outcome=SUCCESS,
                error="",
            )
        return reply

    async def _audit(
        self,
        context: aio.ServicerContext,
        *,
        principal: Principal,
        policy_version: str,
        audit: tuple[int, str, dict[str, object]],
        outcome: str,
        error: str,
    ) -> None:
        action, target, details = audit
        event = audit_event(
            action=action,
            tenant=principal.tenant,
            actor=principal.subject,
            target=target,
            outcome=outcome,
            request_id=request_id_var.get(),
            trace_id=current_trace_id(),
            policy_version=policy_version,
            contract_versions=_CONTRACTS,
            details={**details, **({"error": error} if error else {})},
        )
        await self.access.put_refusal(context, [(KIND_AUDIT, event.event_id, event)])

    async def RegisterBackend(
        self, request: gateway_pb2.RegisterBackendRequest, context: aio.ServicerContext
    ) -> gateway_pb2.RegisterBackendResponse:
        backend = request.backend
        kind = router_pb2.BackendKind.Name(backend.kind) if backend.kind else "unspecified"
        reply = await self.ask(
            context,
            # A shared backend reaches every tenant: the platform operator's to register.
            scopes.PLATFORM_ADMIN if request.shared else scopes.ADMIN,
            self.router.RegisterBackend,
            lambda principal: router_pb2.RegisterBackendRequest(
                caller=caller_proto(principal), backend=backend, shared=request.shared
            ),
            (
                audit_pb2.AUDIT_ACTION_BACKEND_REGISTER,
                backend.name,
                {"kind": kind, "shared": request.shared},
            ),
        )
        return gateway_pb2.RegisterBackendResponse(backend=reply.backend)

    async def ListBackends(
        self, request: gateway_pb2.ListBackendsRequest, context: aio.ServicerContext
    ) -> gateway_pb2.ListBackendsResponse:
        reply = await self.ask(
            context,
            scopes.OPS_READ,
            self.router.ListBackends,
            lambda principal: router_pb2.ListBackendsRequest(caller=caller_proto(principal)),
        )
        return gateway_pb2.ListBackendsResponse(backends=reply.backends)

    async def RemoveBackend(
        self, request: gateway_pb2.RemoveBackendRequest, context: aio.ServicerContext
    ) -> gateway_pb2.RemoveBackendResponse:
        if not request.name:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "name: required")
        await self.ask(
            context,
            scopes.ADMIN,
            self.router.RemoveBackend,
            lambda principal: router_pb2.RemoveBackendRequest(
                caller=caller_proto(principal), name=request.name
            ),
            (audit_pb2.AUDIT_ACTION_BACKEND_REMOVE, request.name, {}),
        )
        return gateway_pb2.RemoveBackendResponse()

    async def ListToolVersions(
        self, request: gateway_pb2.ListToolVersionsRequest, context: aio.ServicerContext
    ) -> gateway_pb2.ListToolVersionsResponse:
        reply = await self.ask(
            context,
            scopes.TOOLS_READ,
            self.router.ListToolVersions,
            lambda principal: router_pb2.ListToolVersionsRequest(
                caller=caller_proto(principal), tool_name=request.tool_name
            ),
        )
        return gateway_pb2.ListToolVersionsResponse(versions=reply.versions)

    async def ApproveToolVersion(
        self, request: gateway_pb2.ApproveToolVersionRequest, context: aio.ServicerContext
    ) -> gateway_pb2.ApproveToolVersionResponse:
        reply = await self.ask(
            context,
            scopes.ADMIN,
            self.router.ApproveToolVersion,
            lambda principal: router_pb2.ApproveToolVersionRequest(
                caller=caller_proto(principal),
                tool_name=request.tool_name,
                fingerprint=request.fingerprint,
                version=request.version,
            ),
            (
                audit_pb2.AUDIT_ACTION_TOOL_APPROVE,
                f"{request.tool_name}@{request.version}",
                {"fingerprint": request.fingerprint},
            ),
        )
        return gateway_pb2.ApproveToolVersionResponse(version=reply.version)
