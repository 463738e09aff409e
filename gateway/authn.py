"""Local token verification against the JWKS, revocations and policy that auth publishes.

No auth hop per request: a background task polls auth every ``auth_refresh_s``. Requests are
verified against the cached state while it is younger than ``auth_staleness_s``; past that the
gateway fails closed (UNAVAILABLE) until auth answers again. Staleness is measured on the
gateway's own monotonic clock from the last successful refresh, so clock skew with auth does
not matter.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from grpc import aio

from gateway.reliability import Guard
from gateway.settings import GatewaySettings
from toolmesh.auth.v1 import auth_pb2, auth_pb2_grpc

log = logging.getLogger("toolmesh.gateway.auth")

ALGORITHM = "EdDSA"
REQUIRED_CLAIMS = ["exp", "iat", "nbf", "jti", "sub", "iss", "aud", "tenant"]
_ACCEPTED_TYP = {"at+jwt", "application/at+jwt"}
# An unknown kid refetches the JWKS at once, but no more often than this.
UNKNOWN_KID_REFETCH_S = 1.0
# Per fetch from auth; the background loop tries again on the next tick.
FETCH_TIMEOUT_S = 2.0


class TokenError(Exception):
    """The token is not acceptable; ``reason`` is short and never contains the token."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnknownKeyError(TokenError):
    """The token names a key id not in the cached JWKS (maybe a freshly rotated key)."""

    def __init__(self, kid: str) -> None:
        super().__init__("unknown signing key")
        self.kid = kid


class AuthUnavailableError(Exception):
    """No auth state, or auth state past its staleness bound: fail closed."""


@dataclass(frozen=True)
class Principal:
    subject: str
    tenant: str
    scopes: frozenset[str]
    roles: tuple[str, ...]
    token_id: str


@dataclass(frozen=True)
class Policy:
    version: str
    # tenant -> allowed tool names; "*" allows every tool.
    tenants: Mapping[str, frozenset[str]]

    def allowed_tools(self, tenant: str) -> frozenset[str]:
        """Deny by default: a tenant the policy does not name may use no tool."""
        return self.tenants.get(tenant, frozenset())


@dataclass(frozen=True)
class AuthSnapshot:
    keys: Mapping[str, jwt.PyJWK]
    revoked: frozenset[str] = frozenset()
    disabled_clients: frozenset[str] = frozenset()
    policy: Policy = Policy(version="", tenants={})


def parse_jwks(jwks_json: str) -> dict[str, jwt.PyJWK]:
    """Ed25519 signing keys by kid; anything else in the set is skipped, never trusted."""
    keys: dict[str, jwt.PyJWK] = {}
    for item in json.loads(jwks_json).get("keys", []):
        kid = item.get("kid")
        if (
            not isinstance(kid, str)
            or not kid
            or item.get("kty") != "OKP"
            or item.get("crv") != "Ed25519"
            or item.get("alg", ALGORITHM) != ALGORITHM
            or item.get("use", "sig") != "sig"
            or "d" in item
        ):
            log.warning("skipping unusable JWK", extra={"kid": str(kid)})
            continue
        try:
            keys[kid] = jwt.PyJWK(item, algorithm=ALGORITHM)
        except jwt.PyJWKError:
            log.warning("skipping malformed JWK", extra={"kid": kid})
    return keys


def parse_policy(response: auth_pb2.GetPolicyResponse) -> Policy:
    return Policy(
        version=response.version,
        tenants={t.tenant: frozenset(t.allowed_tools) for t in response.tenants},
    )


def verify_token(token: str, snapshot: AuthSnapshot, settings: GatewaySettings) -> Principal:
    """Verify signature and claims, then revocation; raises TokenError with a short reason."""
    if len(token.encode()) > settings.max_token_bytes:
        raise TokenError("token too large")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise TokenError("malformed token") from None
    if header.get("alg") != ALGORITHM:
        raise TokenError("unsupported token algorithm")
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYP:
        raise TokenError("wrong token type")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise TokenError("token has no key id")
    key = snapshot.keys.get(kid)
    if key is None:
        raise UnknownKeyError(kid)
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            audience=settings.audience,
            issuer=settings.issuer,
            leeway=settings.leeway_s,
            options={"require": REQUIRED_CLAIMS},
        )
    except jwt.ExpiredSignatureError:
        raise TokenError("token expired") from None
    except jwt.ImmatureSignatureError:
        raise TokenError("token not yet valid") from None
    except jwt.InvalidAudienceError:
        raise TokenError("wrong audience") from None
    except jwt.InvalidIssuerError:
        raise TokenError("wrong issuer") from None
    except jwt.MissingRequiredClaimError as exc:
        raise TokenError(f"missing claim {exc.claim}") from None
    except jwt.InvalidSignatureError:
        raise TokenError("bad signature") from None
    except jwt.PyJWTError:
        raise TokenError("invalid token") from None
    return _principal(claims, snapshot, settings)


def _principal(
    claims: dict[str, Any], snapshot: AuthSnapshot, settings: GatewaySettings
) -> Principal:
    subject, tenant, jti = claims["sub"], claims["tenant"], claims["jti"]
    if not all(isinstance(v, str) and v for v in (subject, tenant, jti)):
        raise TokenError("invalid subject, tenant or token id")
    if claims["exp"] - claims["iat"] > settings.max_token_lifetime_s:
        raise TokenError("token lifetime too long")
    scope = claims.get("scope", "")
    roles = claims.get("roles", [])
    if not isinstance(scope, str) or not (
        isinstance(roles, list) and all(isinstance(r, str) for r in roles)
    ):
        raise TokenError("invalid scope or roles")
    if jti in snapshot.revoked:
        raise TokenError("token revoked")
    if subject in snapshot.disabled_clients:
        raise TokenError("client disabled")
    return Principal(
        subject=subject,
        tenant=tenant,
        scopes=frozenset(scope.split()),
        roles=tuple(roles),
        token_id=jti,
    )


class AuthState:
    """The cached JWKS, revocations and policy, refreshed from auth in the background."""

    def __init__(
        self,
        stub: auth_pb2_grpc.AuthStub,
        settings: GatewaySettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stub = stub
        self._settings = settings
        self._clock = clock
        self._snapshot: AuthSnapshot | None = None
        self._refreshed_at = 0.0
        self._kid_fetched_at = float("-inf")
        self._kid_lock = asyncio.Lock()
        self._loaded = asyncio.Event()

    def snapshot(self) -> AuthSnapshot:
        """The current state, or AuthUnavailableError when there is none fresh enough."""
        if self._snapshot is None:
            raise AuthUnavailableError("authentication state not loaded yet")
        if self._clock() - self._refreshed_at > self._settings.auth_staleness_s:
            raise AuthUnavailableError("authentication state stale and auth unreachable")
        return self._snapshot

    async def refresh(self) -> None:
        """Fetch all three concurrently; the state only changes when all three arrived."""
        jwks, revocations, policy = await asyncio.gather(
            self._stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=FETCH_TIMEOUT_S),
            self._stub.GetRevocations(auth_pb2.GetRevocationsRequest(), timeout=FETCH_TIMEOUT_S),
            self._stub.GetPolicy(auth_pb2.GetPolicyRequest(), timeout=FETCH_TIMEOUT_S),
        )
        keys = parse_jwks(jwks.jwks_json)
        if not keys:
            # Keep the last good keys; if this persists the state goes stale and fails closed.
            raise ValueError("JWKS has no usable Ed25519 key")
        previous = self._snapshot
        self._snapshot = AuthSnapshot(
            keys=keys,
            revoked=frozenset(r.token_id for r in revocations.revoked_tokens),
            disabled_clients=frozenset(revocations.disabled_clients),
            policy=parse_policy(policy),
        )
        self._refreshed_at = self._clock()
        self._loaded.set()
        if previous is None or previous.policy.version != policy.version:
            log.info(
                "auth state loaded",
                extra={"policy_version": policy.version, "keys": sorted(self._snapshot.keys)},
            )

    async def wait_loaded(self) -> None:
        """Returns once keys, revocations and policy have arrived (the readiness hold)."""
        await self._loaded.wait()

    async def run(self, guard: Guard | None = None) -> None:
        """Refresh forever; failures are logged and retried on the next tick, never fatal.

        With ``guard``, each refresh goes through auth's circuit breaker: while it is open the
        tick is skipped (no call), and the cached state keeps serving within its bound.
        """
        failing = False
        while True:
            try:
                if guard is None:
                    await self.refresh()
                else:
                    await guard.run("auth", self.refresh, FETCH_TIMEOUT_S + 0.5)
                if failing:
                    log.info("auth reachable again")
                failing = False
            except Exception as exc:
                # Whatever auth answered, this loop must keep running, or the state goes stale.
                if not failing:
                    log.warning("auth refresh failed", extra={"error": _describe(exc)})
                failing = True
            await asyncio.sleep(self._settings.auth_refresh_s)

    async def verify(self, token: str) -> tuple[Principal, Policy]:
        """Verify ``token``; an unknown kid refetches the JWKS once (rate-limited) and retries."""
        snapshot = self.snapshot()
        try:
            return verify_token(token, snapshot, self._settings), snapshot.policy
        except UnknownKeyError as exc:
            if not await self._refetch_jwks(exc.kid):
                raise
        snapshot = self.snapshot()
        return verify_token(token, snapshot, self._settings), snapshot.policy

    async def _refetch_jwks(self, kid: str) -> bool:
        """True when ``kid`` is known afterwards; concurrent callers share one fetch."""
        async with self._kid_lock:
            current = self._snapshot
            if current is not None and kid in current.keys:
                return True  # fetched by another request while this one waited
            if current is None or self._clock() - self._kid_fetched_at < UNKNOWN_KID_REFETCH_S:
                return False
            self._kid_fetched_at = self._clock()
            try:
                jwks = await self._stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=FETCH_TIMEOUT_S)
                keys = parse_jwks(jwks.jwks_json)
            except (aio.AioRpcError, ValueError) as exc:
                log.warning("JWKS refetch failed", extra={"error": _describe(exc)})
                return False
            if not keys:
                return False
            # Re-read: the background refresh may have replaced the state during the fetch.
            latest = self._snapshot or current
            self._snapshot = AuthSnapshot(
                keys=keys,
                revoked=latest.revoked,
                disabled_clients=latest.disabled_clients,
                policy=latest.policy,
            )
            return kid in keys


def _describe(exc: Exception) -> str:
    if isinstance(exc, aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
