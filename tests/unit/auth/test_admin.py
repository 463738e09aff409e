"""Admin RPCs: bearer token with scope admin (keys: platform:admin) required; changes audited,
secrets never logged; bad input answered INVALID_ARGUMENT naming the field, with bounded work."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest

from tests.unit.auth.conftest import AuthServer, bearer, code_of
from toolmesh.auth.v1 import auth_pb2

# (method, request, scope it needs)
ADMIN_CALLS: list[tuple[str, Any, str]] = [
    ("CreateClient", auth_pb2.CreateClientRequest(tenant="dev", scopes=["tools:read"]), "admin"),
    ("ListClients", auth_pb2.ListClientsRequest(), "admin"),
    ("DisableClient", auth_pb2.DisableClientRequest(client_id="dev"), "admin"),
    ("DeleteClient", auth_pb2.DeleteClientRequest(client_id="dev"), "admin"),
    ("RotateClientSecret", auth_pb2.RotateClientSecretRequest(client_id="dev"), "admin"),
    ("ListKeys", auth_pb2.ListKeysRequest(), "platform:admin"),
    ("RotateKey", auth_pb2.RotateKeyRequest(), "platform:admin"),
    ("RetireKey", auth_pb2.RetireKeyRequest(kid="x"), "platform:admin"),
    ("RevokeToken", auth_pb2.RevokeTokenRequest(token_id="x"), "admin"),
    ("RevokeClient", auth_pb2.RevokeClientRequest(client_id="dev"), "admin"),
]


def test_every_admin_rpc_is_covered() -> None:
    service = auth_pb2.DESCRIPTOR.services_by_name["Auth"]
    public = {"IssueToken", "GetJwks", "VerifyToken", "GetRevocations", "GetPolicy"}
    admin = {m.name for m in service.methods} - public - {"GetServiceInfo"}
    assert {method for method, _, _ in ADMIN_CALLS} == admin


async def test_admin_rpcs_refuse_callers_without_the_scope(auth: AuthServer) -> None:
    reader = bearer(await auth.token(("tools:read",)))
    tenant_admin = bearer(await auth.token(("admin",)))
    for method, request, scope in ADMIN_CALLS:
        call = getattr(auth.stub, method)
        assert await code_of(call(request)) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "missing bearer token in the authorization metadata",
        ), method
        assert (await code_of(call(request, metadata=bearer("junk"))))[
            0
        ] == grpc.StatusCode.UNAUTHENTICATED, method
        assert await code_of(call(request, metadata=reader)) == (
            grpc.StatusCode.PERMISSION_DENIED,
            f"scope {scope} required",
        ), method
        if scope == "platform:admin":
            # Signing keys are global: a tenant's admin may not touch them.
            assert await code_of(call(request, metadata=tenant_admin)) == (
                grpc.StatusCode.PERMISSION_DENIED,
                "scope platform:admin required",
            ), method


async def test_client_lifecycle_is_audited_without_secrets(
    auth: AuthServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="toolmesh.auth.audit")
    admin = await auth.admin()
    created = await auth.stub.CreateClient(
        auth_pb2.CreateClientRequest(client_id="billing-bot", tenant="acme", roles=["reader"]),
        metadata=admin,
    )
    first_secret = created.client_secret
    assert created.client.state == auth_pb2.CLIENT_STATE_ENABLED
    code, _ = await code_of(
        auth.stub.CreateClient(
            auth_pb2.CreateClientRequest(client_id="billing-bot", tenant="acme", roles=["reader"]),
            metadata=admin,
        )
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS

    listed = await auth.stub.ListClients(auth_pb2.ListClientsRequest(tenant="acme"), metadata=admin)
    assert [(c.client_id, list(c.roles)) for c in listed.clients] == [("billing-bot", ["reader"])]

    rotated = await auth.stub.RotateClientSecret(
        auth_pb2.RotateClientSecretRequest(client_id="billing-bot"), metadata=admin
    )
    old = auth_pb2.IssueTokenRequest(client_id="billing-bot", client_secret=first_secret)
    assert (await code_of(auth.stub.IssueToken(old)))[0] == grpc.StatusCode.UNAUTHENTICATED
    new = auth_pb2.IssueTokenRequest(client_id="billing-bot", client_secret=rotated.client_secret)
    issued = await auth.stub.IssueToken(new)
    assert list(issued.scopes) == ["tools:read"]

    revoked = await auth.stub.RevokeClient(
        auth_pb2.RevokeClientRequest(client_id="billing-bot"), metadata=admin
    )
    assert revoked.client.state == auth_pb2.CLIENT_STATE_REVOKED
    assert (await code_of(auth.stub.IssueToken(new)))[0] == grpc.StatusCode.UNAUTHENTICATED
    code, _ = await code_of(
        auth.stub.DisableClient(
            auth_pb2.DisableClientRequest(client_id="billing-bot"), metadata=admin
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION

    await auth.stub.DeleteClient(
        auth_pb2.DeleteClientRequest(client_id="billing-bot"), metadata=admin
    )
    listed = await auth.stub.ListClients(auth_pb2.ListClientsRequest(tenant="acme"), metadata=admin)
    assert list(listed.clients) == []
    revocations = await auth.stub.GetRevocations(auth_pb2.GetRevocationsRequest())
    assert "billing-bot" in revocations.disabled_clients
    code, _ = await code_of(
        auth.stub.DeleteClient(
            auth_pb2.DeleteClientRequest(client_id="billing-bot"), metadata=admin
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND

    audits = [r.__dict__ for r in caplog.records if r.name == "toolmesh.auth.audit"]
    # The dev client (tenant dev, platform:admin) acted on tenant acme: each change is in the
    # trail of acme (whose client changed) and of dev (whose operator changed it).
    changes = [
        (a["event"], a["target"], a["outcome"])
        for a in audits
        if a["event"].startswith("admin.client.") and a["tenant"] == "dev"
    ]
    assert changes == [
        ("admin.client.create", "billing-bot", "success"),
        ("admin.client.create", "billing-bot", "failure"),
        ("admin.client.rotate_secret", "billing-bot", "success"),
        ("admin.client.revoke", "billing-bot", "success"),
        ("admin.client.disable", "billing-bot", "failure"),
        ("admin.client.delete", "billing-bot", "success"),
        ("admin.client.delete", "billing-bot", "failure"),
    ]
    assert all(a["actor"] == "dev" for a in audits if a["event"].startswith("admin."))
    in_acme = [
        (a["event"], a["outcome"], a["details"].get("actor_tenant"))
        for a in audits
        if a["event"].startswith("admin.") and a["tenant"] == "acme"
    ]
    assert in_acme == [
        (f"admin.client.{action}", "success", "dev")
        for action in ("create", "rotate_secret", "revoke", "delete")
    ]
    everything = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    for secret in (first_secret, rotated.client_secret, auth.dev_credentials()["client_secret"]):
        assert secret not in everything


async def test_create_client_validates_fields(auth: AuthServer) -> None:
    code, details = await code_of(
        auth.stub.CreateClient(
            auth_pb2.CreateClientRequest(
                client_id="bad id", tenant="Not Valid", scopes=["tools:read"], roles=["wizard"]
            ),
            metadata=await auth.admin(),
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    for field in ("client_id", "tenant", "roles[0]"):
        assert field in details


async def test_revoke_token_validates_expiry(auth: AuthServer) -> None:
    request = auth_pb2.RevokeTokenRequest(token_id="abc")
    request.expires_at.FromSeconds(1)
    code, details = await code_of(auth.stub.RevokeToken(request, metadata=await auth.admin()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "expires_at" in details
