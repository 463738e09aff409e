"""GetPolicy serves the versioned policy file and follows its changes; a broken edit is kept out."""

from __future__ import annotations

import logging
import os

import grpc
import pytest

from services.auth.policy import load_policy
from services.auth.settings import PACKAGED_POLICY
from tests.unit.auth.conftest import AuthServer, code_of
from toolmesh.auth.v1 import auth_pb2


def test_packaged_policy_has_the_standard_roles() -> None:
    policy = load_policy(PACKAGED_POLICY)
    assert policy.roles["reader"] == ["tools:read"]
    assert policy.roles["writer"] == ["tools:read", "tools:write"]
    assert policy.roles["operator"] == ["ops:read"]
    assert set(policy.roles["admin"]) == {"tools:read", "tools:write", "ops:read", "admin"}
    assert policy.tenants["dev"].allowed_tools == ["*"]


def _bump_mtime(path: os.PathLike[str]) -> None:
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


async def test_policy_reloads_on_change_and_keeps_the_last_good_one(
    auth: AuthServer, caplog: pytest.LogCaptureFixture
) -> None:
    first = await auth.stub.GetPolicy(auth_pb2.GetPolicyRequest())
    assert first.version == load_policy(PACKAGED_POLICY).version
    assert [(t.tenant, list(t.allowed_tools)) for t in first.tenants] == [("dev", ["*"])]

    path = auth.settings.policy_file
    path.write_text(
        PACKAGED_POLICY.read_text().replace(first.version, "v-next")
        + '\n[tenants.acme]\nallowed_tools = ["weather"]\n'
    )
    _bump_mtime(path)
    second = await auth.stub.GetPolicy(auth_pb2.GetPolicyRequest())
    assert second.version == "v-next"
    assert [t.tenant for t in second.tenants] == ["acme", "dev"]

    caplog.set_level(logging.ERROR, logger="toolmesh.auth.policy")
    path.write_text('version = "broken"\n[roles\n')
    _bump_mtime(path)
    third = await auth.stub.GetPolicy(auth_pb2.GetPolicyRequest())
    assert third.version == "v-next"
    assert any("policy file invalid" in r.getMessage() for r in caplog.records)


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
