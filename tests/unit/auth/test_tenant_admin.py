"""Admin is per tenant; the platform operator (platform:admin) administers across tenants.

A real auth server: the dev client is the platform operator; acme and globex each get an admin
client (role admin) and a bot. A tenant admin sees and changes only its own tenant, a client of
another tenant answers exactly like an unknown one, and no admin can mint a client stronger
than itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from tests.unit.auth.conftest import AuthServer, bearer, code_of
from toolmesh.auth.v1 import auth_pb2

Metadata = list[tuple[str, str]]


@dataclass
class Tenants:
    auth: AuthServer
    platform: Metadata
    acme_admin: Metadata
    globex_admin: Metadata
    globex_bot: auth_pb2.IssueTokenRequest
    acme_bot: auth_pb2.IssueTokenRequest


async def make_client(
    auth: AuthServer, by: Metadata, client_id: str, tenant: str, **grants: Any
) -> auth_pb2.IssueTokenRequest:
    created = await auth.stub.CreateClient(
        auth_pb2.CreateClientRequest(client_id=client_id, tenant=tenant, **grants), metadata=by
    )
    return auth_pb2.IssueTokenRequest(client_id=client_id, client_secret=created.client_secret)


async def token_of(auth: AuthServer, request: auth_pb2.IssueTokenRequest, *scopes: str) -> str:
    wanted = auth_pb2.IssueTokenRequest()
    wanted.CopyFrom(request)
    wanted.scopes.extend(scopes)
    return str((await auth.stub.IssueToken(wanted)).access_token)


@pytest.fixture
async def tenants(auth: AuthServer) -> Tenants:
    platform = await auth.admin()
    acme_admin = await make_client(auth, platform, "acme-admin", "acme", roles=["admin"])
    globex_admin = await make_client(auth, platform, "globex-admin", "globex", roles=["admin"])
    globex_bot = await make_client(auth, platform, "globex-bot", "globex", scopes=["tools:read"])
    acme_bot = await make_client(auth, platform, "acme-bot", "acme", scopes=["tools:read"])
    return Tenants(
        auth,
        platform,
        bearer(await token_of(auth, acme_admin)),
        bearer(await token_of(auth, globex_admin)),
        globex_bot,
        acme_bot,
    )


def audit(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.__dict__ for r in caplog.records if r.name == "toolmesh.auth.audit"]


async def test_a_tenant_admin_lists_only_its_tenant(tenants: Tenants) -> None:
    auth = tenants.auth
    own = await auth.stub.ListClients(auth_pb2.ListClientsRequest(), metadata=tenants.acme_admin)
    assert sorted(c.client_id for c in own.clients) == ["acme-admin", "acme-bot"]
    named = await auth.stub.ListClients(
        auth_pb2.ListClientsRequest(tenant="acme"), metadata=tenants.acme_admin
    )
    assert list(named.clients) == list(own.clients)
    assert await code_of(
        auth.stub.ListClients(
            auth_pb2.ListClientsRequest(tenant="globex"), metadata=tenants.acme_admin
        )
    ) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "scope platform:admin required to act on another tenant",
    )
    # The platform operator: every tenant, or one.
    everyone = await auth.stub.ListClients(auth_pb2.ListClientsRequest(), metadata=tenants.platform)
    assert {c.tenant for c in everyone.clients} == {"dev", "acme", "globex"}
    globex = await auth.stub.ListClients(
        auth_pb2.ListClientsRequest(tenant="globex"), metadata=tenants.platform
    )
    assert sorted(c.client_id for c in globex.clients) == ["globex-admin", "globex-bot"]


async def test_a_tenant_admin_creates_clients_only_in_its_tenant(
    tenants: Tenants, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="toolmesh.auth.audit")
    auth = tenants.auth
    created = await auth.stub.CreateClient(
        auth_pb2.CreateClientRequest(roles=["reader"]), metadata=tenants.acme_admin
    )
    assert created.client.tenant == "acme"  # empty tenant: the caller's
    code, details = await code_of(
        auth.stub.CreateClient(
            auth_pb2.CreateClientRequest(client_id="mole", tenant="globex", roles=["admin"]),
            metadata=tenants.acme_admin,
        )
    )
    assert (code, details) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "scope platform:admin required to act on another tenant",
    )
    denied = [a for a in audit(caplog) if a["event"] == "permission.denied"]
    assert [(a["tenant"], a["actor"], a["details"]["tenant"]) for a in denied] == [
        ("acme", "acme-admin", "globex")
    ]
    # The platform operator may.
    made = await auth.stub.CreateClient(
        auth_pb2.CreateClientRequest(tenant="globex", scopes=["tools:read"]),
        metadata=tenants.platform,
    )
    assert made.client.tenant == "globex"


@pytest.mark.parametrize(
    "grants",
    [
        {"scopes": ["platform:admin"]},
        {"roles": ["platform-operator"]},
        {"scopes": ["tools:read", "platform:admin"]},
    ],
)
async def test_no_admin_can_mint_a_platform_operator(tenants: Tenants, grants: Any) -> None:
    code, details = await code_of(
        tenants.auth.stub.CreateClient(
            auth_pb2.CreateClientRequest(**grants), metadata=tenants.acme_admin
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert details.startswith("cannot grant platform:admin: ")


async def test_a_tenant_admin_grants_at_most_the_scopes_its_token_holds(tenants: Tenants) -> None:
    auth = tenants.auth
    admin = await make_client(auth, tenants.platform, "acme-admin-2", "acme", roles=["admin"])
    narrow = bearer(await token_of(auth, admin, "admin"))  # asked for scope admin only
    code, details = await code_of(
        auth.stub.CreateClient(
            auth_pb2.CreateClientRequest(scopes=["tools:read", "tools:write"]), metadata=narrow
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert details.startswith("cannot grant tools:read tools:write: ")
    # A role counts for the scopes it grants.
    code, _ = await code_of(
        auth.stub.CreateClient(auth_pb2.CreateClientRequest(roles=["writer"]), metadata=narrow)
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # The same admin with a token holding the scopes may grant them, and "admin" itself.
    full = bearer(await token_of(auth, admin))
    made = await auth.stub.CreateClient(
        auth_pb2.CreateClientRequest(roles=["writer"], scopes=["admin"]), metadata=full
    )
    assert made.client.tenant == "acme"


CLIENT_CHANGES: list[tuple[str, str]] = [
    ("DisableClient", "admin.client.disable"),
    ("DeleteClient", "admin.client.delete"),
    ("RevokeClient", "admin.client.revoke"),
    ("RotateClientSecret", "admin.client.rotate_secret"),
]


@pytest.mark.parametrize(("method", "action"), CLIENT_CHANGES)
async def test_another_tenants_client_answers_like_an_unknown_one(
    tenants: Tenants, method: str, action: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="toolmesh.auth.audit")
    auth = tenants.auth
    call = getattr(auth.stub, method)
    make = getattr(auth_pb2, f"{method}Request")
    other = await code_of(call(make(client_id="globex-bot"), metadata=tenants.acme_admin))
    unknown = await code_of(call(make(client_id="no-such-bot"), metadata=tenants.acme_admin))
    assert other[0] == unknown[0] == grpc.StatusCode.NOT_FOUND
    assert other[1].replace("globex-bot", "X") == unknown[1].replace("no-such-bot", "X")
    # Nothing happened to globex's client.
    assert (await auth.stub.IssueToken(tenants.globex_bot)).access_token

    events = audit(caplog)
    # acme's trail: the same record for both (its readers learn nothing the caller did not).
    in_acme = [
        (a["event"], a["outcome"], a["details"]["reason"].replace(a["target"], "X"))
        for a in events
        if a["tenant"] == "acme" and a["event"] == action
    ]
    assert in_acme == [(action, "failure", "no client X")] * 2
    # globex's trail: the attempt on its client, by whom.
    in_globex = [
        (a["event"], a["actor"], a["target"], a["details"])
        for a in events
        if a["tenant"] == "globex" and a["event"] != "token.issue"
    ]
    assert in_globex == [
        (
            "permission.denied",
            "acme-admin",
            "globex-bot",
            {"attempted": action, "reason": "client of another tenant", "actor_tenant": "acme"},
        )
    ]

    # Its own tenant's client: done. And the platform operator may act on any tenant's.
    assert (await call(make(client_id="acme-bot"), metadata=tenants.acme_admin)).client.tenant
    done = await call(make(client_id="globex-bot"), metadata=tenants.platform)
    assert done.client.tenant == "globex"


async def test_a_tenant_admin_revokes_only_its_own_tenants_tokens(tenants: Tenants) -> None:
    auth = tenants.auth
    globex_token = await token_of(auth, tenants.globex_bot)
    acme_token = await token_of(auth, tenants.acme_bot)
    globex_jti = (
        await auth.stub.VerifyToken(auth_pb2.VerifyTokenRequest(token=globex_token))
    ).token_id
    acme_jti = (await auth.stub.VerifyToken(auth_pb2.VerifyTokenRequest(token=acme_token))).token_id

    # acme's admin names globex's token id: recorded for acme, so globex's token still works.
    reply = await auth.stub.RevokeToken(
        auth_pb2.RevokeTokenRequest(token_id=globex_jti), metadata=tenants.acme_admin
    )
    assert (reply.revoked.token_id, reply.revoked.tenant) == (globex_jti, "acme")
    await auth.stub.VerifyToken(auth_pb2.VerifyTokenRequest(token=globex_token))
    assert await code_of(
        auth.stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(token_id=globex_jti, tenant="globex"),
            metadata=tenants.acme_admin,
        )
    ) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "scope platform:admin required to act on another tenant",
    )

    await auth.stub.RevokeToken(
        auth_pb2.RevokeTokenRequest(token_id=acme_jti), metadata=tenants.acme_admin
    )
    assert await code_of(auth.stub.VerifyToken(auth_pb2.VerifyTokenRequest(token=acme_token))) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "token revoked",
    )
    # globex's own admin, and the platform operator (in every tenant), can revoke it.
    await auth.stub.RevokeToken(
        auth_pb2.RevokeTokenRequest(token_id=globex_jti), metadata=tenants.globex_admin
    )
    assert (await code_of(auth.stub.VerifyToken(auth_pb2.VerifyTokenRequest(token=globex_token))))[
        0
    ] == grpc.StatusCode.UNAUTHENTICATED
    anywhere = await auth.stub.RevokeToken(
        auth_pb2.RevokeTokenRequest(token_id="a" * 32), metadata=tenants.platform
    )
    assert anywhere.revoked.tenant == ""
    listing = await auth.stub.GetRevocations(auth_pb2.GetRevocationsRequest())
    assert sorted((r.tenant, r.token_id) for r in listing.revoked_tokens) == sorted(
        [("acme", globex_jti), ("acme", acme_jti), ("globex", globex_jti), ("", "a" * 32)]
    )
