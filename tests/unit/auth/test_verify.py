"""VerifyToken accepts only what auth itself would issue; every failure is UNAUTHENTICATED."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.auth.keys import public_x, thumbprint
from tests.unit.auth.conftest import AuthServer, b64, claims, code_of, sign
from toolmesh.auth.v1 import auth_pb2

Forge = Callable[[str, Ed25519PrivateKey], str]


def now() -> int:
    """Read when a token is forged, not at import: a long run must not age the cases."""
    return int(time.time())


def _hs256_with_public_key(kid: str, key: Ed25519PrivateKey) -> str:
    """The key-confusion attack: HMAC keyed with the public key bytes everyone can read."""
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    head = b64(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": kid}).encode())
    body = b64(json.dumps(claims()).encode())
    mac = hmac.new(public, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


def _alg_none(kid: str, key: Ed25519PrivateKey) -> str:
    head = b64(json.dumps({"alg": "none", "typ": "at+jwt", "kid": kid}).encode())
    return f"{head}.{b64(json.dumps(claims()).encode())}."


def _fresh_key_unknown_kid(kid: str, key: Ed25519PrivateKey) -> str:
    other = Ed25519PrivateKey.generate()
    return sign(claims(), other, thumbprint(public_x(other.public_key())))


def _fresh_key_known_kid(kid: str, key: Ed25519PrivateKey) -> str:
    return sign(claims(), Ed25519PrivateKey.generate(), kid)


CASES: dict[str, tuple[Forge, str]] = {
    "garbage": (lambda kid, key: "not-a-jwt", "malformed token"),
    "alg none": (_alg_none, "algorithm not allowed"),
    "hs256 with public key": (_hs256_with_public_key, "algorithm not allowed"),
    "unknown kid": (_fresh_key_unknown_kid, "unknown signing key"),
    "known kid, other key": (_fresh_key_known_kid, "bad signature"),
    "expired": (
        lambda kid, key: sign(
            claims(iat=now() - 1000, nbf=now() - 1000, exp=now() - 100), key, kid
        ),
        "token expired",
    ),
    "nbf in future": (
        lambda kid, key: sign(claims(nbf=now() + 300, exp=now() + 600), key, kid),
        "token not yet valid",
    ),
    "wrong iss": (lambda kid, key: sign(claims(iss="evil"), key, kid), "wrong issuer"),
    "wrong aud": (lambda kid, key: sign(claims(aud="other"), key, kid), "wrong audience"),
    "missing exp": (lambda kid, key: sign(claims(exp=None), key, kid), "missing claim exp"),
    "missing jti": (lambda kid, key: sign(claims(jti=None), key, kid), "missing claim jti"),
    "missing tenant": (
        lambda kid, key: sign(claims(tenant=None), key, kid),
        "missing claim tenant",
    ),
    "lifetime over an hour": (
        lambda kid, key: sign(claims(exp=now() + 7200), key, kid),
        "token lifetime too long",
    ),
    "no typ": (
        lambda kid, key: jwt.encode(claims(), key, algorithm="EdDSA", headers={"kid": kid}),
        "wrong token type",
    ),
    "oversized": (lambda kid, key: sign(claims(pad="x" * 9000), key, kid), "token too large"),
    "unknown subject": (lambda kid, key: sign(claims(sub="ghost"), key, kid), "client disabled"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_forged_tokens_are_rejected(
    auth: AuthServer, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    forge, reason = CASES[case]
    kid, key = auth.signing_key()
    token = forge(kid, key)
    code, details = await code_of(auth.stub.VerifyToken(auth_pb2.VerifyTokenRequest(token=token)))
    assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, reason)
    assert token not in details
    assert token not in "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)


async def test_a_token_signed_with_the_real_key_verifies(auth: AuthServer) -> None:
    kid, key = auth.signing_key()
    token = sign(claims(scope="tools:read tools:write", roles=["writer"]), key, kid)
    response = await auth.stub.VerifyToken(auth_pb2.VerifyTokenRequest(token=token))
    assert response.caller.subject == "dev" and response.caller.tenant == "dev"
    assert list(response.caller.scopes) == ["tools:read", "tools:write"]
    assert list(response.caller.roles) == ["writer"]


async def test_revoked_token_is_rejected_and_listed(auth: AuthServer) -> None:
    issued = await auth.stub.IssueToken(
        auth_pb2.IssueTokenRequest(
            client_id="dev", client_secret=auth.dev_credentials()["client_secret"]
        )
    )
    verify = auth_pb2.VerifyTokenRequest(token=issued.access_token)
    await auth.stub.VerifyToken(verify)
    revoked = await auth.stub.RevokeToken(
        auth_pb2.RevokeTokenRequest(token_id=issued.token_id), metadata=await auth.admin()
    )
    assert revoked.revoked.expires_at.seconds > time.time() + 3000
    assert await code_of(auth.stub.VerifyToken(verify)) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "token revoked",
    )
    listing = await auth.stub.GetRevocations(auth_pb2.GetRevocationsRequest())
    assert [r.token_id for r in listing.revoked_tokens] == [issued.token_id]
    assert abs(listing.as_of.seconds - time.time()) < 5


async def test_revocations_are_pruned_after_expiry(auth: AuthServer) -> None:
    admin = await auth.admin()
    expires = auth_pb2.RevokeTokenRequest(token_id="short-lived")
    expires.expires_at.FromSeconds(int(time.time()) + 3)
    await auth.stub.RevokeToken(expires, metadata=admin)
    listing = await auth.stub.GetRevocations(auth_pb2.GetRevocationsRequest())
    assert [r.token_id for r in listing.revoked_tokens] == ["short-lived"]
    deadline = time.monotonic() + 15
    while listing.revoked_tokens:
        assert time.monotonic() < deadline, "never pruned"
        await asyncio.sleep(0.2)
        listing = await auth.stub.GetRevocations(auth_pb2.GetRevocationsRequest())
    assert time.time() >= expires.expires_at.seconds, "pruned before it expired"


async def test_disabled_client_tokens_are_rejected_and_listed(auth: AuthServer) -> None:
    admin = await auth.admin()
    created = await auth.stub.CreateClient(
        auth_pb2.CreateClientRequest(tenant="acme", scopes=["tools:read"]), metadata=admin
    )
    issued = await auth.stub.IssueToken(
        auth_pb2.IssueTokenRequest(
            client_id=created.client.client_id, client_secret=created.client_secret
        )
    )
    verify = auth_pb2.VerifyTokenRequest(token=issued.access_token)
    assert (await auth.stub.VerifyToken(verify)).caller.tenant == "acme"
    await auth.stub.DisableClient(
        auth_pb2.DisableClientRequest(client_id=created.client.client_id), metadata=admin
    )
    assert await code_of(auth.stub.VerifyToken(verify)) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "client disabled",
    )
    listing = await auth.stub.GetRevocations(auth_pb2.GetRevocationsRequest())
    assert list(listing.disabled_clients) == [created.client.client_id]
