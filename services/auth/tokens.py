"""Signing access tokens (JWT, EdDSA, typ at+jwt), and verifying them with the kit's verifier
(services.kit.tokens) against the keys and revocations in auth's database."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.auth.keys import ALG, KeyFiles, public_key_from_x
from services.auth.models import CLIENT_ENABLED, KEY_ACTIVE, KEY_VERIFYING, ClientRow
from services.auth.settings import AuthSettings
from services.auth.store import Store
from services.kit.tokens import (
    TOKEN_TYPE,
    Principal,
    TokenRules,
    UnknownKeyError,
    check_standing,
    key_id,
    verified_principal,
)


class NoSigningKey(Exception):
    """No active key, or its private file is not readable on this replica."""


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
        self.rules = TokenRules(
            issuer=settings.issuer, audience=settings.audience, leeway_s=settings.leeway_s
        )
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

    async def verify(self, token: str) -> Principal:
        """The kit's checks in the kit's order; raises services.kit.tokens.TokenError.

        Revocation and client state are read only once the signature verified, so a forged
        token learns nothing about our data."""
        kid = key_id(token, self.rules)
        key = await self._store.key(kid)
        if key is None or key.state not in (KEY_ACTIVE, KEY_VERIFYING):
            raise UnknownKeyError(kid)
        principal = verified_principal(token, self._public_key(kid, key.public_x), self.rules)
        standing = await self._store.standing(
            principal.tenant, principal.token_id, principal.subject
        )
        check_standing(
            principal,
            revoked=standing.revoked,
            client_enabled=standing.client_state == CLIENT_ENABLED,
        )
        return principal
