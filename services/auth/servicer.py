"""The toolmesh.auth.v1.Auth servicer: token issuance and verification, keys, clients, policy."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio
from pydantic import SecretStr

from services.auth.audit import (
    AUTH_FAILURE,
    DENIED,
    FAILURE,
    PERMISSION_DENIED,
    SUCCESS,
    TOKEN_ISSUE,
    UNKNOWN_TENANT,
    AuditTrail,
)
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

log = logging.getLogger("toolmesh.auth")

CONTRACT_VERSIONS = ["toolmesh.auth.v1"]
ADMIN_SCOPE = "admin"
CLIENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
OPAQUE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_SECRET_CHARS = 256

# Audit actions of the admin changes (services.auth.audit has the others).
CLIENT_CREATE = "admin.client.create"
CLIENT_DISABLE = "admin.client.disable"
CLIENT_DELETE = "admin.client.delete"
CLIENT_REVOKE = "admin.client.revoke"
CLIENT_ROTATE_SECRET = "admin.client.rotate_secret"  # noqa: S105 - an action name
KEY_ROTATE = "admin.key.rotate"
KEY_RETIRE = "admin.key.retire"
TOKEN_REVOKE = "admin.token.revoke"  # noqa: S105 - an action name

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
        *,
        audit: AuditTrail,
    ) -> None:
        self._settings = settings
        self._audit = audit
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
            known = await self._store.client(client_id)
            await self._record_refusal(
                AUTH_FAILURE,
                tenant=known.tenant if known else UNKNOWN_TENANT,
                actor=client_id,
                target=client_id,
                details={"rpc": "IssueToken", "reason": "throttled"},
            )
            await abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "too many failed attempts for this client; retry later",
                retry_info(wait),
            )
        client = await self._store.client(client_id)
        if not await self._hasher.matches(client.secret_hash if client else "", secret):
            await self._record_refusal(
                AUTH_FAILURE,
                tenant=client.tenant if client else UNKNOWN_TENANT,
                actor=client_id,
                target=client_id,
                details={
                    "rpc": "IssueToken",
                    "reason": "wrong secret" if client else "unknown client",
                },
            )
            # One message for unknown id and wrong secret: no hint which one was wrong.
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, "invalid client credentials")
        assert client is not None
        self._throttle.succeeded(client_id)
        if client.state != CLIENT_ENABLED:
            await self._record_refusal(
                AUTH_FAILURE,
                tenant=client.tenant,
                actor=client_id,
                target=client_id,
                details={"rpc": "IssueToken", "reason": f"client {client.state}"},
            )
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, "client is disabled")
        granted = set(client.scopes.split()) | self._policy.current().role_scopes(
            client.roles.split()
        )
        wanted = list(dict.fromkeys(request.scopes)) or sorted(granted)
        for scope in wanted:
            if scope not in granted:
                await self._record_refusal(
                    PERMISSION_DENIED,
                    tenant=client.tenant,
                    actor=client_id,
                    target=client_id,
                    details={"rpc": "IssueToken", "reason": "scope not granted", "scope": scope},
                )
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
        # Before the token leaves: a token that was handed out is always in the trail.
        await self._record_required(
            context,
            TOKEN_ISSUE,
            SUCCESS,
            tenant=client.tenant,
            actor=client_id,
            target=client_id,
            details={
                "token_id": issued.token_id,
                "scopes": wanted,
                "expires_in": issued.expires_in,
            },
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
        actor = await self._admin(context, CLIENT_CREATE)
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
        await self._run_store(context, CLIENT_CREATE, actor, client_id, self._store.add_client(row))
        await self._record_change(
            context,
            CLIENT_CREATE,
            actor,
            client_id,
            {"client_tenant": row.tenant, "scopes": row.scopes.split(), "roles": row.roles.split()},
        )
        return auth_pb2.CreateClientResponse(
            client=client_pb(row), client_secret=secret.get_secret_value()
        )

    async def ListClients(
        self, request: auth_pb2.ListClientsRequest, context: aio.ServicerContext
    ) -> auth_pb2.ListClientsResponse:
        await self._admin(context, "admin.client.list")
        if request.tenant and not re.fullmatch(NAME_PATTERN, request.tenant):
            await abort_invalid(context, [("tenant", "not a valid tenant name")])
        rows = await self._store.list_clients(request.tenant, request.include_deleted)
        return auth_pb2.ListClientsResponse(clients=[client_pb(row) for row in rows])

    async def DisableClient(
        self, request: auth_pb2.DisableClientRequest, context: aio.ServicerContext
    ) -> auth_pb2.DisableClientResponse:
        row = await self._change_client_state(
            context,
            CLIENT_DISABLE,
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
            CLIENT_DELETE,
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
            CLIENT_REVOKE,
            request.client_id,
            CLIENT_REVOKED,
            (CLIENT_ENABLED, CLIENT_DISABLED, CLIENT_REVOKED),
        )
        return auth_pb2.RevokeClientResponse(client=client_pb(row))

    async def RotateClientSecret(
        self, request: auth_pb2.RotateClientSecretRequest, context: aio.ServicerContext
    ) -> auth_pb2.RotateClientSecretResponse:
        actor = await self._admin(context, CLIENT_ROTATE_SECRET)
        await self._check_client_id(context, request.client_id)
        secret = new_secret()
        secret_hash = await self._hasher.hash(secret)
        row = await self._run_store(
            context,
            CLIENT_ROTATE_SECRET,
            actor,
            request.client_id,
            self._store.set_secret_hash(request.client_id, secret_hash),
        )
        await self._record_change(
            context, CLIENT_ROTATE_SECRET, actor, row.client_id, {"client_tenant": row.tenant}
        )
        return auth_pb2.RotateClientSecretResponse(
            client=client_pb(row), client_secret=secret.get_secret_value()
        )

    async def ListKeys(
        self, request: auth_pb2.ListKeysRequest, context: aio.ServicerContext
    ) -> auth_pb2.ListKeysResponse:
        await self._admin(context, "admin.key.list")
        return auth_pb2.ListKeysResponse(keys=[key_pb(row) for row in await self._store.keys()])

    async def RotateKey(
        self, request: auth_pb2.RotateKeyRequest, context: aio.ServicerContext
    ) -> auth_pb2.RotateKeyResponse:
        actor = await self._admin(context, KEY_ROTATE)
        try:
            kid, x = await asyncio.to_thread(self._keys.create)
        except OSError as error:
            # E.g. keys projected read-only from a secret: rotate where the keys are managed.
            log.error("cannot write a key file", extra={"error": error.strerror})
            await self._record_refusal(
                KEY_ROTATE,
                FAILURE,
                tenant=actor.tenant,
                actor=actor.subject,
                details={"reason": "keys dir not writable"},
            )
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
            await self._record_refusal(
                KEY_ROTATE,
                FAILURE,
                tenant=actor.tenant,
                actor=actor.subject,
                target=kid,
                details={"reason": "concurrent rotation"},
            )
            await abort(
                context, grpc.StatusCode.ABORTED, "another key rotation ran at the same time; retry"
            )
        # kid is the public key's thumbprint: naming it reveals nothing of the private key.
        await self._record_change(
            context, KEY_ROTATE, actor, new.kid, {"previous": previous.kid if previous else ""}
        )
        return auth_pb2.RotateKeyResponse(
            active=key_pb(new), previous=key_pb(previous) if previous else None
        )

    async def RetireKey(
        self, request: auth_pb2.RetireKeyRequest, context: aio.ServicerContext
    ) -> auth_pb2.RetireKeyResponse:
        actor = await self._admin(context, KEY_RETIRE)
        if not re.fullmatch(OPAQUE_ID_PATTERN, request.kid):
            await abort_invalid(context, [("kid", "required, a key id from ListKeys")])
        row = await self._run_store(
            context, KEY_RETIRE, actor, request.kid, self._store.retire(request.kid)
        )
        self._keys.remove(row.kid)
        await self._record_change(context, KEY_RETIRE, actor, row.kid)
        return auth_pb2.RetireKeyResponse(key=key_pb(row))

    async def RevokeToken(
        self, request: auth_pb2.RevokeTokenRequest, context: aio.ServicerContext
    ) -> auth_pb2.RevokeTokenResponse:
        actor = await self._admin(context, TOKEN_REVOKE)
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
        await self._record_change(
            context, TOKEN_REVOKE, actor, row.jti, {"expires_at": round(row.expires_at, 3)}
        )
        return auth_pb2.RevokeTokenResponse(
            revoked=auth_pb2.RevokedToken(token_id=row.jti, expires_at=timestamp(row.expires_at))
        )

    # --- helpers ------------------------------------------------------------------------

    async def _verify(self, token: str, context: aio.ServicerContext) -> Claims:
        try:
            return await self._tokens.verify(token)
        except TokenRejected as rejected:
            # The reason is one of a fixed set of short phrases, never the token; the token's
            # own claims are not trusted for the tenant, so the event goes to UNKNOWN_TENANT.
            await self._record_refusal(
                AUTH_FAILURE,
                tenant=UNKNOWN_TENANT,
                actor="",
                details={"rpc": "VerifyToken", "reason": str(rejected)},
            )
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, str(rejected))

    async def _admin(self, context: aio.ServicerContext, action: str) -> Claims:
        """The claims of a verified bearer token with the admin scope, or abort (audited)."""
        header = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                header = value.decode() if isinstance(value, bytes) else value
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            await self._record_refusal(
                AUTH_FAILURE,
                tenant=UNKNOWN_TENANT,
                actor="",
                details={"attempted": action, "reason": "missing bearer token"},
            )
            await abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing bearer token in the authorization metadata",
            )
        try:
            claims = await self._tokens.verify(token.strip())
        except TokenRejected as rejected:
            await self._record_refusal(
                AUTH_FAILURE,
                tenant=UNKNOWN_TENANT,
                actor="",
                details={"attempted": action, "reason": str(rejected)},
            )
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, str(rejected))
        if ADMIN_SCOPE not in claims.scopes:
            await self._record_refusal(
                PERMISSION_DENIED,
                tenant=claims.tenant,
                actor=claims.subject,
                details={"attempted": action, "reason": "scope admin required"},
            )
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, "scope admin required")
        return claims

    async def _check_client_id(self, context: aio.ServicerContext, client_id: str) -> None:
        if not re.fullmatch(CLIENT_ID_PATTERN, client_id):
            await abort_invalid(context, [("client_id", "required, a client id")])

    async def _change_client_state(
        self,
        context: aio.ServicerContext,
        action: str,
        client_id: str,
        state: str,
        allowed_from: tuple[str, ...],
    ) -> ClientRow:
        actor = await self._admin(context, action)
        await self._check_client_id(context, client_id)
        row = await self._run_store(
            context,
            action,
            actor,
            client_id,
            self._store.set_client_state(client_id, state, allowed_from),
        )
        await self._record_change(context, action, actor, client_id, {"client_tenant": row.tenant})
        return row

    async def _run_store(
        self,
        context: aio.ServicerContext,
        action: str,
        actor: Claims,
        target: str,
        operation: Coroutine[Any, Any, T],
    ) -> T:
        """Await a store change, turning its refusals into the matching status code."""
        try:
            return await operation
        except StoreError as error:
            await self._record_refusal(
                action,
                FAILURE,
                tenant=actor.tenant,
                actor=actor.subject,
                target=target,
                details={"reason": str(error)},
            )
            await abort(
                context,
                _STORE_CODES.get(type(error), grpc.StatusCode.FAILED_PRECONDITION),
                str(error),
            )

    async def _record_change(
        self,
        context: aio.ServicerContext,
        action: str,
        actor: Claims,
        target: str,
        details: Mapping[str, object] | None = None,
    ) -> None:
        """Record an admin change made by ``actor``, in the actor's tenant, before answering."""
        await self._record_required(
            context,
            action,
            SUCCESS,
            tenant=actor.tenant,
            actor=actor.subject,
            target=target,
            details=details,
        )

    async def _record_required(
        self,
        context: aio.ServicerContext,
        action: str,
        outcome: str,
        *,
        tenant: str,
        actor: str,
        target: str,
        details: Mapping[str, object] | None = None,
    ) -> None:
        """Commit an event the answer depends on: without it, the RPC answers UNAVAILABLE."""
        try:
            await self._audit.record(
                action, outcome, tenant=tenant, actor=actor, target=target, details=details
            )
        except Exception:
            log.exception("audit outbox write failed", extra={"action": action})
            await abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                f"{action}: the audit record could not be written, so the result is not "
                "returned (a change may have been applied: check before retrying)",
            )

    async def _record_refusal(
        self,
        action: str,
        outcome: str = DENIED,
        *,
        tenant: str,
        actor: str,
        target: str = "",
        details: Mapping[str, object] | None = None,
    ) -> None:
        """Commit the event of a refusal; the refusal stands even if the outbox fails."""
        try:
            await self._audit.record(
                action, outcome, tenant=tenant, actor=actor, target=target, details=details
            )
        except Exception:
            log.exception("audit outbox write failed", extra={"action": action})
