"""What the public and the admin halves of the Auth servicer share: their dependencies and the
rules for recording audit events (a change is not answered without its event; a refusal
stands even when its event cannot be written)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import NoReturn

import grpc
from grpc import aio

from services.auth.audit import AuditTrail
from services.auth.credentials import SecretHasher
from services.auth.keys import KeyFiles
from services.auth.policy import PolicySource
from services.auth.policy_store import PolicyStore
from services.auth.settings import AuthSettings
from services.auth.store import Store
from services.auth.throttle import FailureThrottle
from services.auth.tokens import Tokens
from services.kit.audit import DENIED, UNKNOWN_TENANT, AuditAction, action_name
from services.kit.errors import abort
from services.kit.peers import parse_aliases
from services.kit.tokens import TokenError

log = logging.getLogger("toolmesh.auth")


class AuthBase:
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
        policies: PolicyStore,
    ) -> None:
        self._settings = settings
        self._audit = audit
        self._store = store
        self._keys = key_files
        self._policy = policy
        self._policies = policies
        self._hasher = hasher
        self._tokens = Tokens(settings, store, key_files)
        self._throttle = FailureThrottle(
            per_source=settings.throttle_failures,
            per_client=settings.throttle_client_failures,
            window_s=settings.throttle_window_s,
            backoff_s=settings.throttle_backoff_s,
            trusted_s=settings.throttle_trusted_s,
        )
        # Certificate names -> mesh roles, to tell the gateway among the peers.
        self._peer_aliases = parse_aliases(settings.peer_aliases)

    async def _refuse_token(
        self,
        context: aio.ServicerContext,
        error: TokenError,
        details: Mapping[str, object],
        *,
        message: str = "",
    ) -> NoReturn:
        """UNAUTHENTICATED with the verifier's short reason, audited as auth.failure: in the
        token's tenant when its signature verified (an expired or revoked token), else in
        UNKNOWN_TENANT, since an unverified token's claims are the sender's word."""
        identity = error.identity
        facts: dict[str, object] = {**details, "reason": error.reason}
        if identity is not None and identity.token_id:
            facts["token_id"] = identity.token_id
        await self._record_refusal(
            AuditAction.AUDIT_ACTION_AUTH_FAILURE,
            tenant=identity.tenant if identity and identity.tenant else UNKNOWN_TENANT,
            actor=identity.subject if identity else "",
            details=facts,
        )
        await abort(context, grpc.StatusCode.UNAUTHENTICATED, message or error.reason)

    async def _record_required(
        self,
        context: aio.ServicerContext,
        action: int,
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
            name = action_name(action)
            log.exception("audit outbox write failed", extra={"action": name})
            await abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                f"{name}: the audit record could not be written, so the result is not "
                "returned (a change may have been applied: check before retrying)",
            )

    async def _record_refusal(
        self,
        action: int,
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
            log.exception("audit outbox write failed", extra={"action": action_name(action)})
