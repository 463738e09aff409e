"""Tenants and their allowlists by API: every change a new policy version, served by GetPolicy
at once; a tenant admin manages its own tenant only; roles are the platform operator's."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from tests.unit.auth.conftest import AuthServer, bearer, code_of, make_settings
from toolmesh.auth.v1 import auth_pb2


async def _tenant_admin(auth: AuthServer, tenant: str) -> list[tuple[str, str]]:
    """A token of an admin (role admin, no platform:admin) of ``tenant``."""
    platform = await auth.admin()
    created = await auth.stub.CreateClient(
        auth_pb2.CreateClientRequest(tenant=tenant, roles=["admin"]), metadata=platform
    )
    issued = await auth.stub.IssueToken(
        auth_pb2.IssueTokenRequest(
            client_id=created.client.client_id, client_secret=created.client_secret
        )
    )
    assert "platform:admin" not in issued.scopes
    return bearer(issued.access_token)


async def _allowlists(auth: AuthServer) -> tuple[int, dict[str, list[str]]]:
    policy = await auth.stub.GetPolicy(auth_pb2.GetPolicyRequest())
    assert policy.version == str(policy.policy_version)
    return policy.policy_version, {t.tenant: list(t.allowed_tools) for t in policy.tenants}


async def test_each_change_is_a_new_version_served_at_once(auth: AuthServer) -> None:
    platform = await auth.admin()
    start, _ = await _allowlists(auth)

    created = await auth.stub.CreateTenant(
        auth_pb2.CreateTenantRequest(tenant="acme", allowed_tools=["calculator"]),
        metadata=platform,
    )
    assert created.policy_version == start + 1
    assert created.tenant.changed_in_version == start + 1
    assert await _allowlists(auth) == (start + 1, {"dev": ["*"], "acme": ["calculator"]})

    allowed = await auth.stub.AllowTools(
        auth_pb2.AllowToolsRequest(tenant="acme", tools=["time.*", "calculator"]),
        metadata=platform,
    )
    assert (allowed.policy_version, allowed.changed) == (start + 2, True)
    assert list(allowed.tenant.allowed_tools) == ["calculator", "time.*"]

    # Nothing to change: no new version.
    again = await auth.stub.AllowTools(
        auth_pb2.AllowToolsRequest(tenant="acme", tools=["time.*"]), metadata=platform
    )
    assert (again.policy_version, again.changed) == (start + 2, False)

    # A deny that a pattern would undo is refused, naming the pattern.
    code, details = await code_of(
        auth.stub.DenyTools(
            auth_pb2.DenyToolsRequest(tenant="acme", tools=["time.get_current_time"]),
            metadata=platform,
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "time.*" in details

    denied = await auth.stub.DenyTools(
        auth_pb2.DenyToolsRequest(tenant="acme", tools=["time.*"]), metadata=platform
    )
    assert (denied.policy_version, list(denied.tenant.allowed_tools)) == (
        start + 3,
        ["calculator"],
    )
    assert await _allowlists(auth) == (start + 3, {"dev": ["*"], "acme": ["calculator"]})

    listed = await auth.stub.ListTenants(auth_pb2.ListTenantsRequest(), metadata=platform)
    assert [t.tenant for t in listed.tenants] == ["acme", "dev"]
    assert listed.policy_version == start + 3


async def test_caller_mistakes_name_the_field(auth: AuthServer) -> None:
    platform = await auth.admin()
    cases = [
        (auth.stub.CreateTenant(auth_pb2.CreateTenantRequest(), metadata=platform), "tenant"),
        (
            auth.stub.CreateTenant(auth_pb2.CreateTenantRequest(tenant="Acme!"), metadata=platform),
            "tenant",
        ),
        (
            auth.stub.AllowTools(
                auth_pb2.AllowToolsRequest(tenant="dev", tools=["ti*me"]), metadata=platform
            ),
            "tools[0]",
        ),
        (auth.stub.AllowTools(auth_pb2.AllowToolsRequest(), metadata=platform), "tools"),
        (
            auth.stub.SetRole(
                auth_pb2.SetRoleRequest(role="x", scopes=["Bad Scope"]), metadata=platform
            ),
            "scopes[0]",
        ),
    ]
    for call, field in cases:
        code, details = await code_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert field in details
    code, _ = await code_of(
        auth.stub.CreateTenant(auth_pb2.CreateTenantRequest(tenant="dev"), metadata=platform)
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, details = await code_of(
        auth.stub.AllowTools(
            auth_pb2.AllowToolsRequest(tenant="nobody", tools=["calculator"]), metadata=platform
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND and "nobody" in details


async def test_a_tenant_admin_manages_its_own_tenant_only(auth: AuthServer) -> None:
    platform = await auth.admin()
    await auth.stub.CreateTenant(auth_pb2.CreateTenantRequest(tenant="acme"), metadata=platform)
    admin = await _tenant_admin(auth, "acme")

    own = await auth.stub.AllowTools(
        auth_pb2.AllowToolsRequest(tools=["calculator"]), metadata=admin
    )
    assert (own.tenant.tenant, list(own.tenant.allowed_tools)) == ("acme", ["calculator"])
    shown = await auth.stub.GetTenant(auth_pb2.GetTenantRequest(), metadata=admin)
    assert shown.tenant.tenant == "acme"
    listed = await auth.stub.ListTenants(auth_pb2.ListTenantsRequest(), metadata=admin)
    assert [t.tenant for t in listed.tenants] == ["acme"]

    version, before = await _allowlists(auth)
    for call in (
        auth.stub.CreateTenant(auth_pb2.CreateTenantRequest(tenant="other"), metadata=admin),
        auth.stub.AllowTools(
            auth_pb2.AllowToolsRequest(tenant="dev", tools=["calculator"]), metadata=admin
        ),
        auth.stub.DenyTools(auth_pb2.DenyToolsRequest(tenant="dev", tools=["*"]), metadata=admin),
        auth.stub.GetTenant(auth_pb2.GetTenantRequest(tenant="dev"), metadata=admin),
        auth.stub.SetRole(
            auth_pb2.SetRoleRequest(role="admin", scopes=["platform:admin"]), metadata=admin
        ),
    ):
        code, _ = await code_of(call)
        assert code == grpc.StatusCode.PERMISSION_DENIED
    assert await _allowlists(auth) == (version, before)


async def test_a_role_set_by_the_platform_grants_its_scopes(auth: AuthServer) -> None:
    platform = await auth.admin()
    role = await auth.stub.SetRole(
        auth_pb2.SetRoleRequest(role="auditor", scopes=["ops:read"]), metadata=platform
    )
    assert role.changed
    created = await auth.stub.CreateClient(
        auth_pb2.CreateClientRequest(tenant="dev", roles=["auditor"]), metadata=platform
    )
    issued = await auth.stub.IssueToken(
        auth_pb2.IssueTokenRequest(
            client_id=created.client.client_id, client_secret=created.client_secret
        )
    )
    assert list(issued.scopes) == ["ops:read"]
    policy = await auth.stub.GetPolicy(auth_pb2.GetPolicyRequest())
    assert policy.policy_version == role.policy_version
    assert {r.role: list(r.scopes) for r in policy.roles}["auditor"] == ["ops:read"]


@pytest.mark.postgres
async def test_replicas_changing_at_once_make_distinct_versions(
    tmp_path: Path, postgres_url: str
) -> None:
    settings = make_settings(tmp_path / "data", database_url=postgres_url)
    a, b = await asyncio.gather(AuthServer(settings).start(), AuthServer(settings).start())
    try:
        platform = await a.admin()
        await a.stub.CreateTenant(auth_pb2.CreateTenantRequest(tenant="acme"), metadata=platform)
        start, _ = await _allowlists(a)
        tools = [f"tool{i}" for i in range(8)]
        replies = await asyncio.gather(
            *(
                (a if i % 2 else b).stub.AllowTools(
                    auth_pb2.AllowToolsRequest(tenant="acme", tools=[tool]), metadata=platform
                )
                for i, tool in enumerate(tools)
            )
        )
        versions = sorted(reply.policy_version for reply in replies)
        assert versions == list(range(start + 1, start + 1 + len(tools)))
        # Each replica serves the latest version, with no change lost.
        for server in (a, b):
            version, allowlists = await _allowlists(server)
            assert version == start + len(tools)
            assert sorted(allowlists["acme"]) == sorted(tools)
    finally:
        await asyncio.gather(a.stop(), b.stop())
