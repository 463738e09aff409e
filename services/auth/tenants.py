"""The tenant and policy half of the admin RPCs: tenants, their tool allowlists, roles.

The policy lives in auth's database (services.auth.policy_store). Scope ``admin`` reads and
changes its own tenant's allowlist; ``platform:admin`` any tenant's, creates tenants and sets
roles (shared by every tenant). Every change is a new policy version, committed with a version
row naming who changed what and its audit event (carrying the new version), written to auth's
outbox table in the same transaction: the change and its record commit together or not at all.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import NoReturn

import grpc
from grpc import aio
from sqlalchemy.ext.asyncio import AsyncSession

from services.auth import validation
from services.auth.access import Actor
from services.auth.admin import AdminRpcs
from services.auth.audit import Staged
from services.auth.conversions import timestamp
from services.auth.models import RoleRow, TenantRow
from services.auth.policy_store import Change, Mutation, tools_of
from services.auth.store import Conflict, NotFound, WrongState
from services.kit.allowlist import entry_problem, tool_allowed
from services.kit.audit import AuditAction, action_name
from services.kit.errors import abort, abort_invalid
from services.kit.scopes import PLATFORM_ADMIN
from toolmesh.auth.v1 import auth_pb2

TENANT_CREATE = AuditAction.AUDIT_ACTION_ADMIN_TENANT_CREATE
TENANT_ALLOW = AuditAction.AUDIT_ACTION_ADMIN_TENANT_ALLOW
TENANT_DENY = AuditAction.AUDIT_ACTION_ADMIN_TENANT_DENY
ROLE_SET = AuditAction.AUDIT_ACTION_ADMIN_ROLE_SET
TENANT_READ = AuditAction.AUDIT_ACTION_ADMIN_TENANT_READ
# Generous for an allowlist; bounds the work one request can ask for.
MAX_TOOLS = 256


def tenant_pb(row: TenantRow) -> auth_pb2.Tenant:
    return auth_pb2.Tenant(
        tenant=row.tenant,
        allowed_tools=tools_of(row),
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
        changed_in_version=row.changed_in_version,
    )


def tool_violations(tools: Sequence[str], *, required: bool) -> validation.Violations:
    if required and not tools:
        return [("tools", "give at least one tool name, <backend>.* or *")]
    if len(tools) > MAX_TOOLS:
        return [("tools", f"at most {MAX_TOOLS} entries")]
    return [
        (f"tools[{i}]", problem)
        for i, tool in enumerate(tools)
        if (problem := entry_problem(tool)) is not None
    ]


class TenantRpcs(AdminRpcs):
    async def CreateTenant(
        self, request: auth_pb2.CreateTenantRequest, context: aio.ServicerContext
    ) -> auth_pb2.CreateTenantResponse:
        actor = await self._admin(context, TENANT_CREATE, scope=PLATFORM_ADMIN)
        violations = [
            *validation.tenant(request.tenant),
            *tool_violations(request.allowed_tools, required=False),
        ]
        if not request.tenant:
            violations.insert(0, ("tenant", "required, the new tenant's name"))
        if violations:
            await abort_invalid(context, violations)
        tools = list(dict.fromkeys(request.allowed_tools))

        async def create(session: AsyncSession, version: int) -> Change:
            if await session.get(TenantRow, request.tenant) is not None:
                raise Conflict(f"tenant {request.tenant} already exists")
            now = time.time()
            session.add(
                TenantRow(
                    tenant=request.tenant,
                    allowed_tools=json.dumps(tools),
                    created_at=now,
                    updated_at=now,
                    changed_in_version=version,
                )
            )
            return Change({"tenant": request.tenant, "allowed_tools": tools})

        row, version, _ = await self._change_tools(
            context,
            actor=actor,
            action=TENANT_CREATE,
            tenant=request.tenant,
            tools=tools,
            mutate=create,
        )
        return auth_pb2.CreateTenantResponse(tenant=tenant_pb(row), policy_version=version)

    async def ListTenants(
        self, request: auth_pb2.ListTenantsRequest, context: aio.ServicerContext
    ) -> auth_pb2.ListTenantsResponse:
        actor = await self._admin(context, TENANT_READ)
        # Every tenant for the platform operator, its own for a tenant admin.
        rows, version = await self._policies.tenants("" if actor.platform else actor.tenant)
        return auth_pb2.ListTenantsResponse(
            tenants=[tenant_pb(row) for row in rows], policy_version=version
        )

    async def GetTenant(
        self, request: auth_pb2.GetTenantRequest, context: aio.ServicerContext
    ) -> auth_pb2.GetTenantResponse:
        actor = await self._admin(context, TENANT_READ)
        violations = validation.tenant(request.tenant)
        if violations:
            await abort_invalid(context, violations)
        tenant = await self._acting_tenant(context, actor, TENANT_READ, request.tenant)
        rows, version = await self._policies.tenants(tenant)
        if not rows:
            await self._missing_tenant(context, tenant)
        return auth_pb2.GetTenantResponse(tenant=tenant_pb(rows[0]), policy_version=version)

    async def AllowTools(
        self, request: auth_pb2.AllowToolsRequest, context: aio.ServicerContext
    ) -> auth_pb2.AllowToolsResponse:
        actor = await self._admin(context, TENANT_ALLOW)
        violations = [
            *validation.tenant(request.tenant),
            *tool_violations(request.tools, required=True),
        ]
        if violations:
            await abort_invalid(context, violations)
        tenant = await self._acting_tenant(context, actor, TENANT_ALLOW, request.tenant)
        wanted = list(dict.fromkeys(request.tools))

        async def allow(session: AsyncSession, version: int) -> Change:
            row = await _tenant_for_update(session, tenant)
            current = tools_of(row)
            added = [tool for tool in wanted if tool not in current]
            if not added:
                return Change(None)
            row.allowed_tools = json.dumps(current + added)
            row.updated_at = time.time()
            row.changed_in_version = version
            return Change({"tenant": tenant, "added": added})

        row, version, changed = await self._change_tools(
            context, actor=actor, action=TENANT_ALLOW, tenant=tenant, tools=wanted, mutate=allow
        )
        return auth_pb2.AllowToolsResponse(
            tenant=tenant_pb(row), policy_version=version, changed=changed
        )

    async def DenyTools(
        self, request: auth_pb2.DenyToolsRequest, context: aio.ServicerContext
    ) -> auth_pb2.DenyToolsResponse:
        actor = await self._admin(context, TENANT_DENY)
        violations = [
            *validation.tenant(request.tenant),
            *tool_violations(request.tools, required=True),
        ]
        if violations:
            await abort_invalid(context, violations)
        tenant = await self._acting_tenant(context, actor, TENANT_DENY, request.tenant)
        unwanted = list(dict.fromkeys(request.tools))

        async def deny(session: AsyncSession, version: int) -> Change:
            row = await _tenant_for_update(session, tenant)
            current = tools_of(row)
            remaining = [tool for tool in current if tool not in unwanted]
            for tool in unwanted:
                covering = next((e for e in remaining if tool_allowed(tool, [e])), None)
                if covering is not None:
                    raise WrongState(
                        f"{tool} stays allowed by {covering}: deny {covering} too and allow "
                        "the tools to keep one by one"
                    )
            removed = [tool for tool in current if tool in unwanted]
            if not removed:
                return Change(None)
            row.allowed_tools = json.dumps(remaining)
            row.updated_at = time.time()
            row.changed_in_version = version
            return Change({"tenant": tenant, "removed": removed})

        row, version, changed = await self._change_tools(
            context, actor=actor, action=TENANT_DENY, tenant=tenant, tools=unwanted, mutate=deny
        )
        return auth_pb2.DenyToolsResponse(
            tenant=tenant_pb(row), policy_version=version, changed=changed
        )

    async def SetRole(
        self, request: auth_pb2.SetRoleRequest, context: aio.ServicerContext
    ) -> auth_pb2.SetRoleResponse:
        actor = await self._admin(context, ROLE_SET, scope=PLATFORM_ADMIN)
        violations = [
            *validation.tenant(request.role, "role"),
            *validation.names("scopes", request.scopes),
        ]
        if not request.role:
            violations.insert(0, ("role", "required"))
        if violations:
            await abort_invalid(context, violations)
        scopes = list(dict.fromkeys(request.scopes))

        async def set_role(session: AsyncSession, version: int) -> Change:
            row = await session.get(RoleRow, request.role, with_for_update=True)
            if row is not None and row.scopes.split() == scopes:
                return Change(None)
            if row is None:
                row = RoleRow(role=request.role)
                session.add(row)
            previous = row.scopes.split() if row.scopes else []
            row.scopes = " ".join(scopes)
            row.updated_at = time.time()
            row.changed_in_version = version
            return Change({"role": request.role, "scopes": scopes, "previous": previous})

        staged: Staged[int] = self._staged_change(
            ROLE_SET,
            actor,
            lambda _version: (request.role, actor.tenant),
            details=lambda version: {"scopes": scopes, "policy_version": version},
            policy_version=str,
        )
        version, changed = await self._run_store(
            context,
            ROLE_SET,
            actor,
            request.role,
            self._policies.change(actor.subject, action_name(ROLE_SET), set_role, staged.items),
        )
        if changed:
            staged.committed()
        await self._policy.fresh(force=True)
        return auth_pb2.SetRoleResponse(
            role=auth_pb2.RoleScopes(role=request.role, scopes=scopes),
            policy_version=version,
            changed=changed,
        )

    # --- helpers --------------------------------------------------------------------------

    async def _change_tools(
        self,
        context: aio.ServicerContext,
        *,
        actor: Actor,
        action: int,
        tenant: str,
        tools: list[str],
        mutate: Mutation,
    ) -> tuple[TenantRow, int, bool]:
        """Run a tenant change as a new policy version, refresh this replica's copy, audit it
        in the tenant (and the operator's tenant when it is another); the row as it stands."""
        staged: Staged[int] = self._staged_change(
            action,
            actor,
            lambda _version: (tenant, tenant),
            details=lambda version: {"tools": tools, "policy_version": version},
            policy_version=str,
        )
        version, changed = await self._run_store(
            context,
            action,
            actor,
            tenant,
            self._policies.change(actor.subject, action_name(action), mutate, staged.items),
        )
        if changed:
            staged.committed()
        await self._policy.fresh(force=True)
        rows, _ = await self._policies.tenants(tenant)
        if not rows:
            await self._missing_tenant(context, tenant)
        return rows[0], version, changed

    async def _missing_tenant(self, context: aio.ServicerContext, tenant: str) -> NoReturn:
        await abort(
            context,
            grpc.StatusCode.NOT_FOUND,
            f"no tenant {tenant}: a platform operator creates it (toolmesh tenants create)",
        )


async def _tenant_for_update(session: AsyncSession, tenant: str) -> TenantRow:
    row = await session.get(TenantRow, tenant, with_for_update=True)
    if row is None:
        raise NotFound(
            f"no tenant {tenant}: a platform operator creates it (toolmesh tenants create)"
        )
    return row
