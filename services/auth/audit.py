"""Auth's audit events: committed to a durable outbox before the RPC answers, then relayed to
the telemetry service's hash-chained trail (``toolmesh.telemetry.v1.Telemetry/AppendAudit``).

Building an event is services.kit.audit's job (the one builder: actions from the
``toolmesh.common.v1.AuditAction`` enum, every field cleaned and clipped to telemetry's
limits); this module only adds auth's context (request id, trace id, policy version) and
delivers: ``AuditTrail.event`` builds, ``record`` logs and commits, the relay sends.

Outbox items have kind ``audit``, key = the event id (a random hex id) and payload = the
serialized ``AuditEvent``. Telemetry stores each (tenant, event_id) once, so a batch delivered
twice (a crash between delivery and deletion) is harmless. While telemetry is down the relay
backs off (full jitter) and the events wait in the file; they are replayed at the next start.

Every event is also written as a structured log line on ``toolmesh.auth.audit``; the outbox
(and then telemetry) is the record. Callers never pass secrets, tokens or key material: targets
are client ids, key ids (public thumbprints) and token ids (jti).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from services.kit.audit import audit_event
from services.kit.channels import open_channel
from services.kit.context import request_id_var
from services.kit.outbox import Item, Outbox, Pending, Relay
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


class AuditTrail:
    """The auth service's audit emitter: ``record`` returns once the event is durable."""

    def __init__(
        self,
        path: Path,
        telemetry_target: str,
        policy_version: Callable[[], str],
        *,
        call_timeout_s: float = 5.0,
        idle_s: float = 0.5,
        base_backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
    ) -> None:
        self.path = path
        self._target = telemetry_target
        self._policy_version = policy_version
        self._timeout = call_timeout_s
        self.outbox = Outbox(path)
        self.relay = Relay(
            self.outbox, idle_s=idle_s, base_backoff_s=base_backoff_s, max_backoff_s=max_backoff_s
        )
        self._channel = open_channel(telemetry_target)
        self._stub = telemetry_pb2_grpc.TelemetryStub(self._channel)
        self.relay.route(KIND, self._deliver, BATCH)
        self._task: asyncio.Task[None] | None = None
        # Group commit: events recorded while a commit runs share the next one (one fsync).
        self._waiting: list[tuple[Item, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        await self.outbox.open()

    def start(self) -> None:
        """Start relaying, including events an earlier run left in the file."""
        self._task = asyncio.create_task(self.relay.run(), name="audit-relay")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
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
        """Log the event and commit it to the outbox (fsync'd) before returning.

        Raises when the outbox cannot be written; the caller decides whether its RPC may still
        answer. Cancelling the caller does not cancel the commit."""
        event = self.event(
            action, outcome, tenant=tenant, actor=actor, target=target, details=details
        )
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
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._waiting.append((Item(KIND, event.event_id, event.SerializeToString()), done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="audit-outbox-writer")
        await asyncio.shield(done)
        self.relay.wake()
        return event

    async def _write(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                await self.outbox.put([item for item, _ in batch])
            except Exception as exc:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)

    async def _deliver(self, pending: list[Pending]) -> list[tuple[Pending, str]]:
        request = telemetry_pb2.AppendAuditRequest(
            events=[telemetry_pb2.AuditEvent.FromString(item.payload) for item in pending]
        )
        reply = await self._stub.AppendAudit(request, timeout=self._timeout)
        log.info(
            "audit events delivered",
            extra={"items": len(pending), "stored": reply.stored, "duplicates": reply.duplicates},
        )
        return []


__all__ = ["KIND", "OPERATOR_TENANT", "AuditTrail"]
