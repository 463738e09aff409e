"""The router's own audit events (``tool.drift``, release transitions), relayed to telemetry's
trail.

Registration, removal and approval are audited by the gateway, which knows who asked; the router
audits what only it sees: a backend that changed a published tool's contract, and what its
releases do. Events are built by services.kit.audit, committed to the ``router_outbox`` table of
the router's own database (services.kit.outbox_table; kind ``audit``, key = event id), so a
router pod scaled down or drained during a telemetry outage leaves them to the other replicas
instead of taking them with its volume, and delivered in batches to Telemetry.AppendAudit,
which de-duplicates by tenant and event id. A drift's event id is derived from the backend,
tool and pending fingerprint, so replicas that see the same drift record one event.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
from grpc import aio

from services.kit.audit import dead_letter_notice
from services.kit.channels import open_channel
from services.kit.outbox import MessageOutbox, send_splitting_refusals
from services.kit.outbox_table import TableOutbox, outbox_tables
from services.router.notes import Base
from toolmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc

log = logging.getLogger("toolmesh.router.audit")
audit_log = logging.getLogger("toolmesh.router.audit.events")

KIND = "audit"
# router_outbox and its dead letters, in the router's metadata so its migrations and models agree
# (TableOutbox works on its own copy of the same definition).
OUTBOX_TABLES = outbox_tables(Base.metadata, "router")


def _refusal(error: Exception) -> str | None:
    """Why telemetry refused the content itself (retrying cannot help), or None."""
    if isinstance(error, aio.AioRpcError) and error.code() in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
    ):
        return f"{error.code().name}: {error.details()}"
    return None


class RouterAudit:
    """``record`` returns once the event is durable; a relay task delivers it."""

    def __init__(
        self,
        database_url: str,
        telemetry_target: str,
        *,
        legacy_file: Path | None = None,
        call_timeout_s: float = 5.0,
    ) -> None:
        self._legacy_file = legacy_file
        # One AppendAudit call per batch: a claim outlives it with room to spare.
        self._store = TableOutbox(database_url, "router", lease_s=2 * call_timeout_s + 1)
        self._outbox = MessageOutbox(self._store)
        self._channel = open_channel(telemetry_target)
        self._stub = telemetry_pb2_grpc.TelemetryStub(self._channel)
        self._timeout = call_timeout_s
        self._outbox.route(
            KIND,
            telemetry_pb2.AuditEvent,
            self._send,
            on_dead_letter=self._dead_letter,
        )

    async def open(self) -> None:
        """Connect to the outbox table (the schema must be at head), move what an earlier
        release's outbox file still holds into it, and start relaying (including what an
        earlier run or another replica left)."""
        await self._outbox.open()
        if self._legacy_file is not None:
            moved = await self._store.adopt_file(self._legacy_file)
            if moved:
                log.info("audit outbox file moved into the outbox table", extra={"items": moved})
        self._outbox.start()

    async def close(self) -> None:
        await self._outbox.close()
        await self._channel.close()

    async def record(self, event: telemetry_pb2.AuditEvent) -> None:
        audit_log.info(
            "audit",
            extra={
                "event": event.action,
                "tenant": event.tenant,
                "target": event.target,
                "outcome": event.outcome,
                "event_id": event.event_id,
            },
        )
        await self._outbox.put_many([(KIND, event.event_id, event)])
        self._outbox.relay.wake()

    async def _append(self, events: list[telemetry_pb2.AuditEvent]) -> None:
        await self._stub.AppendAudit(
            telemetry_pb2.AppendAuditRequest(events=events), timeout=self._timeout
        )

    async def _send(self, events: list[telemetry_pb2.AuditEvent]) -> list[tuple[int, str]]:
        return await send_splitting_refusals(events, self._append, _refusal)

    async def _dead_letter(self, event: telemetry_pb2.AuditEvent, reason: str) -> None:
        await self.record(dead_letter_notice(event, reason))
