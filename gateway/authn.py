"""Local token verification against the JWKS, revocations and policy that auth publishes.

No auth hop per request: a background task polls auth every ``auth_refresh_s``. Requests are
verified against the cached state while it is younger than ``auth_staleness_s``; past that the
gateway fails closed (UNAVAILABLE) until auth answers again. Staleness is measured on the
gateway's own monotonic clock from the last successful refresh, so clock skew with auth does
not matter.

The checks themselves are services.kit.tokens, the verifier auth runs too: this module only
supplies the cached keys and revocations and the rules from the gateway's settings.

A verified token is remembered until it expires (``VERIFIED_CACHE_SIZE`` tokens at most): a
repeated token skips the signature check, never the rest. Every use still needs the state to
be within its staleness bound, the token's key still published, its expiry not passed, and
the current revocations to name neither the token nor its client, so a revocation takes
effect on the next refresh exactly as without the cache.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import jwt
from grpc import aio

from gateway.reliability import Guard
from gateway.settings import GatewaySettings
from services.kit.tokens import (
    ALGORITHM,
    MAX_TOKEN_BYTES,
    MAX_TOKEN_LIFETIME_S,
    Principal,
    Revocations,
    TokenError,
    TokenRules,
    UnknownKeyError,
    check_standing,
    key_id,
    verify,
)
from toolmesh.auth.v1 import auth_pb2, auth_pb2_grpc

log = logging.getLogger("toolmesh.gateway.auth")

# An unknown kid refetches the JWKS at once, but no more often than this.
UNKNOWN_KID_REFETCH_S = 1.0
# Per fetch from auth; the background loop tries again on the next tick.
FETCH_TIMEOUT_S = 2.0
# Verified tokens remembered (oldest forgotten first).
VERIFIED_CACHE_SIZE = 4096

__all__ = [
    "ALGORITHM",
    "AuthSnapshot",
    "AuthState",
    "AuthUnavailableError",
    "Policy",
    "Principal",
    "TokenError",
    "UnknownKeyError",
    "parse_jwks",
    "parse_revocations",
    "token_rules",
    "verify_token",
]


class AuthUnavailableError(Exception):
    """No auth state, or auth state past its staleness bound: fail closed."""


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
    revocations: Revocations = field(default_factory=Revocations)
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


def parse_revocations(response: auth_pb2.GetRevocationsResponse) -> Revocations:
    """Revoked (tenant, token id) pairs (an empty tenant: any tenant) and refused clients."""
    return Revocations(
        tokens=frozenset((r.tenant, r.token_id) for r in response.revoked_tokens),
        disabled_clients=frozenset(response.disabled_clients),
    )


def parse_policy(response: auth_pb2.GetPolicyResponse) -> Policy:
    return Policy(
        version=response.version,
        tenants={t.tenant: frozenset(t.allowed_tools) for t in response.tenants},
    )


def token_rules(settings: GatewaySettings) -> TokenRules:
    """The kit's verifier rules from the gateway's settings; the size and lifetime settings
    can lower the kit's caps (8 KiB, 3600 s), never raise them, so auth and every gateway
    accept the same tokens."""
    return TokenRules(
        issuer=settings.issuer,
        audience=settings.audience,
        leeway_s=settings.leeway_s,
        max_lifetime_s=min(settings.max_token_lifetime_s, MAX_TOKEN_LIFETIME_S),
        max_token_bytes=min(settings.max_token_bytes, MAX_TOKEN_BYTES),
    )


def verify_token(
    token: str, snapshot: AuthSnapshot, rules: TokenRules, *, now: float | None = None
) -> Principal:
    """Every check of services.kit.tokens against the cached keys and revocations."""
    return verify(token, snapshot.keys, rules, snapshot.revocations, now=now)


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
        self.rules = token_rules(settings)
        self._clock = clock
        self._snapshot: AuthSnapshot | None = None
        self._refreshed_at = 0.0
        self._kid_fetched_at = float("-inf")
        self._kid_lock = asyncio.Lock()
        self._loaded = asyncio.Event()
        # token -> (principal, kid): signatures already checked.
        self._verified: dict[str, tuple[Principal, str]] = {}
        self._wall = time.time

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
            revocations=parse_revocations(revocations),
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
        known = self._verified.get(token)
        if known is not None:
            principal, kid = known
            if kid in snapshot.keys and self._wall() < principal.expires_at:
                revocations = snapshot.revocations
                check_standing(
                    principal,
                    revoked=revocations.token_revoked(principal.tenant, principal.token_id),
                    client_enabled=principal.subject not in revocations.disabled_clients,
                )
                return principal, snapshot.policy
            del self._verified[token]
        try:
            principal = verify_token(token, snapshot, self.rules)
        except UnknownKeyError as exc:
            if not await self._refetch_jwks(exc.kid):
                raise
            snapshot = self.snapshot()
            principal = verify_token(token, snapshot, self.rules)
        self._remember(token, principal)
        return principal, snapshot.policy

    def _remember(self, token: str, principal: Principal) -> None:
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = (principal, key_id(token, self.rules))

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
                revocations=latest.revocations,
                policy=latest.policy,
            )
            return kid in keys


def _describe(exc: Exception) -> str:
    if isinstance(exc, aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
