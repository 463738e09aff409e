"""The gateway's use of the kit's verifier: snapshot keys and tenant-scoped revocations, the
rules from its settings, the signature-only identity of refused tokens. The full table of
malformed tokens runs against real auth and a real gateway in test_verifier_parity.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable

import jwt
import pytest

from gateway import authn
from gateway.accounting import verified_identity
from gateway.authn import (
    AuthSnapshot,
    AuthState,
    Policy,
    Principal,
    TokenError,
    UnknownKeyError,
    parse_jwks,
    parse_revocations,
    token_rules,
    verify_token,
)
from gateway.settings import GatewaySettings
from services.kit.tokens import Revocations, TokenRules
from tests.unit.gateway.fakes import SigningKey, claims, mint
from toolmesh.auth.v1 import auth_pb2

KEY = SigningKey("k1")
SETTINGS = GatewaySettings(otlp_endpoint="")
RULES = token_rules(SETTINGS)


def snapshot(revocations: Revocations | None = None) -> AuthSnapshot:
    keys = parse_jwks(json.dumps({"keys": [KEY.jwk()]}))
    return AuthSnapshot(
        keys=keys, revocations=revocations or Revocations(), policy=Policy("v1", {})
    )


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
    "alg none": (lambda now: alg_none(), "algorithm not allowed"),
    "HS256 with the public key": (
        lambda now: hs256_with_public_key(),
        "algorithm not allowed",
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
    "empty tenant": (lambda now: mint(KEY, tenant=""), "bad claim tenant"),
    "lifetime over the cap": (lambda now: mint(KEY, exp=now + 7200), "token lifetime too long"),
    "oversized": (lambda now: mint(KEY, padding="x" * 9000), "token too large"),
    "wrong typ": (lambda now: mint(KEY, headers={"typ": "JWT"}), "wrong token type"),
    "no kid": (
        lambda now: jwt.encode(claims(), KEY.private, algorithm="EdDSA", headers={"typ": "at+jwt"}),
        "missing key id",
    ),
    "signed by another key with the same kid": (
        lambda now: mint(SigningKey("k1")),
        "bad signature",
    ),
    "scope not a string": (lambda now: mint(KEY, scope=["tools:read"]), "bad claim scope"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_tokens_are_refused_with_a_short_reason(name: str) -> None:
    build, reason = CASES[name]
    token = build(int(time.time()))
    with pytest.raises(TokenError) as err:
        verify_token(token, snapshot(), RULES)
    assert err.value.reason == reason
    assert token not in str(err.value)


def test_unknown_kid_is_its_own_error_so_the_jwks_can_be_refetched() -> None:
    with pytest.raises(UnknownKeyError):
        verify_token(mint(SigningKey("k2")), snapshot(), RULES)


def test_a_revocation_applies_in_its_tenant_only() -> None:
    """What auth publishes: (tenant, jti) pairs, "" meaning any tenant."""
    listing = auth_pb2.GetRevocationsResponse(
        revoked_tokens=[
            auth_pb2.RevokedToken(token_id="own-1", tenant="acme"),
            auth_pb2.RevokedToken(token_id="other-1", tenant="globex"),
            auth_pb2.RevokedToken(token_id="any-1"),
        ],
        disabled_clients=["client-9"],
    )
    state = snapshot(parse_revocations(listing))
    for jti in ("own-1", "any-1"):
        with pytest.raises(TokenError, match="token revoked") as err:
            verify_token(mint(KEY, jti=jti), state, RULES)
        assert err.value.identity is not None and err.value.identity.tenant == "acme"
    # Another tenant's admin revoked "other-1" in its own tenant: acme's token stands.
    assert verify_token(mint(KEY, jti="other-1"), state, RULES).token_id == "other-1"
    with pytest.raises(TokenError, match="client disabled"):
        verify_token(mint(KEY, sub="client-9"), state, RULES)


def test_leeway_accepts_a_token_expired_moments_ago() -> None:
    now = int(time.time())
    principal = verify_token(
        mint(KEY, exp=now - 5, iat=now - 600, nbf=now - 600), snapshot(), RULES
    )
    assert principal.tenant == "acme"


def test_size_and_lifetime_settings_lower_the_kit_caps_never_raise_them() -> None:
    lenient = token_rules(GatewaySettings(max_token_bytes=65536, max_token_lifetime_s=86400))
    assert (lenient.max_token_bytes, lenient.max_lifetime_s) == (8192, 3600)
    strict = token_rules(GatewaySettings(max_token_bytes=1024, max_token_lifetime_s=300))
    assert (strict.max_token_bytes, strict.max_lifetime_s) == (1024, 300)
    with pytest.raises(TokenError, match="token lifetime too long"):
        verify_token(mint(KEY), snapshot(), strict)  # minted for 600 s
    with pytest.raises(TokenError, match="token too large"):
        verify_token(mint(KEY, padding="x" * 1024), snapshot(), strict)


def test_verified_identity_only_for_a_signature_that_verifies() -> None:
    now = int(time.time())
    expired = mint(KEY, sub="client-7", jti="j-7", exp=now - 300, iat=now - 900, nbf=now - 900)
    assert verified_identity(expired, snapshot()) == ("acme", "client-7", "j-7")
    forged = mint(SigningKey("k1"), sub="client-7")
    assert verified_identity(forged, snapshot()) == ("_unknown", "", "")
    assert verified_identity(alg_none(), snapshot()) == ("_unknown", "", "")
    assert verified_identity(hs256_with_public_key(), snapshot()) == ("_unknown", "", "")
    assert verified_identity(mint(KEY, padding="x" * 9000), snapshot()) == ("_unknown", "", "")
    assert verified_identity(expired, None) == ("_unknown", "", "")
    # A claim of the wrong type is not recorded as if it were one.
    assert verified_identity(mint(KEY, tenant=7, jti="j-8"), snapshot()) == (
        "_unknown",
        "client-1",
        "j-8",
    )


def test_good_token_gives_the_principal() -> None:
    principal = verify_token(mint(KEY, jti="j-1"), snapshot(), RULES)
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


def _loaded_state(revocations: Revocations | None = None) -> AuthState:
    state = AuthState(None, SETTINGS, clock=lambda: 0.0)  # type: ignore[arg-type]
    state._snapshot = snapshot(revocations)
    return state


async def test_a_verified_token_is_remembered_but_revocation_and_expiry_still_apply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checks: list[str] = []

    def counting(token: str, snap: AuthSnapshot, rules: TokenRules) -> Principal:
        checks.append(token)
        return verify_token(token, snap, rules)

    monkeypatch.setattr(authn, "verify_token", counting)
    state = _loaded_state()
    token = mint(KEY, jti="cached-1")
    for _ in range(3):
        principal, _policy = await state.verify(token)
    assert principal.token_id == "cached-1" and len(checks) == 1
    # Revoked on the next refresh: refused at once, although the signature was checked.
    listing = auth_pb2.GetRevocationsResponse(
        revoked_tokens=[auth_pb2.RevokedToken(token_id="cached-1", tenant="acme")]
    )
    state._snapshot = snapshot(parse_revocations(listing))
    with pytest.raises(TokenError, match="token revoked"):
        await state.verify(token)
    # Past its expiry the token is verified in full again, never served from memory.
    state = _loaded_state()
    await state.verify(token)
    state._wall = lambda: principal.expires_at + 1.0
    await state.verify(token)
    assert len(checks) == 3
