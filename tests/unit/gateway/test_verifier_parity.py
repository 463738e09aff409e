"""One table of malformed tokens, verified by a real auth (VerifyToken) and by a real gateway in
front of that same auth: both refuse each token UNAUTHENTICATED with the same short reason
(services.kit.tokens is the one verifier), never INTERNAL, and auth audits auth.failure.

Tokens are signed with auth's own private key, so only the part under test is wrong.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc import aio

from services.auth.keys import public_x, thumbprint
from tests.unit.auth.conftest import AuthServer, make_settings
from tests.unit.gateway.conftest import bearer, start_gateway
from tests.unit.gateway.fakes import Fakes
from toolmesh.auth.v1 import auth_pb2
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Signer:
    kid: str
    key: Ed25519PrivateKey

    def claims(self, **changes: Any) -> dict[str, Any]:
        """A valid token's claims for the dev client (read at use, so they never age)."""
        now = int(time.time())
        values: dict[str, Any] = {
            "iss": "toolmesh-auth",
            "aud": "toolmesh",
            "sub": "dev",
            "tenant": "dev",
            "scope": "tools:read",
            "roles": [],
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
        }
        values.update(changes)
        return {k: v for k, v in values.items() if v is not None}

    def raw(self, payload: bytes, key: Ed25519PrivateKey | None = None, **header: Any) -> str:
        """Sign ``payload`` bytes as they are (duplicate names, odd numbers ...)."""
        head = {"alg": "EdDSA", "typ": "at+jwt", "kid": self.kid, **header}
        head = {k: v for k, v in head.items() if v is not None}
        signing_input = f"{b64(json.dumps(head).encode())}.{b64(payload)}"
        signature = (key or self.key).sign(signing_input.encode())
        return f"{signing_input}.{b64(signature)}"

    def token(self, header: dict[str, Any] | None = None, **changes: Any) -> str:
        return self.raw(json.dumps(self.claims(**changes)).encode(), **(header or {}))


def hs256_with_public_key(s: Signer) -> str:
    """Key confusion: HMAC keyed with the public key, which anyone can read from the JWKS."""
    public = s.key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    head = b64(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": s.kid}).encode())
    body = b64(json.dumps(s.claims()).encode())
    mac = hmac.new(public, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


def alg_none(s: Signer) -> str:
    head = b64(json.dumps({"alg": "none", "typ": "at+jwt", "kid": s.kid}).encode())
    return f"{head}.{b64(json.dumps(s.claims()).encode())}."


def unknown_key(s: Signer) -> str:
    other = Ed25519PrivateKey.generate()
    kid = thumbprint(public_x(other.public_key()))
    return Signer(kid, other).token()


def now() -> int:
    return int(time.time())


CASES: dict[str, tuple[Callable[[Signer], str], str]] = {
    "garbage": (lambda s: "not-a-jwt", "malformed token"),
    "three garbage parts": (lambda s: "eyJhbGciOi.eyJzdWIiOi.c2ln", "malformed token"),
    "alg none": (alg_none, "algorithm not allowed"),
    "HS256 with the public key as secret": (hs256_with_public_key, "algorithm not allowed"),
    "alg RS256": (lambda s: s.token({"alg": "RS256"}), "algorithm not allowed"),
    "missing kid": (lambda s: s.token({"kid": None}), "missing key id"),
    "kid a number": (lambda s: s.token({"kid": 7}), "malformed token"),
    "missing typ": (lambda s: s.token({"typ": None}), "wrong token type"),
    "typ JWT": (lambda s: s.token({"typ": "JWT"}), "wrong token type"),
    "crit header": (lambda s: s.token({"crit": ["exp"], "exp": 1}), "malformed token"),
    "b64 header": (lambda s: s.token({"b64": True}), "unsupported header"),
    "unknown kid": (unknown_key, "unknown signing key"),
    "known kid, another key": (
        lambda s: s.raw(json.dumps(s.claims()).encode(), key=Ed25519PrivateKey.generate()),
        "bad signature",
    ),
    "exp a string": (lambda s: s.token(exp=str(now() + 300)), "bad claim exp"),
    "exp a float": (lambda s: s.token(exp=now() + 300.5), "bad claim exp"),
    "exp true": (lambda s: s.token(exp=True), "bad claim exp"),
    "exp past year 9999": (lambda s: s.token(exp=10**20), "bad claim exp"),
    "exp 1e400": (
        lambda s: s.raw(json.dumps(s.claims(exp=0)).replace('"exp": 0', '"exp": 1e400').encode()),
        "malformed token",
    ),
    "exp NaN": (
        lambda s: s.raw(json.dumps(s.claims(exp=0)).replace('"exp": 0', '"exp": NaN').encode()),
        "malformed token",
    ),
    "exp negative": (lambda s: s.token(exp=-1), "bad claim exp"),
    "iat a string": (lambda s: s.token(iat="yesterday"), "bad claim iat"),
    "iat null": (lambda s: s.token(iat=[]), "bad claim iat"),
    "nbf a list": (lambda s: s.token(nbf=[now()]), "bad claim nbf"),
    "aud list with another audience": (
        lambda s: s.token(aud=["toolmesh", "billing"]),
        "wrong audience",
    ),
    "aud list twice ours": (lambda s: s.token(aud=["toolmesh", "toolmesh"]), "wrong audience"),
    "aud another": (lambda s: s.token(aud="billing"), "wrong audience"),
    "aud empty list": (lambda s: s.token(aud=[]), "wrong audience"),
    "aud a number": (lambda s: s.token(aud=1), "wrong audience"),
    "iss another": (lambda s: s.token(iss="evil"), "wrong issuer"),
    "missing exp": (lambda s: s.token(exp=None), "missing claim exp"),
    "missing aud": (lambda s: s.token(aud=None), "missing claim aud"),
    "missing jti": (lambda s: s.token(jti=None), "missing claim jti"),
    "empty sub": (lambda s: s.token(sub=""), "bad claim sub"),
    "tenant a number": (lambda s: s.token(tenant=7), "bad claim tenant"),
    "scope a list": (lambda s: s.token(scope=["tools:read"]), "bad claim scope"),
    "roles a string": (lambda s: s.token(roles="admin"), "bad claim roles"),
    "duplicate claim": (
        lambda s: s.raw(
            json.dumps(s.claims())
            .replace('"tenant": "dev"', '"tenant": "dev", "tenant": "x"')
            .encode()
        ),
        "malformed token",
    ),
    "payload an array": (lambda s: s.raw(b'["not", "claims"]'), "malformed token"),
    "expired": (
        lambda s: s.token(iat=now() - 900, nbf=now() - 900, exp=now() - 120),
        "token expired",
    ),
    "not yet valid": (lambda s: s.token(nbf=now() + 120, exp=now() + 600), "token not yet valid"),
    "issued in the future": (
        lambda s: s.token(iat=now() + 120, nbf=now(), exp=now() + 600),
        "token not yet valid",
    ),
    "lifetime over an hour": (lambda s: s.token(exp=now() + 7200), "token lifetime too long"),
    "oversized": (lambda s: s.token(pad="x" * 9000), "token too large"),
}


@dataclass
class Pair:
    auth: AuthServer
    gateway: gateway_pb2_grpc.GatewayStub
    fakes: Fakes
    signer: Signer


@pytest.fixture(scope="module")
async def pair(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Pair]:
    data: Path = tmp_path_factory.mktemp("parity")
    auth = await AuthServer(make_settings(data / "auth")).start()
    assert auth.running is not None
    fakes = Fakes()
    inner, gateway, channel, _ = await start_gateway(
        fakes, auth_target=f"127.0.0.1:{auth.running.port}", data_dir=str(data / "gateway")
    )
    stub = gateway_pb2_grpc.GatewayStub(channel)
    kid, key = auth.signing_key()
    signer = Signer(kid, key)
    try:
        await _wait_ready(stub, await auth.token())
        yield Pair(auth, stub, fakes, signer)
    finally:
        await channel.close()
        await gateway.stop(0)
        await inner.stop(0)
        await auth.stop()


async def _wait_ready(stub: gateway_pb2_grpc.GatewayStub, token: str) -> None:
    """Until the gateway has loaded the real auth's keys, revocations and policy."""
    deadline = time.monotonic() + 10
    while True:
        try:
            await stub.GetServiceInfo(
                gateway_pb2.GetServiceInfoRequest(), metadata=bearer(token), timeout=2
            )
            return
        except aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)


async def _answer(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("case", list(CASES))
async def test_auth_and_the_gateway_refuse_alike(
    pair: Pair, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="toolmesh.auth.audit")
    build, reason = CASES[case]
    token = build(pair.signer)
    at_auth = await _answer(pair.auth.stub.VerifyToken(auth_pb2.VerifyTokenRequest(token=token)))
    at_gateway = await _answer(
        pair.gateway.GetServiceInfo(gateway_pb2.GetServiceInfoRequest(), metadata=bearer(token))
    )
    assert at_auth == at_gateway == (grpc.StatusCode.UNAUTHENTICATED, reason)
    audited = [
        r.__dict__["details"]
        for r in caplog.records
        if r.name == "toolmesh.auth.audit" and r.__dict__["event"] == "auth.failure"
    ]
    assert [d["reason"] for d in audited] == [reason]
    assert token not in json.dumps(audited)


async def test_both_accept_aud_as_a_list_holding_only_ours(pair: Pair) -> None:
    for aud in ("toolmesh", ["toolmesh"]):
        token = pair.signer.token(aud=aud)
        verified = await pair.auth.stub.VerifyToken(auth_pb2.VerifyTokenRequest(token=token))
        assert verified.caller.tenant == "dev"
        info = await pair.gateway.GetServiceInfo(
            gateway_pb2.GetServiceInfoRequest(), metadata=bearer(token)
        )
        assert info.info.service == "gateway"


async def test_a_signed_but_refused_token_is_audited_in_its_tenant(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """Expired, but signed by auth: the refusal names the real tenant and subject."""
    caplog.set_level(logging.INFO, logger="toolmesh.auth.audit")
    jti = uuid.uuid4().hex
    token = pair.signer.token(iat=now() - 900, nbf=now() - 900, exp=now() - 120, jti=jti)
    await _answer(pair.auth.stub.VerifyToken(auth_pb2.VerifyTokenRequest(token=token)))
    (event,) = [r.__dict__ for r in caplog.records if r.__dict__.get("event") == "auth.failure"]
    assert (event["tenant"], event["actor"], event["details"]["token_id"]) == ("dev", "dev", jti)
