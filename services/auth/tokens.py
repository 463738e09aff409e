"""Signing and verifying access tokens (JWT, EdDSA, typ at+jwt)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.auth.keys import ALG, KeyFiles, public_key_from_x
from services.auth.models import CLIENT_ENABLED, KEY_ACTIVE, KEY_VERIFYING, ClientRow
from services.auth.settings import MAX_TOKEN_LIFETIME_S, AuthSettings
from services.auth.store import Store

TOKEN_TYPE = "at+jwt"  # noqa: S105 - RFC 9068 header value
MAX_TOKEN_BYTES = 8 * 1024
REQUIRED_CLAIMS = ["exp", "iat", "nbf", "jti", "sub", "iss", "aud", "tenant"]


class TokenRejected(Exception):
    """Verification failed; the message is a short reason that never contains the token."""


class NoSigningKey(Exception):
    """No active key, or its private file is not readable on this replica."""


@dataclass(frozen=True)
class Claims:
    subject: str
    tenant: str
    scopes: list[str]
    roles: list[str]
    token_id: str
    expires_at: float


@dataclass(frozen=True)
class Issued:
    token: str
    token_id: str
    expires_in: int


class Tokens:
    def __init__(self, settings: AuthSettings, store: Store, key_files: KeyFiles) -> None:
        self._settings = settings
        self._store = store
        self._files = key_files
        self._public: dict[str, Ed25519PublicKey] = {}

    async def issue(self, client: ClientRow, scopes: list[str]) -> Issued:
        signer = await self._store.signing_key()
        if signer is None:
            raise NoSigningKey("no active signing key")
        try:
            private = self._files.load(signer.kid, signer.public_x)
        except (OSError, ValueError) as error:
            raise NoSigningKey(f"signing key {signer.kid} not loadable here") from error
        now = int(time.time())
        ttl = self._settings.token_ttl_s
        token_id = uuid.uuid4().hex
        claims: dict[str, Any] = {
            "iss": self._settings.issuer,
            "aud": self._settings.audience,
            "sub": client.client_id,
            "tenant": client.tenant,
            "scope": " ".join(scopes),
            "roles": client.roles.split(),
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": token_id,
        }
        token = jwt.encode(
            claims, private, algorithm=ALG, headers={"kid": signer.kid, "typ": TOKEN_TYPE}
        )
        return Issued(token=token, token_id=token_id, expires_in=ttl)

    def _public_key(self, kid: str, x: str) -> Ed25519PublicKey:
        key = self._public.get(kid)
        if key is None:
            key = self._public[kid] = public_key_from_x(x)
        return key

    async def verify(self, token: str) -> Claims:
        """Every check a verifier must make; the first failure raises TokenRejected."""
        if not token:
            raise TokenRejected("missing token")
        if len(token.encode()) > MAX_TOKEN_BYTES:
            raise TokenRejected("token too large")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRejected("malformed token") from None
        if header.get("alg") != ALG:
            raise TokenRejected("algorithm not allowed")
        typ = header.get("typ")
        # Media types compare case-insensitively; RFC 9068 allows the "application/" prefix.
        if not isinstance(typ, str) or typ.lower().removeprefix("application/") != TOKEN_TYPE:
            raise TokenRejected("wrong token type")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenRejected("missing key id")
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise TokenRejected("malformed token") from None
        jti, subject = unverified.get("jti"), unverified.get("sub")
        if not isinstance(jti, str) or not jti:
            raise TokenRejected("missing claim jti")
        if not isinstance(subject, str) or not subject:
            raise TokenRejected("missing claim sub")
        facts = await self._store.verify_facts(kid, jti, subject)
        if facts.key is None or facts.key.state not in (KEY_ACTIVE, KEY_VERIFYING):
            raise TokenRejected("unknown signing key")
        claims = self._decode(token, self._public_key(kid, facts.key.public_x))
        # Checked after the signature so an unsigned token learns nothing about our data.
        if facts.revoked:
            raise TokenRejected("token revoked")
        if facts.client_state != CLIENT_ENABLED:
            raise TokenRejected("client disabled")
        return claims

    def _decode(self, token: str, key: Ed25519PublicKey) -> Claims:
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[ALG],
                audience=self._settings.audience,
                issuer=self._settings.issuer,
                leeway=self._settings.leeway_s,
                options={"require": REQUIRED_CLAIMS, "strict_aud": True},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRejected("token expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenRejected("token not yet valid") from None
        except jwt.InvalidIssuerError:
            raise TokenRejected("wrong issuer") from None
        except jwt.InvalidAudienceError:
            raise TokenRejected("wrong audience") from None
        except jwt.MissingRequiredClaimError as error:
            raise TokenRejected(f"missing claim {error.claim}") from None
        except jwt.InvalidSignatureError:
            raise TokenRejected("bad signature") from None
        except jwt.PyJWTError:
            raise TokenRejected("invalid token") from None
        if payload["exp"] - payload["iat"] > MAX_TOKEN_LIFETIME_S:
            raise TokenRejected("token lifetime too long")
        tenant, scope, roles = payload["tenant"], payload.get("scope", ""), payload.get("roles", [])
        if not isinstance(tenant, str) or not tenant:
            raise TokenRejected("bad claim tenant")
        if not isinstance(scope, str):
            raise TokenRejected("bad claim scope")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise TokenRejected("bad claim roles")
        return Claims(
            subject=payload["sub"],
            tenant=tenant,
            scopes=scope.split(),
            roles=roles,
            token_id=payload["jti"],
            expires_at=float(payload["exp"]),
        )
