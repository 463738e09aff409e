"""The admin half of toolmesh.auth.v1.Auth: clients, signing keys and token revocation.

Every call carries a bearer token, verified here by the kit's verifier. Scope ``admin`` acts
within the token's tenant, ``platform:admin`` on every tenant and on the signing keys
(services.auth.access). A client of another tenant answers exactly like an unknown client
(NOT_FOUND, same message, same work done), so a tenant admin learns nothing about other
tenants; the attempt is audited as permission.denied in the tenant whose client it was.

Audit: a change is recorded in the tenant it changed (a client's tenant; the caller's for the
global signing keys) and, when a platform operator acts on another tenant, in the operator's
own tenant too; the events are written to auth's outbox table in the change's own transaction
(``_staged_change``), so the change and its record commit together before the RPC answers.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

import grpc
from grpc import aio

from services.auth import validation
from services.auth.access import Actor
from services.auth.audit import Staged
from services.auth.base import AuthBase
from services.auth.conversions import client_pb, key_pb, revoked_pb
from services.auth.credentials import new_secret
from services.auth.models import (
    CLIENT_DELETED,
    CLIENT_DISABLED,
    CLIENT_ENABLED,
    CLIENT_REVOKED,
    ClientRow,
    RevokedTokenRow,
    SigningKeyRow,
)
from services.auth.store import (
    Conflict,
    Contended,
    NotFound,
    OtherTenant,
    StoreError,
    WrongState,
)
from services.kit.audit import FAILURE, SUCCESS, AuditAction, action_name
from services.kit.bearer import bearer_token
from services.kit.errors import abort, abort_invalid
from services.kit.scopes import ADMIN, PLATFORM_ADMIN
from services.kit.tokens import MAX_TOKEN_LIFETIME_S, TokenError
from toolmesh.auth.v1 import auth_pb2
from toolmesh.telemetry.v1.telemetry_pb2 import AuditEvent

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("toolmesh.auth")

CLIENT_CREATE = AuditAction.AUDIT_ACTION_ADMIN_CLIENT_CREATE
CLIENT_LIST = AuditAction.AUDIT_ACTION_ADMIN_CLIENT_LIST
CLIENT_DISABLE = AuditAction.AUDIT_ACTION_ADMIN_CLIENT_DISABLE
CLIENT_DELETE = AuditAction.AUDIT_ACTION_ADMIN_CLIENT_DELETE
CLIENT_REVOKE = AuditAction.AUDIT_ACTION_ADMIN_CLIENT_REVOKE
CLIENT_ROTATE_SECRET = AuditAction.AUDIT_ACTION_ADMIN_CLIENT_ROTATE_SECRET
KEY_LIST = AuditAction.AUDIT_ACTION_ADMIN_KEY_LIST
KEY_ROTATE = AuditAction.AUDIT_ACTION_ADMIN_KEY_ROTATE
KEY_RETIRE = AuditAction.AUDIT_ACTION_ADMIN_KEY_RETIRE
TOKEN_REVOKE = AuditAction.AUDIT_ACTION_ADMIN_TOKEN_REVOKE
PERMISSION_DENIED = AuditAction.AUDIT_ACTION_PERMISSION_DENIED

OTHER_TENANT = "scope platform:admin required to act on another tenant"

_STORE_CODES = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    OtherTenant: grpc.StatusCode.NOT_FOUND,
    Conflict: grpc.StatusCode.ALREADY_EXISTS,
    WrongState: grpc.StatusCode.FAILED_PRECONDITION,
    Contended: grpc.StatusCode.ABORTED,
}


class AdminRpcs(AuthBase):
    # --- clients ------------------------------------------------------------------------

    async def CreateClient(
        self, request: auth_pb2.CreateClientRequest, context: aio.ServicerContext
    ) -> auth_pb2.CreateClientResponse:
        actor = await self._admin(context, CLIENT_CREATE)
        policy = await self._policy.fresh()
        violations = [
            *validation.client_id(request.client_id, required=False),
            *validation.tenant(request.tenant),
            *validation.names("scopes", request.scopes),
            *validation.roles(request.roles, policy.roles),
        ]
        if not request.scopes and not request.roles:
            violations.append(("scopes", "give at least one scope or role"))
        if violations:
            await abort_invalid(context, violations)
        tenant = await self._acting_tenant(context, actor, CLIENT_CREATE, request.tenant)
        scopes = list(dict.fromkeys(request.scopes))
        roles = list(dict.fromkeys(request.roles))
        refused = actor.ungrantable([*scopes, *policy.role_scopes(roles)])
        if refused:
            await self._deny(
                context,
                actor,
                CLIENT_CREATE,
                f"cannot grant {' '.join(refused)}: a tenant admin grants only scopes its "
                f"own token holds, never {PLATFORM_ADMIN}",
                {"scopes": refused},
            )
        client_id = request.client_id or f"c-{secrets.token_hex(8)}"
        secret = new_secret()
        now = time.time()
        row = ClientRow(
            client_id=client_id,
            tenant=tenant,
            scopes=" ".join(scopes),
            roles=" ".join(roles),
            state=CLIENT_ENABLED,
            secret_hash=await self._hasher.hash(secret),
            created_at=now,
            updated_at=now,
        )
        change: Staged[ClientRow] = self._staged_change(
            CLIENT_CREATE,
            actor,
            lambda row: (row.client_id, row.tenant),
            details={"client_tenant": tenant, "scopes": scopes, "roles": roles},
        )
        await self._run_store(
            context, CLIENT_CREATE, actor, client_id, self._store.add_client(row, change.items)
        )
        change.committed()
        return auth_pb2.CreateClientResponse(
            client=client_pb(row), client_secret=secret.get_secret_value()
        )

    async def ListClients(
        self, request: auth_pb2.ListClientsRequest, context: aio.ServicerContext
    ) -> auth_pb2.ListClientsResponse:
        actor = await self._admin(context, CLIENT_LIST)
        violations = validation.tenant(request.tenant)
        if violations:
            await abort_invalid(context, violations)
        if request.tenant:
            tenant = await self._acting_tenant(context, actor, CLIENT_LIST, request.tenant)
        else:
            # Everyone's for the platform operator, the caller's own for a tenant admin.
            tenant = "" if actor.platform else actor.tenant
        rows = await self._store.list_clients(tenant, request.include_deleted)
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
        violations = validation.client_id(request.client_id)
        if violations:
            await abort_invalid(context, violations)
        # Hashed before the store looks at the client: an unknown client, one of another
        # tenant and one of the caller's own cost the same time.
        secret = new_secret()
        secret_hash = await self._hasher.hash(secret)
        change = self._client_change(CLIENT_ROTATE_SECRET, actor)
        row = await self._run_store(
            context,
            CLIENT_ROTATE_SECRET,
            actor,
            request.client_id,
            self._store.set_secret_hash(
                request.client_id, secret_hash, actor.tenant_filter, change.items
            ),
        )
        change.committed()
        return auth_pb2.RotateClientSecretResponse(
            client=client_pb(row), client_secret=secret.get_secret_value()
        )

    # --- signing keys (global: platform:admin) --------------------------------------------

    async def ListKeys(
        self, request: auth_pb2.ListKeysRequest, context: aio.ServicerContext
    ) -> auth_pb2.ListKeysResponse:
        await self._admin(context, KEY_LIST, scope=PLATFORM_ADMIN)
        return auth_pb2.ListKeysResponse(keys=[key_pb(row) for row in await self._store.keys()])

    async def RotateKey(
        self, request: auth_pb2.RotateKeyRequest, context: aio.ServicerContext
    ) -> auth_pb2.RotateKeyResponse:
        actor = await self._admin(context, KEY_ROTATE, scope=PLATFORM_ADMIN)
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
        # kid is the public key's thumbprint: naming it reveals nothing of the private key.
        change: Staged[tuple[SigningKeyRow, SigningKeyRow | None]] = self._staged_change(
            KEY_ROTATE,
            actor,
            lambda rows: (rows[0].kid, actor.tenant),
            details=lambda rows: {"previous": rows[1].kid if rows[1] else ""},
        )
        try:
            new, previous = await self._store.rotate_to(
                kid, x, self._settings.key_publish_ahead_s, change.items
            )
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
        change.committed()
        return auth_pb2.RotateKeyResponse(
            active=key_pb(new), previous=key_pb(previous) if previous else None
        )

    async def RetireKey(
        self, request: auth_pb2.RetireKeyRequest, context: aio.ServicerContext
    ) -> auth_pb2.RetireKeyResponse:
        actor = await self._admin(context, KEY_RETIRE, scope=PLATFORM_ADMIN)
        violations = validation.opaque_id("kid", request.kid, "required, a key id from ListKeys")
        if violations:
            await abort_invalid(context, violations)
        change: Staged[SigningKeyRow] = self._staged_change(
            KEY_RETIRE, actor, lambda key: (key.kid, actor.tenant)
        )
        row = await self._run_store(
            context, KEY_RETIRE, actor, request.kid, self._store.retire(request.kid, change.items)
        )
        change.committed()
        self._keys.remove(row.kid)
        return auth_pb2.RetireKeyResponse(key=key_pb(row))

    # --- tokens ---------------------------------------------------------------------------

    async def RevokeToken(
        self, request: auth_pb2.RevokeTokenRequest, context: aio.ServicerContext
    ) -> auth_pb2.RevokeTokenResponse:
        actor = await self._admin(context, TOKEN_REVOKE)
        violations = [
            *validation.opaque_id("token_id", request.token_id, "required, the jti of the token"),
            *validation.tenant(request.tenant),
        ]
        now = time.time()
        # No token outlives this, so a later expiry would only keep the entry around longer.
        latest = now + MAX_TOKEN_LIFETIME_S + self._settings.leeway_s
        expires_at = latest
        if request.HasField("expires_at"):
            # Checked before any conversion: protobuf raises on an out-of-range Timestamp.
            out_of_range = validation.timestamp("expires_at", request.expires_at)
            if out_of_range:
                violations += out_of_range
            else:
                expires_at = min(request.expires_at.ToNanoseconds() / 1e9, latest)
                if expires_at <= now:
                    violations.append(("expires_at", "already past: the token no longer verifies"))
        if violations:
            await abort_invalid(context, violations)
        if request.tenant:
            tenant = await self._acting_tenant(context, actor, TOKEN_REVOKE, request.tenant)
        else:
            # A tenant admin revokes within its tenant; a platform operator in every tenant.
            tenant = "" if actor.platform else actor.tenant
        change: Staged[RevokedTokenRow] = self._staged_change(
            TOKEN_REVOKE,
            actor,
            lambda revoked: (revoked.jti, tenant or actor.tenant),
            details=lambda revoked: {
                "expires_at": round(revoked.expires_at, 3),
                "token_tenant": tenant or "*",
            },
        )
        row = await self._store.revoke_token(tenant, request.token_id, expires_at, change.items)
        change.committed()
        return auth_pb2.RevokeTokenResponse(revoked=revoked_pb(row))

    # --- helpers --------------------------------------------------------------------------

    async def _admin(
        self, context: aio.ServicerContext, action: int, *, scope: str = ADMIN
    ) -> Actor:
        """The verified caller, holding ``scope`` (platform:admin counts as admin), or abort:
        UNAUTHENTICATED without a valid bearer token, PERMISSION_DENIED without the scope;
        both audited."""
        attempted = action_name(action)
        token = bearer_token(context.invocation_metadata())
        if not token:
            await self._refuse_token(
                context,
                TokenError("missing bearer token"),
                {"attempted": attempted},
                message="missing bearer token in the authorization metadata",
            )
        try:
            actor = Actor(await self._tokens.verify(token))
        except TokenError as error:
            await self._refuse_token(context, error, {"attempted": attempted})
        if not actor.holds(scope):
            await self._deny(context, actor, action, f"scope {scope} required")
        return actor

    async def _deny(
        self,
        context: aio.ServicerContext,
        actor: Actor,
        action: int,
        reason: str,
        details: Mapping[str, object] | None = None,
    ) -> NoReturn:
        """PERMISSION_DENIED with ``reason``, audited in the caller's tenant."""
        await self._record_refusal(
            PERMISSION_DENIED,
            tenant=actor.tenant,
            actor=actor.subject,
            details={"attempted": action_name(action), "reason": reason, **(details or {})},
        )
        await abort(context, grpc.StatusCode.PERMISSION_DENIED, reason)

    async def _acting_tenant(
        self, context: aio.ServicerContext, actor: Actor, action: int, requested: str
    ) -> str:
        """The tenant a call acts in: ``requested`` (empty: the caller's), if the caller may."""
        tenant = requested or actor.tenant
        if not actor.may_act_in(tenant):
            await self._deny(context, actor, action, OTHER_TENANT, {"tenant": tenant})
        return tenant

    async def _change_client_state(
        self,
        context: aio.ServicerContext,
        action: int,
        client_id: str,
        state: str,
        allowed_from: tuple[str, ...],
    ) -> ClientRow:
        actor = await self._admin(context, action)
        violations = validation.client_id(client_id)
        if violations:
            await abort_invalid(context, violations)
        change = self._client_change(action, actor)
        row = await self._run_store(
            context,
            action,
            actor,
            client_id,
            self._store.set_client_state(
                client_id, state, allowed_from, actor.tenant_filter, change.items
            ),
        )
        change.committed()
        return row

    async def _run_store(
        self,
        context: aio.ServicerContext,
        action: int,
        actor: Actor,
        target: str,
        operation: Coroutine[Any, Any, T],
    ) -> T:
        """Await a store change, turning its refusals into the matching status code.

        A client of another tenant is recorded in the caller's tenant exactly as an unknown
        client (whoever reads that trail learns nothing more than the caller did), and as
        permission.denied in the client's own tenant, whose auditors should see the attempt."""
        try:
            return await operation
        except StoreError as error:
            records = [
                self._record_refusal(
                    action,
                    FAILURE,
                    tenant=actor.tenant,
                    actor=actor.subject,
                    target=target,
                    details={"reason": str(error)},
                )
            ]
            if isinstance(error, OtherTenant):
                records.append(
                    self._record_refusal(
                        PERMISSION_DENIED,
                        tenant=error.tenant,
                        actor=actor.subject,
                        target=target,
                        details={
                            "attempted": action_name(action),
                            "reason": "client of another tenant",
                            "actor_tenant": actor.tenant,
                        },
                    )
                )
            # Together, so they share one outbox commit: answering another tenant's client
            # takes no longer than answering an unknown one.
            await asyncio.gather(*records)
            await abort(
                context,
                _STORE_CODES.get(type(error), grpc.StatusCode.FAILED_PRECONDITION),
                str(error),
            )

    def _client_change(self, action: int, actor: Actor) -> Staged[ClientRow]:
        """The events of a change to one client, recorded in the client's tenant."""
        return self._staged_change(
            action,
            actor,
            lambda row: (row.client_id, row.tenant),
            details=lambda row: {"client_tenant": row.tenant},
        )

    def _staged_change(
        self,
        action: int,
        actor: Actor,
        where: Callable[[R], tuple[str, str]],
        *,
        details: Mapping[str, object] | Callable[[R], Mapping[str, object]] | None = None,
        policy_version: Callable[[R], str] | None = None,
    ) -> Staged[R]:
        """The audit events of a change by ``actor``, for the store to commit in the change's
        transaction: ``where`` names the target and the tenant changed, from the changed row.
        A platform operator's change to another tenant is recorded in the operator's tenant
        too. ``policy_version`` names the version the change makes (a policy change), where
        the events would otherwise name the one in force before it."""

        def build(row: R) -> list[AuditEvent]:
            target, tenant = where(row)
            facts = dict(details(row) if callable(details) else details or {})
            tenants: Sequence[str] = [tenant] if tenant == actor.tenant else [tenant, actor.tenant]
            if tenant != actor.tenant:
                facts["actor_tenant"] = actor.tenant
            events = [
                self._audit.event(
                    action, SUCCESS, tenant=t, actor=actor.subject, target=target, details=facts
                )
                for t in tenants
            ]
            if policy_version is not None:
                for event in events:
                    event.policy_version = policy_version(row)
            return events

        return self._audit.staged(build)
