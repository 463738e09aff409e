"""Auth's audit events: committed to a durable outbox before the RPC answers, then relayed to
the telemetry service's hash-chained trail (``toolmesh.telemetry.v1.Telemetry/AppendAudit``).

Building an event is services.kit.audit's job (the one builder: actions from the
``toolmesh.common.v1.AuditAction`` enum, every field cleaned and clipped to telemetry's
limits); this module only adds auth's context (request id, trace id, policy version) and
delivers.

The outbox is the ``auth_outbox`` table of auth's own database (services.kit.outbox_table), so
an event outlives the pod as the change it records does. Two ways in:

- a change (an admin RPC, an operator command): ``AuditTrail.staged`` builds the events from
  the changed row and the store inserts them in the change's own transaction, so the change and
  its events commit together or not at all;
- anything else (a token issued, a refusal): ``record`` commits the event on its own, group
  committed with the events recorded meanwhile.

Outbox items have kind ``audit``, key ``audit:<event id>`` and payload the serialized
``AuditEvent``. Telemetry stores each (tenant, event_id) once, so a batch delivered twice (a
crash between delivery and deletion) is harmless. While telemetry is down the relay backs off
(full jitter) and the events wait in the table; any replica delivers them. An outbox file left
by an earlier release is moved into the table at start.

An event telemetry refuses for its content (INVALID_ARGUMENT, PERMISSION_DENIED) is found by
splitting the batch, set aside as a dead letter (``auth_outbox_dead_letters``, metric, error
log) and replaced in its tenant's chain by an ``audit.dead_letter`` notice, as the gateway's
and the router's relays do: one bad event never blocks the events queued behind it, and
`toolmesh audit verify` reports it instead of the chain silently missing it.

Every event is also written as a structured log line on ``toolmesh.auth.audit`` once committed;
the outbox (and then telemetry) is the record. Callers never pass secrets, tokens or key
material: targets are client ids, key ids (public thumbprints) and token ids (jti).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Generic, TypeVar

import grpc
from grpc import aio

from services.kit.audit import audit_event, dead_letter_notice
from services.kit.channels import open_channel
from services.kit.context import request_id_var
from services.kit.outbox import Item, MessageOutbox, send_splitting_refusals
from services.kit.outbox_table import TableOutbox
from services.kit.tracing import current_trace_id
from toolmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc

audit_log = logging.getLogger("toolmesh.auth.audit")
log = logging.getLogger("toolmesh.auth")

KIND = "audit"
# Events of the local operator and of start-up: no tenant of their own; names starting with
# "_" are never real tenants.
OPERATOR_TENANT = "_operator"
CONTRACT_VERSIONS = ("toolmesh.auth.v1",)
# At most 1000 events per AppendAudit.
BATCH = 100


R = TypeVar("R")


def _refusal(error: Exception) -> str | None:
    """Why telemetry refused the content itself (retrying cannot help), or None."""
    if isinstance(error, aio.AioRpcError) and error.code() in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
    ):
        return f"{error.code().name}: {error.details()}"
    return None


class AuditTrail:
    """The auth service's audit emitter: an event is durable before the RPC answers."""

    def __init__(
        self,
        database_url: str,
        telemetry_target: str,
        policy_version: Callable[[], str],
        *,
        legacy_file: Path | None = None,
        call_timeout_s: float = 5.0,
        idle_s: float = 0.5,
        base_backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
    ) -> None:
        self._policy_version = policy_version
        self._timeout = call_timeout_s
        self._legacy_file = legacy_file
        # One AppendAudit call per batch: a claim outlives it with room to spare.
        self.store = TableOutbox(database_url, "auth", lease_s=2 * call_timeout_s + 1)
        self.outbox = MessageOutbox(
            self.store, idle_s=idle_s, base_backoff_s=base_backoff_s, max_backoff_s=max_backoff_s
        )
        self._channel = open_channel(telemetry_target)
        self._stub = telemetry_pb2_grpc.TelemetryStub(self._channel)
        self.outbox.route(
            KIND,
            telemetry_pb2.AuditEvent,
            self._deliver,
            batch=BATCH,
            on_dead_letter=self._dead_letter,
        )

    async def open(self) -> None:
        """Connect to the outbox table (the schema must be at head) and move what an earlier
        release's outbox file still holds into it."""
        await self.outbox.open()
        if self._legacy_file is not None:
            moved = await self.store.adopt_file(self._legacy_file)
            if moved:
                log.info("audit outbox file moved into the outbox table", extra={"items": moved})

    def start(self) -> None:
        """Start relaying, including events an earlier run (or another replica) left."""
        self.outbox.start()

    async def close(self) -> None:
        await self.outbox.close()
        await self._channel.close()

    def event(
        self,
        action: int,
        outcome: str,
        *,
        tenant: str,
        actor: str,
        target: str = "",
        details: Mapping[str, object] | None = None,
    ) -> telemetry_pb2.AuditEvent:
        return audit_event(
            action=action,
            tenant=tenant,
            actor=actor,
            target=target,
            outcome=outcome,
            request_id=request_id_var.get(),
            trace_id=current_trace_id(),
            policy_version=self._policy_version(),
            contract_versions=CONTRACT_VERSIONS,
            details=details,
        )

    async def record(
        self,
        action: int,
        outcome: str,
        *,
        tenant: str,
        actor: str,
        target: str = "",
        details: Mapping[str, object] | None = None,
    ) -> telemetry_pb2.AuditEvent:
        """Commit the event to the outbox on its own (group commit) and log it.

        Raises when the outbox cannot be written; the caller decides whether its RPC may still
        answer. Cancelling the caller does not cancel the commit."""
        event = self.event(
            action, outcome, tenant=tenant, actor=actor, target=target, details=details
        )
        await self.outbox.put_many([(KIND, event.event_id, event)])
        self.committed([event])
        return event

    def staged(self, build: Callable[[R], list[telemetry_pb2.AuditEvent]]) -> Staged[R]:
        """Events to commit in the transaction of a change: ``build`` makes them from the
        changed row (the store calls it inside the transaction)."""
        return Staged(self, build)

    def committed(self, events: Sequence[telemetry_pb2.AuditEvent]) -> None:
        """Log events now durable and wake the relay."""
        for event in events:
            audit_log.info(
                "audit",
                extra={
                    "event": event.action,
                    "actor": event.actor,
                    "target": event.target,
                    "outcome": event.outcome,
                    "tenant": event.tenant,
                    "event_id": event.event_id,
                    "details": json.loads(event.details_json) if event.details_json else {},
                },
            )
        self.outbox.relay.wake()

    async def _deliver(self, events: list[telemetry_pb2.AuditEvent]) -> list[tuple[int, str]]:
        return await send_splitting_refusals(events, self._append, _refusal)

    async def _append(self, events: list[telemetry_pb2.AuditEvent]) -> object:
        request = telemetry_pb2.AppendAuditRequest(events=events)
        reply = await self._stub.AppendAudit(request, timeout=self._timeout)
        log.info(
            "audit events delivered",
            extra={"items": len(events), "stored": reply.stored, "duplicates": reply.duplicates},
        )
        return reply

    async def _dead_letter(self, refused: telemetry_pb2.AuditEvent, reason: str) -> None:
        """Leave a notice in the refused event's place (a refused notice is only set aside)."""
        if refused.action == "audit.dead_letter":
            return
        notice = dead_letter_notice(refused, reason)
        await self.outbox.put_many([(KIND, notice.event_id, notice)])
        self.committed([notice])


class Staged(Generic[R]):
    """Audit events of one change: ``items`` is the store's hook inside the transaction,
    ``committed`` the caller's once it committed."""

    def __init__(
        self, trail: AuditTrail, build: Callable[[R], list[telemetry_pb2.AuditEvent]]
    ) -> None:
        self._trail = trail
        self._build = build
        self.events: list[telemetry_pb2.AuditEvent] = []

    def items(self, row: R) -> list[Item]:
        self.events = self._build(row)
        return [Item(KIND, f"{KIND}:{e.event_id}", e.SerializeToString()) for e in self.events]

    def committed(self) -> None:
        self._trail.committed(self.events)


__all__ = ["KIND", "OPERATOR_TENANT", "AuditTrail", "Staged"]
