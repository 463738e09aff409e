"""Access-token verification: the one verifier of the gateway and auth.

Both services verify the same tokens by the same rules, so a token one accepts the other
accepts, and a token one refuses the other refuses with the same short reason. The rules:

- Form: compact JWS, ASCII, at most ``max_token_bytes`` (8 KiB). Header ``alg`` exactly
  ``EdDSA`` (never an HMAC algorithm, so a public key can never serve as an HMAC secret),
  ``typ`` ``at+jwt`` (RFC 9068; case-insensitive, ``application/`` prefix allowed), ``kid`` a
  non-empty string; no ``crit`` or ``b64`` header (no JWS extension is understood here).
- Signature: Ed25519 with the key named by ``kid``; only then are claims read as facts.
- Claims, all required: ``iss aud sub tenant jti iat nbf exp``; ``scope`` (string) and ``roles``
  (list of strings) optional. Exact types: ``iat``/``nbf``/``exp`` are JSON integers (not a
  string, float, boolean) from 0 to 253402300799 (9999-12-31); ``sub``/``tenant``/``jti`` are
  strings of 1-256 characters. The payload is strict JSON: no duplicate names, no NaN/Infinity.
- ``iss`` equals the issuer. ``aud`` is the audience as a string, or a list holding only it
  (``["toolmesh"]``): a token also meant for another audience is refused.
- Time, with ``leeway_s`` (at most 30 s) of clock skew: ``exp`` not past, ``nbf`` and ``iat``
  not in the future, lifetime ``exp - iat`` at most ``max_lifetime_s`` (at most 3600 s).
- Standing: not revoked (a revocation names the token id and its tenant, or any tenant), and
  the client is enabled.

A refusal raises :class:`TokenError` whose ``reason`` is a short fixed phrase, never the token
or a claim value; nothing else escapes, whatever the bytes. Callers supply only the key (by
``kid``) and the standing (revocations, client state), from a cached snapshot (the gateway) or
the database (auth).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

ALGORITHM = "EdDSA"
TOKEN_TYPE = "at+jwt"  # noqa: S105 - RFC 9068 header value
MAX_TOKEN_BYTES = 8 * 1024
MAX_TOKEN_LIFETIME_S = 3600
MAX_LEEWAY_S = 30
# Checked in this order, so the reason for a token missing several names the first.
REQUIRED_CLAIMS = ("iss", "aud", "sub", "tenant", "jti", "iat", "nbf", "exp")
TIME_CLAIMS = ("iat", "nbf", "exp")
# 9999-12-31T23:59:59Z: the last second a protobuf Timestamp or a datetime can hold.
MAX_TIME = 253_402_300_799
MAX_ID_CHARS = 256
MAX_SCOPE_CHARS = 4096
MAX_KID_CHARS = 128
_UNSUPPORTED_HEADERS = ("crit", "b64")

# The only algorithm this JWS instance knows: a token naming another cannot even be decoded.
_JWS = jwt.PyJWS(algorithms=[ALGORITHM])

VerifyKey = jwt.PyJWK | Ed25519PublicKey


class TokenError(Exception):
    """The token is not acceptable; ``reason`` is short and never contains the token.

    ``identity`` is set when the signature verified (an expired or revoked token, say), so the
    refusal can be recorded against the token's real tenant and subject.
    """

    def __init__(self, reason: str, identity: Identity | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.identity = identity


class UnknownKeyError(TokenError):
    """The token names a key id the verifier does not have (a fresh key, or a retired one)."""

    def __init__(self, kid: str) -> None:
        super().__init__("unknown signing key")
        self.kid = kid


@dataclass(frozen=True)
class TokenRules:
    """What a verifier is configured with; the caps above can be lowered, never raised."""

    issuer: str
    audience: str
    leeway_s: int = 10
    max_lifetime_s: int = MAX_TOKEN_LIFETIME_S
    max_token_bytes: int = MAX_TOKEN_BYTES

    def __post_init__(self) -> None:
        if not self.issuer or not self.audience:
            raise ValueError("issuer and audience are required")
        if not 0 <= self.leeway_s <= MAX_LEEWAY_S:
            raise ValueError(f"leeway_s must be 0-{MAX_LEEWAY_S}")
        if not 0 < self.max_lifetime_s <= MAX_TOKEN_LIFETIME_S:
            raise ValueError(f"max_lifetime_s must be 1-{MAX_TOKEN_LIFETIME_S}")
        if not 0 < self.max_token_bytes <= MAX_TOKEN_BYTES:
            raise ValueError(f"max_token_bytes must be 1-{MAX_TOKEN_BYTES}")


@dataclass(frozen=True)
class Identity:
    """Who a token whose signature verified names; strings, empty when the claim was not one."""

    tenant: str
    subject: str
    token_id: str


@dataclass(frozen=True)
class Principal:
    """The verified caller."""

    subject: str
    tenant: str
    scopes: frozenset[str]
    roles: tuple[str, ...]
    token_id: str
    expires_at: int = 0


@dataclass(frozen=True)
class Revocations:
    """Revoked tokens and refused clients, as auth publishes them (GetRevocations).

    A revocation names a token id and the tenant whose token it is, so a tenant's admin can
    only ever revoke its own tenant's tokens; an empty tenant (the platform operator's, or one
    recorded before revocations had tenants) revokes that token id in any tenant.
    """

    tokens: frozenset[tuple[str, str]] = frozenset()
    disabled_clients: frozenset[str] = frozenset()

    def token_revoked(self, tenant: str, token_id: str) -> bool:
        return (tenant, token_id) in self.tokens or ("", token_id) in self.tokens


def key_id(token: str, rules: TokenRules) -> str:
    """The ``kid`` to verify ``token`` with, after every check that needs no key."""
    if not token:
        raise TokenError("missing token")
    if not token.isascii():
        raise TokenError("malformed token")
    if len(token) > rules.max_token_bytes:
        raise TokenError("token too large")
    try:
        header = _JWS.get_unverified_header(token)
    except (jwt.PyJWTError, ValueError, TypeError):
        raise TokenError("malformed token") from None
    if header.get("alg") != ALGORITHM:
        raise TokenError("algorithm not allowed")
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower().removeprefix("application/") != TOKEN_TYPE:
        raise TokenError("wrong token type")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > MAX_KID_CHARS:
        raise TokenError("missing key id")
    if any(name in header for name in _UNSUPPORTED_HEADERS):
        raise TokenError("unsupported header")
    return kid


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate name")
    return result


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _refuse_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def _signed_claims(token: str, key: VerifyKey) -> dict[str, Any]:
    """The payload of ``token`` once its signature verifies with ``key``, as strict JSON."""
    try:
        payload = _JWS.decode(token, key, algorithms=[ALGORITHM])
    except jwt.InvalidSignatureError:
        raise TokenError("bad signature") from None
    except (jwt.PyJWTError, ValueError, TypeError):
        raise TokenError("invalid token") from None
    try:
        claims = json.loads(
            payload,
            object_pairs_hook=_no_duplicates,
            parse_float=_finite,
            parse_constant=_refuse_constant,
        )
    except (ValueError, TypeError, RecursionError):
        raise TokenError("malformed token") from None
    if not isinstance(claims, dict):
        raise TokenError("malformed token")
    return claims


def _identity(claims: Mapping[str, Any]) -> Identity:
    def text(name: str) -> str:
        value = claims.get(name)
        return value if isinstance(value, str) and len(value) <= MAX_ID_CHARS else ""

    return Identity(tenant=text("tenant"), subject=text("sub"), token_id=text("jti"))


def _is_time(value: object) -> bool:
    # bool is an int subclass: True must not pass for a time.
    return type(value) is int and 0 <= value <= MAX_TIME


def _is_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS


def verified_principal(
    token: str, key: VerifyKey, rules: TokenRules, *, now: float | None = None
) -> Principal:
    """Verify the signature of ``token`` with ``key``, then every claim (types first)."""
    claims = _signed_claims(token, key)
    identity = _identity(claims)

    def refuse(reason: str) -> TokenError:
        return TokenError(reason, identity)

    for name in REQUIRED_CLAIMS:
        if name not in claims:
            raise refuse(f"missing claim {name}")
    for name in ("sub", "tenant", "jti"):
        if not _is_id(claims[name]):
            raise refuse(f"bad claim {name}")
    for name in TIME_CLAIMS:
        if not _is_time(claims[name]):
            raise refuse(f"bad claim {name}")
    scope = claims.get("scope", "")
    if not isinstance(scope, str) or len(scope) > MAX_SCOPE_CHARS:
        raise refuse("bad claim scope")
    roles = claims.get("roles", [])
    if not isinstance(roles, list) or not all(_is_id(role) for role in roles):
        raise refuse("bad claim roles")
    if claims["iss"] != rules.issuer:
        raise refuse("wrong issuer")
    if claims["aud"] != rules.audience and claims["aud"] != [rules.audience]:
        raise refuse("wrong audience")
    current = time.time() if now is None else now
    exp, iat, nbf = claims["exp"], claims["iat"], claims["nbf"]
    if exp <= current - rules.leeway_s:
        raise refuse("token expired")
    if nbf > current + rules.leeway_s or iat > current + rules.leeway_s:
        raise refuse("token not yet valid")
    if exp - iat > rules.max_lifetime_s:
        raise refuse("token lifetime too long")
    return Principal(
        subject=claims["sub"],
        tenant=claims["tenant"],
        scopes=frozenset(scope.split()),
        roles=tuple(roles),
        token_id=claims["jti"],
        expires_at=exp,
    )


def check_standing(principal: Principal, *, revoked: bool, client_enabled: bool) -> None:
    """Refuse a verified token that was revoked or whose client may no longer act."""
    identity = Identity(principal.tenant, principal.subject, principal.token_id)
    if revoked:
        raise TokenError("token revoked", identity)
    if not client_enabled:
        raise TokenError("client disabled", identity)


def verify(
    token: str,
    keys: Mapping[str, VerifyKey],
    rules: TokenRules,
    revocations: Revocations,
    *,
    now: float | None = None,
) -> Principal:
    """Every check, against keys and revocations held in memory (the gateway's snapshot)."""
    kid = key_id(token, rules)
    key = keys.get(kid)
    if key is None:
        raise UnknownKeyError(kid)
    principal = verified_principal(token, key, rules, now=now)
    check_standing(
        principal,
        revoked=revocations.token_revoked(principal.tenant, principal.token_id),
        client_enabled=principal.subject not in revocations.disabled_clients,
    )
    return principal


def signed_identity(
    token: str, keys: Mapping[str, VerifyKey], rules: TokenRules
) -> Identity | None:
    """Who a token names when only its signature is checked (not its time, audience or
    standing), for recording a refusal: None unless the signature verifies with a known key,
    because the claims of an unverified token are the sender's word, never a fact."""
    try:
        key = keys.get(key_id(token, rules))
        if key is None:
            return None
        return _identity(_signed_claims(token, key))
    except TokenError:
        return None
