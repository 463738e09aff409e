"""The policy file seeds a fresh install's database once; roles grant their scopes."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from services.auth.policy import load_policy
from services.auth.settings import PACKAGED_POLICY
from services.kit.server import StartupRefused
from tests.unit.auth.conftest import AuthServer, code_of, make_settings
from toolmesh.auth.v1 import auth_pb2


def test_packaged_policy_has_the_standard_roles() -> None:
    policy = load_policy(PACKAGED_POLICY)
    assert policy.roles["reader"] == ["tools:read"]
    assert policy.roles["writer"] == ["tools:read", "tools:write"]
    assert policy.roles["operator"] == ["ops:read"]
    assert set(policy.roles["admin"]) == {"tools:read", "tools:write", "ops:read", "admin"}
    assert policy.tenants["dev"].allowed_tools == ["*"]


async def test_the_file_seeds_an_empty_database_once_then_is_ignored(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    server = await AuthServer(settings).start()
    try:
        first = await server.stub.GetPolicy(auth_pb2.GetPolicyRequest())
    finally:
        await server.stop()
    assert (first.version, first.policy_version) == ("1", 1)
    assert [(t.tenant, list(t.allowed_tools)) for t in first.tenants] == [("dev", ["*"])]
    assert {r.role for r in first.roles} >= {"reader", "writer", "admin"}

    # An edit of the file after the import changes nothing: the database holds the policy.
    settings.policy_file.write_text(
        PACKAGED_POLICY.read_text() + '\n[tenants.acme]\nallowed_tools = ["weather"]\n'
    )
    server = await AuthServer(settings).start()
    try:
        again = await server.stub.GetPolicy(auth_pb2.GetPolicyRequest())
    finally:
        await server.stop()
    assert again == first


async def test_roles_grant_their_policy_scopes(auth: AuthServer) -> None:
    admin = await auth.admin()
    created = await auth.stub.CreateClient(
        auth_pb2.CreateClientRequest(tenant="dev", roles=["reader"]), metadata=admin
    )
    request = auth_pb2.IssueTokenRequest(
        client_id=created.client.client_id,
        client_secret=created.client_secret,
        scopes=["tools:read"],
    )
    await auth.stub.IssueToken(request)
    request.scopes.append("tools:write")
    code, details = await code_of(auth.stub.IssueToken(request))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "tools:write" in details


async def test_a_seed_file_with_an_entry_the_api_would_refuse_stops_the_first_start(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path / "data")
    settings.policy_file.write_text(
        PACKAGED_POLICY.read_text() + '\n[tenants.acme]\nallowed_tools = ["ti*me"]\n'
    )
    with pytest.raises(StartupRefused, match=r"TOOLMESH_AUTH_POLICY_FILE: "):
        await AuthServer(settings).start()
