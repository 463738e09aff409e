"""services.kit.tokens on its own: boundaries with an injected clock, inputs no gRPC call can
carry, and the rule objects. The table of malformed tokens runs through real services in
tests/unit/gateway/test_verifier_parity.py."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.kit.tokens import (
    Revocations,
    TokenError,
    TokenRules,
    UnknownKeyError,
    key_id,
    signed_identity,
    verify,
)

KEY = Ed25519PrivateKey.generate()
KEYS = {"k1": KEY.public_key()}
RULES = TokenRules(issuer="toolmesh-auth", audience="toolmesh", leeway_s=10)
NOW = 1_800_000_000


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(payload: bytes | None = None, **claims: Any) -> str:
    values: dict[str, Any] = {
        "iss": "toolmesh-auth",
        "aud": "toolmesh",
        "sub": "client-1",
        "tenant": "acme",
        "jti": "j-1",
        "scope": "tools:read admin",
        "roles": ["admin"],
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + 900,
    }
    values.update(claims)
    body = payload if payload is not None else json.dumps(values).encode()
    head = b64(json.dumps({"alg": "EdDSA", "typ": "at+jwt", "kid": "k1"}).encode())
    signing_input = f"{head}.{b64(body)}"
    return f"{signing_input}.{b64(KEY.sign(signing_input.encode()))}"


def reason(raw: str, now: float = NOW, revocations: Revocations | None = None) -> str:
    with pytest.raises(TokenError) as err:
        verify(raw, KEYS, RULES, revocations or Revocations(), now=now)
    assert not raw or raw not in str(err.value)
    return err.value.reason


def test_a_good_token_gives_the_principal() -> None:
    principal = verify(token(), KEYS, RULES, Revocations(), now=NOW)
    assert (principal.subject, principal.tenant, principal.token_id) == ("client-1", "acme", "j-1")
    assert principal.scopes == frozenset({"tools:read", "admin"})
    assert principal.roles == ("admin",)
    assert principal.expires_at == NOW + 900


def test_time_boundaries_with_the_leeway() -> None:
    raw = token()
    assert verify(raw, KEYS, RULES, Revocations(), now=NOW + 900 + 9)
    assert reason(raw, now=NOW + 900 + 10) == "token expired"
    assert verify(raw, KEYS, RULES, Revocations(), now=NOW - 10)
    assert reason(raw, now=NOW - 11) == "token not yet valid"
    assert verify(token(exp=NOW + 3600), KEYS, RULES, Revocations(), now=NOW)
    assert reason(token(exp=NOW + 3601)) == "token lifetime too long"


def test_inputs_no_call_can_carry_are_refused_not_raised() -> None:
    assert reason("") == "missing token"
    assert reason(token() + "é") == "malformed token"
    assert reason("\ud800." + token()) == "malformed token"
    deep = b"[" * 3000 + b"]" * 3000
    assert reason(token(payload=deep)) == "malformed token"
    assert reason(token(payload=b"\xff\xfe")) == "malformed token"
    assert reason(token(payload=b'{"exp": 1' + b"0" * 5000 + b"}")) == "malformed token"


def test_revocations_name_a_tenant_or_any() -> None:
    assert reason(token(), revocations=Revocations(tokens=frozenset({("acme", "j-1")}))) == (
        "token revoked"
    )
    assert reason(token(), revocations=Revocations(tokens=frozenset({("", "j-1")}))) == (
        "token revoked"
    )
    other = Revocations(tokens=frozenset({("globex", "j-1")}))
    assert verify(token(), KEYS, RULES, other, now=NOW).token_id == "j-1"
    disabled = Revocations(disabled_clients=frozenset({"client-1"}))
    assert reason(token(), revocations=disabled) == "client disabled"


def test_an_unknown_kid_is_its_own_error() -> None:
    with pytest.raises(UnknownKeyError) as err:
        verify(token(), {}, RULES, Revocations(), now=NOW)
    assert err.value.kid == "k1"
    assert key_id(token(), RULES) == "k1"


def test_signed_identity_reads_only_verified_claims() -> None:
    expired = token(exp=NOW - 100, iat=NOW - 1000, nbf=NOW - 1000)
    identity = signed_identity(expired, KEYS, RULES)
    assert identity is not None and (identity.tenant, identity.subject) == ("acme", "client-1")
    other = {"k1": Ed25519PrivateKey.generate().public_key()}
    assert signed_identity(expired, other, RULES) is None
    assert signed_identity("not-a-jwt", KEYS, RULES) is None


@pytest.mark.parametrize(
    "changes",
    [
        {"leeway_s": 31},
        {"max_lifetime_s": 3601},
        {"max_token_bytes": 8193},
        {"issuer": ""},
        {"audience": ""},
    ],
)
def test_rules_cannot_loosen_the_caps(changes: dict[str, Any]) -> None:
    values: dict[str, Any] = {"issuer": "i", "audience": "a", **changes}
    with pytest.raises(ValueError):
        TokenRules(**values)
