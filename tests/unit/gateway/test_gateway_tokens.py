"""Token verification negatives, with keys generated here; every reason is short and token-free."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable

import jwt
import pytest

from gateway.authn import (
    AuthSnapshot,
    Policy,
    TokenError,
    UnknownKeyError,
    parse_jwks,
    verify_token,
)
from gateway.settings import GatewaySettings
from tests.unit.gateway.fakes import SigningKey, claims, mint

KEY = SigningKey("k1")
SETTINGS = GatewaySettings(otlp_endpoint="")


def snapshot(**kwargs: object) -> AuthSnapshot:
    keys = parse_jwks(json.dumps({"keys": [KEY.jwk()]}))
    return AuthSnapshot(keys=keys, policy=Policy("v1", {}), **kwargs)  # type: ignore[arg-type]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_with_public_key() -> str:
    """The classic key-confusion token: HMAC-signed with the verifier's public key as secret."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": "k1"}).encode())
    payload = _b64(json.dumps(claims()).encode())
    secret = json.dumps(KEY.jwk()).encode()
    signature = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(signature)}"


def alg_none() -> str:
    return jwt.encode(claims(), None, algorithm="none", headers={"kid": "k1", "typ": "at+jwt"})


# Built when each test runs, so the suite's duration cannot age a token into another case.
CASES: dict[str, tuple[Callable[[int], str], str]] = {
    "garbage": (lambda now: "not-a-jwt", "malformed token"),
    "alg none": (lambda now: alg_none(), "unsupported token algorithm"),
    "HS256 with the public key": (
        lambda now: hs256_with_public_key(),
        "unsupported token algorithm",
    ),
    "expired": (
        lambda now: mint(KEY, exp=now - 120, iat=now - 700, nbf=now - 700),
        "token expired",
    ),
    "nbf in the future": (lambda now: mint(KEY, nbf=now + 300), "token not yet valid"),
    "iat in the future": (
        lambda now: mint(KEY, iat=now + 300, exp=now + 900),
        "token not yet valid",
    ),
    "wrong issuer": (lambda now: mint(KEY, iss="someone-else"), "wrong issuer"),
    "wrong audience": (lambda now: mint(KEY, aud="other"), "wrong audience"),
    "missing exp": (lambda now: mint(KEY, exp=None), "missing claim exp"),
    "missing jti": (lambda now: mint(KEY, jti=None), "missing claim jti"),
    "missing tenant": (lambda now: mint(KEY, tenant=None), "missing claim tenant"),
    "missing sub": (lambda now: mint(KEY, sub=None), "missing claim sub"),
    "empty tenant": (lambda now: mint(KEY, tenant=""), "invalid subject, tenant or token id"),
    "lifetime over the cap": (lambda now: mint(KEY, exp=now + 7200), "token lifetime too long"),
    "oversized": (lambda now: mint(KEY, padding="x" * 9000), "token too large"),
    "wrong typ": (lambda now: mint(KEY, headers={"typ": "JWT"}), "wrong token type"),
    "no kid": (
        lambda now: jwt.encode(claims(), KEY.private, algorithm="EdDSA", headers={"typ": "at+jwt"}),
        "token has no key id",
    ),
    "signed by another key with the same kid": (
        lambda now: mint(SigningKey("k1")),
        "bad signature",
    ),
    "scope not a string": (lambda now: mint(KEY, scope=["tools:read"]), "invalid scope or roles"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_tokens_are_refused_with_a_short_reason(name: str) -> None:
    build, reason = CASES[name]
    token = build(int(time.time()))
    with pytest.raises(TokenError) as err:
        verify_token(token, snapshot(), SETTINGS)
    assert err.value.reason == reason
    assert token not in str(err.value)


def test_unknown_kid_is_its_own_error_so_the_jwks_can_be_refetched() -> None:
    with pytest.raises(UnknownKeyError):
        verify_token(mint(SigningKey("k2")), snapshot(), SETTINGS)


def test_revoked_token_id_is_refused() -> None:
    token = mint(KEY, jti="revoked-1")
    with pytest.raises(TokenError, match="token revoked"):
        verify_token(token, snapshot(revoked=frozenset({"revoked-1"})), SETTINGS)


def test_disabled_client_is_refused() -> None:
    token = mint(KEY, sub="client-9")
    with pytest.raises(TokenError, match="client disabled"):
        verify_token(token, snapshot(disabled_clients=frozenset({"client-9"})), SETTINGS)


def test_leeway_accepts_a_token_expired_moments_ago() -> None:
    now = int(time.time())
    principal = verify_token(
        mint(KEY, exp=now - 5, iat=now - 600, nbf=now - 600), snapshot(), SETTINGS
    )
    assert principal.tenant == "acme"


def test_good_token_gives_the_principal() -> None:
    principal = verify_token(mint(KEY, jti="j-1"), snapshot(), SETTINGS)
    assert principal.subject == "client-1"
    assert principal.tenant == "acme"
    assert principal.scopes == frozenset({"tools:read", "tools:write", "ops:read", "admin"})
    assert principal.roles == ("developer",)
    assert principal.token_id == "j-1"


def test_jwks_skips_keys_that_are_not_ed25519_signing_keys() -> None:
    rsa_like = {"kty": "RSA", "kid": "r1", "n": "AQAB", "e": "AQAB"}
    hmac_like = {"kty": "oct", "kid": "h1", "k": "c2VjcmV0"}
    wrong_alg = {**KEY.jwk(), "kid": "k3", "alg": "HS256"}
    keys = parse_jwks(json.dumps({"keys": [rsa_like, hmac_like, wrong_alg, KEY.jwk()]}))
    assert list(keys) == ["k1"]


def test_leeway_over_thirty_seconds_is_refused_by_settings() -> None:
    with pytest.raises(ValueError, match="leeway_s"):
        GatewaySettings(leeway_s=31)


def test_staleness_bound_must_outlast_the_refresh_interval() -> None:
    with pytest.raises(ValueError, match="auth_staleness_s"):
        GatewaySettings(auth_refresh_s=10, auth_staleness_s=5)
