"""Admin RPCs: bearer token with scope admin (keys: platform:admin) required; changes audited,
secrets never logged; bad input answered INVALID_ARGUMENT naming the field, with bounded work."""

from __future__ import annotations

import asyncio
import logging
import time
import tracemalloc
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

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
    ("CreateTenant", auth_pb2.CreateTenantRequest(tenant="acme"), "platform:admin"),
    ("ListTenants", auth_pb2.ListTenantsRequest(), "admin"),
    ("GetTenant", auth_pb2.GetTenantRequest(), "admin"),
    ("AllowTools", auth_pb2.AllowToolsRequest(tools=["calculator"]), "admin"),
    ("DenyTools", auth_pb2.DenyToolsRequest(tools=["calculator"]), "admin"),
    ("SetRole", auth_pb2.SetRoleRequest(role="reader"), "platform:admin"),
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


@pytest.mark.parametrize(
    ("seconds", "nanos", "problem"),
    [
        (2_000_000_000, -1, "nanos must be 0-999999999"),
        (2_000_000_000, 1_000_000_000, "nanos must be 0-999999999"),
        (253_402_300_800, 0, "seconds must be within years 1-9999"),
        (-62_135_596_801, 0, "seconds must be within years 1-9999"),
        (-(2**63), 0, "seconds must be within years 1-9999"),
    ],
)
async def test_an_out_of_range_timestamp_is_invalid_argument_naming_the_field(
    auth: AuthServer, seconds: int, nanos: int, problem: str
) -> None:
    request = auth_pb2.RevokeTokenRequest(token_id="abc")
    request.expires_at.seconds = seconds
    request.expires_at.nanos = nanos
    call = auth.stub.RevokeToken(request, metadata=await auth.admin())
    assert await code_of(call) == (grpc.StatusCode.INVALID_ARGUMENT, f"expires_at: {problem}")
    status = await rpc_status.aio.from_call(call)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert [v.field for v in bad_request.field_violations] == ["expires_at"]


async def test_concurrent_revocations_of_one_token_id_are_idempotent(auth: AuthServer) -> None:
    admin = await auth.admin()
    later = auth_pb2.RevokeTokenRequest(token_id="same-jti")
    later.expires_at.FromSeconds(int(time.time()) + 1200)
    requests = [auth_pb2.RevokeTokenRequest(token_id="same-jti") for _ in range(19)] + [later]
    replies = await asyncio.gather(
        *(auth.stub.RevokeToken(r, metadata=admin) for r in requests), return_exceptions=True
    )
    assert [r for r in replies if not isinstance(r, auth_pb2.RevokeTokenResponse)] == []
    listing = await auth.stub.GetRevocations(auth_pb2.GetRevocationsRequest())
    assert [r.token_id for r in listing.revoked_tokens] == ["same-jti"]
    # The longest expiry asked for wins (unset means the longest a token can live).
    assert listing.revoked_tokens[0].expires_at.seconds > time.time() + 3000


async def test_thousands_of_bad_entries_are_refused_with_bounded_work(auth: AuthServer) -> None:
    """One violation for an over-long list, never one per entry: a 2 MB request of one-letter
    scopes used to build 600,000 violations (about 80 MB) before answering."""
    admin = await auth.admin()
    many = ["X"] * 600_000
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        issue = auth.stub.IssueToken(
            auth_pb2.IssueTokenRequest(client_id="dev", client_secret="s", scopes=many)
        )
        assert await code_of(issue) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "scopes: at most 64 entries",
        )
        create = auth.stub.CreateClient(
            auth_pb2.CreateClientRequest(tenant="dev", scopes=many, roles=many), metadata=admin
        )
        assert await code_of(create) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "scopes: at most 64 entries; roles: at most 64 entries",
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Python allocations of the client, the server and the test together.
    assert peak < 40 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    # Under the cap, each bad entry is named, up to a report's worth.
    code, details = await code_of(
        auth.stub.CreateClient(
            auth_pb2.CreateClientRequest(tenant="dev", scopes=["X"] * 64), metadata=admin
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.count("not a valid name") == 19 and "more violations not listed" in details
