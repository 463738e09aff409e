"""The toolmesh.auth.v1.Auth servicer: token issuance and verification, keys, clients, policy."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import grpc
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio
from pydantic import SecretStr

from services.auth.keys import KeyFiles, public_jwk
from services.auth.models import (
    CLIENT_DELETED,
    CLIENT_DISABLED,
    CLIENT_ENABLED,
    CLIENT_REVOKED,
    KEY_ACTIVE,
    KEY_RETIRED,
    KEY_VERIFYING,
    ClientRow,
    SigningKeyRow,
)
from services.auth.policy import NAME_PATTERN, SCOPE_PATTERN, PolicySource
from services.auth.settings import MAX_TOKEN_LIFETIME_S, AuthSettings
from services.auth.store import Conflict, NotFound, Store, StoreError, WrongState
from services.auth.throttle import FailureThrottle
from services.auth.tokens import Claims, NoSigningKey, TokenRejected, Tokens
from services.kit.buildinfo import service_info
from services.kit.errors import abort, abort_invalid, retry_info
from toolmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from toolmesh.common.v1 import common_pb2

T = TypeVar("T")

audit_log = logging.getLogger("toolmesh.auth.audit")
log = logging.getLogger("toolmesh.auth")

CONTRACT_VERSIONS = ["toolmesh.auth.v1"]
ADMIN_SCOPE = "admin"
CLIENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
OPAQUE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_SECRET_CHARS = 256

_CLIENT_STATES = {
    CLIENT_ENABLED: auth_pb2.CLIENT_STATE_ENABLED,
    CLIENT_DISABLED: auth_pb2.CLIENT_STATE_DISABLED,
    CLIENT_REVOKED: auth_pb2.CLIENT_STATE_REVOKED,
    CLIENT_DELETED: auth_pb2.CLIENT_STATE_DELETED,
}
_KEY_STATES = {
    KEY_ACTIVE: auth_pb2.KEY_STATE_ACTIVE,
    KEY_VERIFYING: auth_pb2.KEY_STATE_VERIFYING,
    KEY_RETIRED: auth_pb2.KEY_STATE_RETIRED,
}
_STORE_CODES = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    Conflict: grpc.StatusCode.ALREADY_EXISTS,
    WrongState: grpc.StatusCode.FAILED_PRECONDITION,
}


def audit(event: str, actor: str, target: str, outcome: str, **fields: object) -> None:
    """One structured line per security-relevant event; callers never pass secrets."""
    audit_log.info(
        "audit",
        extra={"event": event, "actor": actor, "target": target, "outcome": outcome, **fields},
    )


def timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def client_pb(row: ClientRow) -> auth_pb2.Client:
    return auth_pb2.Client(
        client_id=row.client_id,
        tenant=row.tenant,
        scopes=row.scopes.split(),
        roles=row.roles.split(),
        state=_CLIENT_STATES[row.state],
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
    )


def key_pb(row: SigningKeyRow) -> auth_pb2.SigningKey:
    return auth_pb2.SigningKey(
        kid=row.kid,
        alg=row.alg,
        state=_KEY_STATES[row.state],
        created_at=timestamp(row.created_at),
        state_changed_at=timestamp(row.state_changed_at),
        dev=row.dev,
        signs_from=timestamp(row.signs_from),
    )


def bad_entries(field: str, values: Sequence[str], pattern: str) -> list[tuple[str, str]]:
    return [
        (f"{field}[{i}]", "not a valid name")
        for i, value in enumerate(values)
        if not re.fullmatch(pattern, value)
    ]


class SecretHasher:
    """argon2id hashing off the event loop: one verification costs about 100 ms of CPU.

    At most one hash per core runs at a time; the rest queue here rather than fill the default
    thread pool that other blocking work shares.
    """

    def __init__(self) -> None:
        self._hasher = PasswordHasher()
        # Unknown client ids are checked against this so they cost as long as a wrong secret.
        self._decoy = self._hasher.hash(secrets.token_urlsafe(32))
        self._slots = asyncio.Semaphore(os.cpu_count() or 2)

    async def hash(self, secret: SecretStr) -> str:
        async with self._slots:
            return await asyncio.to_thread(self._hasher.hash, secret.get_secret_value())

    async def matches(self, secret_hash: str, secret: SecretStr) -> bool:
        def check() -> bool:
            try:
                return self._hasher.verify(secret_hash or self._decoy, secret.get_secret_value())
            except (VerificationError, InvalidHashError):
                return False

        async with self._slots:
            return await asyncio.to_thread(check) and bool(secret_hash)


def new_secret() -> SecretStr:
    return SecretStr(secrets.token_urlsafe(32))


class AuthServicer(auth_pb2_grpc.AuthServicer):
    """Holds no state of its own beyond per-replica caches: any replica can answer any call."""

    def __init__(
        self,
        settings: AuthSettings,
        store: Store,
        key_files: KeyFiles,
        policy: PolicySource,
        hasher: SecretHasher,
    ) -> None:
        self._settings = settings
        self._store = store
        self._keys = key_files
        self._policy = policy
        self._hasher = hasher
        self._tokens = Tokens(settings, store, key_files)
        self._throttle = FailureThrottle(
            settings.throttle_failures, settings.throttle_window_s, settings.throttle_backoff_s
        )

    # --- public RPCs --------------------------------------------------------------------

    async def IssueToken(
        self, request: auth_pb2.IssueTokenRequest, context: aio.ServicerContext
    ) -> auth_pb2.IssueTokenResponse:
        violations: list[tuple[str, str]] = []
        if not re.fullmatch(CLIENT_ID_PATTERN, request.client_id):
            violations.append(("client_id", "required, 1-64 letters, digits, '_', '.', '-'"))
        if not request.client_secret or len(request.client_secret) > MAX_SECRET_CHARS:
            violations.append(("client_secret", f"required, at most {MAX_SECRET_CHARS} chars"))
        violations += bad_entries("scopes", request.scopes, SCOPE_PATTERN)
        if violations:
            await abort_invalid(context, violations)
        client_id, secret = request.client_id, SecretStr(request.client_secret)
        wait = self._throttle.begin(client_id)
        if wait:
            audit("token.issue", client_id, client_id, "throttled")
            await abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "too many failed attempts for this client; retry later",
                retry_info(wait),
            )
        client = await self._store.client(client_id)
        if not await self._hasher.matches(client.secret_hash if client else "", secret):
            audit("token.issue", client_id, client_id, "denied", reason="bad credentials")
            # One message for unknown id and wrong secret: no hint which one was wrong.
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, "invalid client credentials")
        assert client is not None
        self._throttle.succeeded(client_id)
        if client.state != CLIENT_ENABLED:
            audit("token.issue", client_id, client_id, "denied", reason=client.state)
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, "client is disabled")
        granted = set(client.scopes.split()) | self._policy.current().role_scopes(
            client.roles.split()
        )
        wanted = list(dict.fromkeys(request.scopes)) or sorted(granted)
        for scope in wanted:
            if scope not in granted:
                audit("token.issue", client_id, client_id, "denied", reason=f"scope {scope}")
                await abort(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"scope {scope} is not granted to this client",
                )
        try:
            issued = await self._tokens.issue(client, wanted)
        except NoSigningKey as error:
            log.error("cannot sign", extra={"error": str(error)})
            await abort(context, grpc.StatusCode.UNAVAILABLE, "signing key unavailable")
        audit(
            "token.issue",
            client_id,
            client_id,
            "ok",
            tenant=client.tenant,
            token_id=issued.token_id,
            scopes=wanted,
        )
        return auth_pb2.IssueTokenResponse(
            access_token=issued.token,
            token_type="Bearer",  # noqa: S106 - the RFC 6750 scheme name
            expires_in=issued.expires_in,
            scopes=wanted,
            token_id=issued.token_id,
        )

    async def GetJwks(
        self, request: auth_pb2.GetJwksRequest, context: aio.ServicerContext
    ) -> auth_pb2.GetJwksResponse:
        rows = await self._store.keys(KEY_ACTIVE, KEY_VERIFYING)
        jwks = {"keys": [public_jwk(row.kid, row.public_x) for row in rows]}
        return auth_pb2.GetJwksResponse(jwks_json=json.dumps(jwks, separators=(",", ":")))

    async def VerifyToken(
        self, request: auth_pb2.VerifyTokenRequest, context: aio.ServicerContext
    ) -> auth_pb2.VerifyTokenResponse:
        claims = await self._verify(request.token, context)
        return auth_pb2.VerifyTokenResponse(
            caller=common_pb2.Caller(
                subject=claims.subject,
                tenant=claims.tenant,
                scopes=claims.scopes,
                roles=claims.roles,
            ),
            token_id=claims.token_id,
            expires_at=timestamp(claims.expires_at),
        )

    async def GetRevocations(
        self, request: auth_pb2.GetRevocationsRequest, context: aio.ServicerContext
    ) -> auth_pb2.GetRevocationsResponse:
        revoked, disabled, as_of = await self._store.revocations()
        return auth_pb2.GetRevocationsResponse(
            revoked_tokens=[
                auth_pb2.RevokedToken(token_id=row.jti, expires_at=timestamp(row.expires_at))
                for row in revoked
            ],
            disabled_clients=disabled,
            as_of=timestamp(as_of),
        )

    async def GetPolicy(
        self, request: auth_pb2.GetPolicyRequest, context: aio.ServicerContext
    ) -> auth_pb2.GetPolicyResponse:
        policy = self._policy.current()
        return auth_pb2.GetPolicyResponse(
            version=policy.version,
            tenants=[
                auth_pb2.TenantPolicy(tenant=name, allowed_tools=rules.allowed_tools)
                for name, rules in sorted(policy.tenants.items())
            ],
            roles=[
                auth_pb2.RoleScopes(role=role, scopes=scopes)
                for role, scopes in sorted(policy.roles.items())
            ],
        )

    async def GetServiceInfo(
        self, request: auth_pb2.GetServiceInfoRequest, context: aio.ServicerContext
    ) -> auth_pb2.GetServiceInfoResponse:
        return auth_pb2.GetServiceInfoResponse(info=service_info("auth", CONTRACT_VERSIONS))

    # --- admin RPCs ---------------------------------------------------------------------

    async def CreateClient(
        self, request: auth_pb2.CreateClientRequest, context: aio.ServicerContext
    ) -> auth_pb2.CreateClientResponse:
        actor = await self._admin(context, "client.create")
        violations: list[tuple[str, str]] = []
        if request.client_id and not re.fullmatch(CLIENT_ID_PATTERN, request.client_id):
            violations.append(("client_id", "1-64 letters, digits, '_', '.', '-'"))
        if not re.fullmatch(NAME_PATTERN, request.tenant):
            violations.append(("tenant", "required, lower-case letters, digits, '_', '.', '-'"))
        violations += bad_entries("scopes", request.scopes, SCOPE_PATTERN)
        known_roles = self._policy.current().roles
        violations += [
            (f"roles[{i}]", "no such role in the policy")
            for i, role in enumerate(request.roles)
            if role not in known_roles
        ]
        if not request.scopes and not request.roles:
            violations.append(("scopes", "give at least one scope or role"))
        if violations:
            await abort_invalid(context, violations)
        client_id = request.client_id or f"c-{secrets.token_hex(8)}"
        secret = new_secret()
        now = time.time()
        row = ClientRow(
            client_id=client_id,
            tenant=request.tenant,
            scopes=" ".join(dict.fromkeys(request.scopes)),
            roles=" ".join(dict.fromkeys(request.roles)),
            state=CLIENT_ENABLED,
            secret_hash=await self._hasher.hash(secret),
            created_at=now,
            updated_at=now,
        )
        await self._run_store(
            context, "client.create", actor, client_id, self._store.add_client(row)
        )
        audit(
            "client.create",
            actor,
            client_id,
            "ok",
            tenant=row.tenant,
            scopes=row.scopes,
            roles=row.roles,
        )
        return auth_pb2.CreateClientResponse(
            client=client_pb(row), client_secret=secret.get_secret_value()
        )

    async def ListClients(
        self, request: auth_pb2.ListClientsRequest, context: aio.ServicerContext
    ) -> auth_pb2.ListClientsResponse:
        await self._admin(context, "client.list")
        if request.tenant and not re.fullmatch(NAME_PATTERN, request.tenant):
            await abort_invalid(context, [("tenant", "not a valid tenant name")])
        rows = await self._store.list_clients(request.tenant, request.include_deleted)
        return auth_pb2.ListClientsResponse(clients=[client_pb(row) for row in rows])

    async def DisableClient(
        self, request: auth_pb2.DisableClientRequest, context: aio.ServicerContext
    ) -> auth_pb2.DisableClientResponse:
        row = await self._change_client_state(
            context,
            "client.disable",
            request.client_id,
            CLIENT_DISABLED,
            (CLIENT_ENABLED, CLIENT_DISABLED),
        )
        return auth_pb2.DisableClientResponse(client=client_pb(row))

    async def DeleteClient(
        self, request: auth_pb2.DeleteClientRequest, context: aio.ServicerContext
    ) -> auth_pb2.DeleteClientResponse:
        row = await self._change_client_state(
            context,
            "client.delete",
            request.client_id,
            CLIENT_DELETED,
            (CLIENT_ENABLED, CLIENT_DISABLED, CLIENT_REVOKED),
        )
        return auth_pb2.DeleteClientResponse(client=client_pb(row))

    async def RevokeClient(
        self, request: auth_pb2.RevokeClientRequest, context: aio.ServicerContext
    ) -> auth_pb2.RevokeClientResponse:
        row = await self._change_client_state(
            context,
            "client.revoke",
            request.client_id,
            CLIENT_REVOKED,
            (CLIENT_ENABLED, CLIENT_DISABLED, CLIENT_REVOKED),
        )
        return auth_pb2.RevokeClientResponse(client=client_pb(row))

    async def RotateClientSecret(
        self, request: auth_pb2.RotateClientSecretRequest, context: aio.ServicerContext
    ) -> auth_pb2.RotateClientSecretResponse:
        actor = await self._admin(context, "client.rotate_secret")
        await self._check_client_id(context, request.client_id)
        secret = new_secret()
        secret_hash = await self._hasher.hash(secret)
        row = await self._run_store(
            context,
            "client.rotate_secret",
            actor,
            request.client_id,
            self._store.set_secret_hash(request.client_id, secret_hash),
        )
        audit("client.rotate_secret", actor, request.client_id, "ok")
        return auth_pb2.RotateClientSecretResponse(
            client=client_pb(row), client_secret=secret.get_secret_value()
        )

    async def ListKeys(
        self, request: auth_pb2.ListKeysRequest, context: aio.ServicerContext
    ) -> auth_pb2.ListKeysResponse:
        await self._admin(context, "key.list")
        return auth_pb2.ListKeysResponse(keys=[key_pb(row) for row in await self._store.keys()])

    async def RotateKey(
        self, request: auth_pb2.RotateKeyRequest, context: aio.ServicerContext
    ) -> auth_pb2.RotateKeyResponse:
        actor = await self._admin(context, "key.rotate")
        try:
            kid, x = await asyncio.to_thread(self._keys.create)
        except OSError as error:
            # E.g. keys projected read-only from a secret: rotate where the keys are managed.
            log.error("cannot write a key file", extra={"error": error.strerror})
            audit("key.rotate", actor, "", "failed", reason="keys dir not writable")
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "the keys dir is not writable here; rotate with `python -m services.auth "
                "rotate-key` where the key files are managed",
            )
        try:
            new, previous = await self._store.rotate_to(kid, x, self._settings.key_publish_ahead_s)
        except Conflict:
            self._keys.remove(kid)
            audit("key.rotate", actor, kid, "conflict")
            await abort(
                context, grpc.StatusCode.ABORTED, "another key rotation ran at the same time; retry"
            )
        audit("key.rotate", actor, kid, "ok", previous=previous.kid if previous else "")
        return auth_pb2.RotateKeyResponse(
            active=key_pb(new), previous=key_pb(previous) if previous else None
        )

    async def RetireKey(
        self, request: auth_pb2.RetireKeyRequest, context: aio.ServicerContext
    ) -> auth_pb2.RetireKeyResponse:
        actor = await self._admin(context, "key.retire")
        if not re.fullmatch(OPAQUE_ID_PATTERN, request.kid):
            await abort_invalid(context, [("kid", "required, a key id from ListKeys")])
        row = await self._run_store(
            context, "key.retire", actor, request.kid, self._store.retire(request.kid)
        )
        self._keys.remove(row.kid)
        audit("key.retire", actor, row.kid, "ok")
        return auth_pb2.RetireKeyResponse(key=key_pb(row))

    async def RevokeToken(
        self, request: auth_pb2.RevokeTokenRequest, context: aio.ServicerContext
    ) -> auth_pb2.RevokeTokenResponse:
        actor = await self._admin(context, "token.revoke")
        now = time.time()
        # No token outlives this, so a later expiry would only keep the entry around longer.
        latest = now + MAX_TOKEN_LIFETIME_S + self._settings.leeway_s
        violations: list[tuple[str, str]] = []
        if not re.fullmatch(OPAQUE_ID_PATTERN, request.token_id):
            violations.append(("token_id", "required, the jti of the token"))
        expires_at = latest
        if request.HasField("expires_at"):
            expires_at = min(request.expires_at.ToNanoseconds() / 1e9, latest)
            if expires_at <= now:
                violations.append(("expires_at", "already past: the token no longer verifies"))
        if violations:
            await abort_invalid(context, violations)
        row = await self._store.revoke_token(request.token_id, expires_at)
        audit("token.revoke", actor, request.token_id, "ok", expires_at=row.expires_at)
        return auth_pb2.RevokeTokenResponse(
            revoked=auth_pb2.RevokedToken(token_id=row.jti, expires_at=timestamp(row.expires_at))
        )

    # --- helpers ------------------------------------------------------------------------

    async def _verify(self, token: str, context: aio.ServicerContext) -> Claims:
        try:
            return await self._tokens.verify(token)
        except TokenRejected as rejected:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, str(rejected))

    async def _admin(self, context: aio.ServicerContext, event: str) -> str:
        """The subject of a verified bearer token with the admin scope, or abort."""
        header = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                header = value.decode() if isinstance(value, bytes) else value
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            audit(event, "", "", "denied", reason="missing bearer token")
            await abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing bearer token in the authorization metadata",
            )
        try:
            claims = await self._tokens.verify(token.strip())
        except TokenRejected as rejected:
            audit(event, "", "", "denied", reason=str(rejected))
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, str(rejected))
        if ADMIN_SCOPE not in claims.scopes:
            audit(event, claims.subject, "", "denied", reason="scope admin missing")
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, "scope admin required")
        return claims.subject

    async def _check_client_id(self, context: aio.ServicerContext, client_id: str) -> None:
        if not re.fullmatch(CLIENT_ID_PATTERN, client_id):
            await abort_invalid(context, [("client_id", "required, a client id")])

    async def _change_client_state(
        self,
        context: aio.ServicerContext,
        event: str,
        client_id: str,
        state: str,
        allowed_from: tuple[str, ...],
    ) -> ClientRow:
        actor = await self._admin(context, event)
        await self._check_client_id(context, client_id)
        row = await self._run_store(
            context,
            event,
            actor,
            client_id,
            self._store.set_client_state(client_id, state, allowed_from),
        )
        audit(event, actor, client_id, "ok", tenant=row.tenant)
        return row

    async def _run_store(
        self,
        context: aio.ServicerContext,
        event: str,
        actor: str,
        target: str,
        operation: Coroutine[Any, Any, T],
    ) -> T:
        """Await a store change, turning its refusals into the matching status code."""
        try:
            return await operation
        except StoreError as error:
            audit(event, actor, target, "refused", reason=str(error))
            await abort(
                context,
                _STORE_CODES.get(type(error), grpc.StatusCode.FAILED_PRECONDITION),
                str(error),
            )
