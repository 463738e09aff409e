"""The bearer token at the HTTP layer: 401 before any MCP message is read.

The face holds no keys and decides nothing: the gateway verifies the token (signature,
expiry, revocation, policy) on every gRPC call it receives. The face only needs to know,
before it speaks MCP, whether the gateway accepts the token, so that a missing or rejected
token gets HTTP 401 with ``WWW-Authenticate: Bearer`` as MCP's authorization specification
asks (an MCP client then re-authenticates) rather than an error inside the protocol. It asks
the gateway once per token (GetServiceInfo, which any valid token may call) and remembers the
answer for ``token_cache_s``, never past the token's expiry.

Once the gateway accepted a token, the face reads its claims (tenant, subject, scopes)
without verifying the signature again: only to list the tools the caller's scopes allow
(the gateway re-checks scope and allowlist on every call) and to bind nothing else. The token
is never logged; the cache is keyed by its SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import jwt
from grpc import aio
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from starlette.authentication import AuthCredentials
from starlette.types import ASGIApp, Receive, Scope, Send

from services.kit.bearer import bearer_token
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger("toolmesh.mcpface.auth")

CALLER_SCOPE_KEY = "toolmesh.caller"
REALM = "toolmesh"
# A token longer than this is refused before any hop (the gateway's own cap is 8 KiB).
MAX_TOKEN_BYTES = 16 * 1024


@dataclass(frozen=True)
class Caller:
    """Who is calling, as far as the face needs to know: the token to forward, and the claims
    that decide which tools are listed."""

    token: str
    tenant: str
    subject: str
    scopes: frozenset[str]


class TokenRejected(Exception):
    """The gateway refused the token (UNAUTHENTICATED); the reason is safe to show."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class GatewayUnavailable(Exception):
    """The gateway could not say whether the token is good; the caller should retry."""


def _claims(token: str) -> dict[str, Any]:
    """The token's claims, unverified (the gateway verified the token)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return {}
    return claims if isinstance(claims, dict) else {}


def _key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenCheck:
    """Whether the gateway accepts a token, remembered per token for a short while."""

    def __init__(
        self,
        stub: gateway_pb2_grpc.GatewayStub,
        *,
        cache_s: float,
        cache_size: int,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._stub = stub
        self._cache_s = cache_s
        self._cache_size = cache_size
        self._timeout_s = timeout_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._known: OrderedDict[str, tuple[float, Caller]] = OrderedDict()

    async def caller(self, token: str) -> Caller:
        key = _key(token)
        now = self._clock()
        known = self._known.get(key)
        if known is not None and known[0] > now:
            self._known.move_to_end(key)
            return known[1]
        self._known.pop(key, None)
        try:
            await self._stub.GetServiceInfo(
                gateway_pb2.GetServiceInfoRequest(),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=self._timeout_s,
            )
        except aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise TokenRejected(err.details() or "invalid token") from None
            log.warning("token check failed", extra={"code": err.code().name})
            raise GatewayUnavailable(err.code().name) from None
        claims = _claims(token)
        scope = claims.get("scope", "")
        caller = Caller(
            token=token,
            tenant=str(claims.get("tenant", "")),
            subject=str(claims.get("sub", "")),
            scopes=frozenset(scope.split()) if isinstance(scope, str) else frozenset(),
        )
        lifetime = self._cache_s
        expiry = claims.get("exp")
        if isinstance(expiry, int | float):
            lifetime = min(lifetime, expiry - self._wall_clock())
        if lifetime > 0:
            self._known[key] = (now + lifetime, caller)
            while len(self._known) > self._cache_size:
                self._known.popitem(last=False)
        return caller

    def forget(self, token: str) -> None:
        """The gateway refused the token on a later call (revoked, expired): check it again."""
        self._known.pop(_key(token), None)


def _challenge(
    status: int, error: str, description: str
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """An RFC 6750 challenge: no error code when no token was sent at all."""
    parts = [f'realm="{REALM}"']
    if error:
        safe = description.replace("\\", "").replace('"', "'")
        parts += [f'error="{error}"', f'error_description="{safe}"']
    body = json.dumps({"error": error or "unauthorized", "error_description": description})
    headers = [
        (b"content-type", b"application/json"),
        (b"www-authenticate", ("Bearer " + ", ".join(parts)).encode()),
    ]
    return status, headers, body.encode()


class BearerGate:
    """ASGI middleware in front of the MCP endpoint: no token or a rejected one is HTTP 401;
    the gateway unreachable is 503 with Retry-After; otherwise the caller rides in the ASGI
    scope (``scope["toolmesh.caller"]``, and ``scope["user"]`` as the MCP SDK expects)."""

    def __init__(self, app: ASGIApp, check: TokenCheck, retry_after_s: int = 1) -> None:
        self._app = app
        self._check = check
        self._retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = [(k.decode("latin-1"), v) for k, v in scope.get("headers", ())]
        token = bearer_token(headers)
        if not token:
            await _respond(send, *_challenge(401, "", "a bearer token is required"))
            return
        if len(token) > MAX_TOKEN_BYTES:
            await _respond(send, *_challenge(401, "invalid_token", "token too large"))
            return
        try:
            caller = await self._check.caller(token)
        except TokenRejected as rejected:
            log.info("token rejected", extra={"reason": rejected.reason})
            await _respond(send, *_challenge(401, "invalid_token", rejected.reason))
            return
        except GatewayUnavailable:
            body = json.dumps(
                {"error": "temporarily_unavailable", "error_description": "retry later"}
            ).encode()
            retry = str(self._retry_after_s).encode()
            await _respond(
                send, 503, [(b"content-type", b"application/json"), (b"retry-after", retry)], body
            )
            return
        scope[CALLER_SCOPE_KEY] = caller
        scope["auth"] = AuthCredentials(sorted(caller.scopes))
        scope["user"] = AuthenticatedUser(
            AccessToken(
                token=token,
                client_id=f"{caller.tenant}/{caller.subject}",
                scopes=sorted(caller.scopes),
                subject=caller.subject,
                claims={"tenant": caller.tenant},
            )
        )
        await self._app(scope, receive, send)


async def _respond(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
