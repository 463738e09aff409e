"""Who is calling, and what a refusal leaves behind: authentication, audited refusals, and the
translation of a dependency's failure into the caller's status.

Shared by the governed pipeline (gateway.pipeline) and the operator RPCs (gateway.operations):
every RPC but IssueToken authenticates here, and every refusal that matters to an auditor
(a bad token, a missing scope, an allowlist or budget refusal) is committed to the durable
outbox before the caller hears it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import NoReturn

import grpc
from google.protobuf.message import Message
from grpc import aio
from opentelemetry import trace

from gateway.accounting import GATEWAY_CONTRACTS, AuditLimiter, verified_identity
from gateway.authn import AuthState, AuthUnavailableError, Policy, Principal, TokenError
from gateway.outbox import KIND_AUDIT
from gateway.reliability import DependencyError
from gateway.settings import GatewaySettings
from services.kit.audit import DENIED, REFUSED, audit_event
from services.kit.bearer import bearer_token
from services.kit.context import request_id_var
from services.kit.deadlines import Deadline, DeadlineSpentError
from services.kit.errors import abort, forward, retry_info
from services.kit.outbox import MessageOutbox
from services.kit.peers import address_of_peer
from services.kit.tracing import current_trace_id
from toolmesh.common.v1 import audit_pb2, common_pb2
from toolmesh.telemetry.v1 import telemetry_pb2

log = logging.getLogger("toolmesh.gateway.access")

# Time kept after an outbox write to send the answer (or the refusal).
ANSWER_MARGIN_S = 0.02
# Longest an audit event of a refusal may hold up the refusal itself.
_REFUSAL_AUDIT_S = 0.5


def caller_proto(principal: Principal) -> common_pb2.Caller:
    """The identity inner services are given (they trust it only from the gateway)."""
    return common_pb2.Caller(
        subject=principal.subject,
        tenant=principal.tenant,
        scopes=sorted(principal.scopes),
        roles=list(principal.roles),
    )


def client_address(context: aio.ServicerContext) -> str:
    """The caller's network address (no port), which auth throttles wrong secrets by."""
    return address_of_peer(context.peer() or "")


async def hop_timeout(context: aio.ServicerContext, deadline: Deadline, hop: str) -> float:
    """What is left of the deadline for the next hop, or DEADLINE_EXCEEDED naming it."""
    try:
        return deadline.timeout()
    except DeadlineSpentError:
        await abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline exhausted before {hop}")


def rpc_name() -> str:
    """The RPC being served, from the server span's name (the audit target of a refusal)."""
    name = getattr(trace.get_current_span(), "name", "")
    return name if isinstance(name, str) and name.startswith("/") else "toolmesh.gateway.v1.Gateway"


class Access:
    def __init__(
        self,
        settings: GatewaySettings,
        auth: AuthState,
        outbox: MessageOutbox,
        auth_failures: AuditLimiter,
    ) -> None:
        self._settings = settings
        self._auth = auth
        self._outbox = outbox
        self._auth_failures = auth_failures

    async def authenticate(
        self, context: aio.ServicerContext, scope: str = ""
    ) -> tuple[Principal, Policy]:
        """The verified caller and the policy in force, or abort: UNAUTHENTICATED for any token
        problem (audited, rate-limited), UNAVAILABLE when auth's state is too old,
        PERMISSION_DENIED (audited) when ``scope`` is missing."""
        token = bearer_token(context.invocation_metadata())
        if not token:
            await self._audit_auth_failure(context, "", "missing bearer token")
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
        try:
            principal, policy = await self._auth.verify(token)
        except AuthUnavailableError as exc:
            await abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                str(exc),
                retry_info(self._settings.auth_refresh_s),
            )
        except TokenError as exc:
            log.info("token rejected", extra={"reason": exc.reason})
            await self._audit_auth_failure(context, token, exc.reason)
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, exc.reason)
        if scope and scope not in principal.scopes:
            reason = f"missing scope {scope}"
            log.info(
                "authorization",
                extra={
                    "decision": "deny",
                    "reason": reason,
                    "missing_scope": scope,
                    "tenant": principal.tenant,
                    "subject": principal.subject,
                    "policy_version": policy.version,
                },
            )
            await self.audit_refusal(
                context,
                audit_event(
                    action=audit_pb2.AUDIT_ACTION_PERMISSION_DENIED,
                    tenant=principal.tenant,
                    actor=principal.subject,
                    target=rpc_name(),
                    outcome=DENIED,
                    request_id=request_id_var.get(),
                    trace_id=current_trace_id(),
                    policy_version=policy.version,
                    contract_versions=GATEWAY_CONTRACTS,
                    details={"reason": reason, "missing_scope": scope},
                ),
            )
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, reason)
        return principal, policy

    async def audit_refusal(
        self, context: aio.ServicerContext, *events: telemetry_pb2.AuditEvent
    ) -> None:
        """Commit a refusal's audit events to the outbox before refusing."""
        await self.put_refusal(context, [(KIND_AUDIT, e.event_id, e) for e in events])

    async def put_refusal(
        self, context: aio.ServicerContext, entries: Sequence[tuple[str, str, Message]]
    ) -> None:
        """Commit a refusal's outbox entries (audit events, the usage record that releases a
        reservation) before refusing, bounded by what is left of the caller's deadline; a
        failure is logged and the refusal stands."""
        remaining = context.time_remaining()
        bound = _REFUSAL_AUDIT_S if remaining is None else min(_REFUSAL_AUDIT_S, remaining)
        try:
            async with asyncio.timeout(max(bound - ANSWER_MARGIN_S, 0.001)):
                await self._outbox.put_many(entries)
        except Exception as exc:
            log.error(
                "refusal's audit event not stored",
                extra={
                    "kinds": [kind for kind, _, _ in entries],
                    "error": f"{type(exc).__name__}: {exc}",
                },
            )

    async def _audit_auth_failure(
        self, context: aio.ServicerContext, token: str, reason: str
    ) -> None:
        """auth.failure, at most ``audit_auth_failures_per_s`` per replica; never the token.

        The tenant and actor are recorded only when the token's signature verifies (an expired
        or revoked token, say); otherwise the tenant is "_unknown"."""
        if not self._auth_failures.allow():
            return
        try:
            snapshot = self._auth.snapshot()
        except AuthUnavailableError:
            snapshot = None
        tenant, subject, token_id = verified_identity(token, snapshot) if token else ("", "", "")
        details = {"reason": reason}
        if token_id:
            details["token_id"] = token_id
        await self.audit_refusal(
            context,
            audit_event(
                action=audit_pb2.AUDIT_ACTION_AUTH_FAILURE,
                tenant=tenant,
                actor=subject,
                target=rpc_name(),
                outcome=REFUSED,
                request_id=request_id_var.get(),
                trace_id=current_trace_id(),
                policy_version=snapshot.policy.version if snapshot else "",
                contract_versions=GATEWAY_CONTRACTS,
                details=details,
            ),
        )

    async def forward_error(
        self, context: aio.ServicerContext, error: DependencyError, prefix: bool = True
    ) -> NoReturn:
        """The inner service's code and details; transport failures, timeouts and an open
        breaker are summarised instead, since their text (addresses, connection errors)
        describes our network to the caller."""
        service, code, err = error.dependency, error.code, error.rpc_error
        log.info("forwarding error", extra={"dependency": service, "error": str(error)})
        if err is None or code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        ):
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                await abort(context, code, f"{service} did not answer in time")
            retry_after = error.retry_after_s or self._settings.shed_retry_after_ms / 1000
            await abort(context, code, f"{service} is unavailable", retry_info(retry_after))
        message = f"{service}: {err.details()}" if prefix else err.details() or ""
        await forward(context, err, message)
