"""The gateway's durable outbox: writes that must not be lost, replayed until delivered.

Where items wait (services.kit.outbox.MessageOutbox): with ``outbox_url`` set (production),
the ``gateway_outbox`` table of the gateway's own database (gateway/migrations), shared by every
replica, so items acknowledged by a pod that is then deleted are delivered by the others; else
the local SQLite file ``<data_dir>/gateway-outbox.db`` (dev). Every item is a serialized
protobuf request of the receiving service's contract, so replay is "parse, send":

- kind ``memory``: payload ``toolmesh.memory.v1.AppendTurnsRequest``, key
  ``memory:<request id>``, delivered by memory.AppendTurns (de-duplicated by request id; the
  turns carry their acknowledgment time, so a late delivery lands in its place in the session).
- kind ``usage``: payload ``toolmesh.telemetry.v1.UsageRecord``, key ``usage:<request id>``,
  delivered in batches by telemetry.RecordUsage (de-duplicated by tenant and request id).
- kind ``audit``: payload ``toolmesh.telemetry.v1.AuditEvent``, key ``audit:<event id>``,
  delivered in batches by telemetry.AppendAudit (de-duplicated by tenant and event id).

A request's items (its usage record, its audit events, and its turns when memory could not
take them) are committed together: one transaction, one fsync, before the answer.

An item a receiver refuses for its content is set aside as a dead letter (metric, error log);
for an audit event a ``audit.dead_letter`` notice, built from the refused event's cleaned
fields, takes its place in the tenant's chain, so `toolmesh audit verify` says an event was
set aside instead of the chain silently missing it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from gateway.clients import Clients
from gateway.migrations import MIGRATIONS, PREFIX
from gateway.reliability import PROBE_INTERVAL_S, DependencyError, Guard
from gateway.settings import GatewaySettings
from services.kit.audit import dead_letter_notice
from services.kit.migrations import check_schema
from services.kit.outbox import MessageOutbox, OutboxStore, send_splitting_refusals
from services.kit.outbox_table import TableOutbox
from toolmesh.memory.v1 import memory_pb2
from toolmesh.telemetry.v1 import telemetry_pb2

log = logging.getLogger("toolmesh.gateway.outbox")

KIND_MEMORY = "memory"
KIND_USAGE = "usage"
KIND_AUDIT = "audit"
FILE_NAME = "gateway-outbox.db"
TELEMETRY = "telemetry"
# AppendTurns calls in flight at once while replaying: memory places each turn by its
# acknowledgment time whatever order they arrive in, and group-commits concurrent appends, so a
# backlog drains several times faster than one call at a time.
REPLAY_CONCURRENCY = 8


def _refusal(exc: Exception) -> str | None:
    """The reason when a receiver refused the content itself (so retrying cannot help)."""
    if (
        isinstance(exc, DependencyError)
        and exc.tried
        and exc.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED)
    ):
        return f"{exc.code.name}: {exc.reason}"
    return None


async def outbox_store(settings: GatewaySettings) -> OutboxStore | None:
    """The table store when ``outbox_url`` is set: its schema checked (or migrated, per
    ``migrate_on_start``) and what a local file of an earlier run still holds moved into it."""
    if not settings.outbox_url:
        return None
    await check_schema(settings.outbox_url, MIGRATIONS, migrate_on_start=settings.migrate_on_start)
    store = TableOutbox(
        settings.outbox_url,
        PREFIX,
        lease_s=settings.outbox_lease_s,
        synchronous=settings.outbox_sqlite_synchronous,
    )
    await store.open()
    try:
        moved = await store.adopt_file(settings.ensure_data_dir() / FILE_NAME)
    except BaseException:
        await store.close()
        raise
    if moved:
        log.info("outbox file moved into the outbox table", extra={"items": moved})
    return store


def open_outbox(
    settings: GatewaySettings,
    clients: Clients,
    guard: Guard,
    store: OutboxStore | None = None,
) -> MessageOutbox:
    """The outbox with its three delivery routes (not yet opened or started): on ``store``
    (opened) when given, else on the local file."""
    outbox = MessageOutbox(
        store or settings.ensure_data_dir() / FILE_NAME,
        synchronous=settings.outbox_sqlite_synchronous,
        idle_s=settings.outbox_idle_s,
        batch_window_s=settings.outbox_batch_window_s,
        base_backoff_s=settings.outbox_backoff_base_s,
        max_backoff_s=settings.outbox_backoff_max_s,
    )
    timeout = settings.outbox_call_timeout_s

    async def call(dependency: str, method: Any, request: Any) -> object:
        """One delivery call; an open breaker does not hold replay back once the dependency
        is back (Guard.call_recovering)."""
        return await guard.call_recovering(dependency, method, request, timeout)

    async def append_turns(requests: list[memory_pb2.AppendTurnsRequest]) -> list[tuple[int, str]]:
        limit = asyncio.Semaphore(REPLAY_CONCURRENCY)

        async def one(index: int, request: memory_pb2.AppendTurnsRequest) -> tuple[int, str] | None:
            async with limit:
                try:
                    await call("memory", clients.memory.AppendTurns, request)
                except DependencyError as err:
                    reason = _refusal(err)
                    if reason is None:
                        raise
                    return index, reason
            return None

        # Every call runs to its end (each is bounded); then the first failure retries the
        # batch (what was delivered is de-duplicated), else the refusals are set aside.
        outcomes = await asyncio.gather(
            *(one(i, r) for i, r in enumerate(requests)), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return [o for o in outcomes if isinstance(o, tuple)]

    async def record_usage(records: list[telemetry_pb2.UsageRecord]) -> list[tuple[int, str]]:
        async def send(batch: list[telemetry_pb2.UsageRecord]) -> object:
            request = telemetry_pb2.RecordUsageRequest(records=batch)
            return await call(TELEMETRY, clients.telemetry.RecordUsage, request)

        return await send_splitting_refusals(records, send, _refusal)

    async def append_audit(events: list[telemetry_pb2.AuditEvent]) -> list[tuple[int, str]]:
        async def send(batch: list[telemetry_pb2.AuditEvent]) -> object:
            request = telemetry_pb2.AppendAuditRequest(events=batch)
            return await call(TELEMETRY, clients.telemetry.AppendAudit, request)

        return await send_splitting_refusals(events, send, _refusal)

    async def leave_notice(refused: telemetry_pb2.AuditEvent, reason: str) -> None:
        if refused.action == "audit.dead_letter":
            return  # a refused notice is itself only set aside, never noticed again
        notice = dead_letter_notice(refused, reason)
        await outbox.put_many([(KIND_AUDIT, notice.event_id, notice)])

    outbox.route(KIND_MEMORY, memory_pb2.AppendTurnsRequest, append_turns, batch=50)
    outbox.route(KIND_USAGE, telemetry_pb2.UsageRecord, record_usage, batch=200)
    outbox.route(
        KIND_AUDIT,
        telemetry_pb2.AuditEvent,
        append_audit,
        batch=200,
        on_dead_letter=leave_notice,
    )
    return outbox


async def watch_recovery(guard: Guard, outbox: MessageOutbox) -> None:
    """While the breaker of an outbox receiver (memory, telemetry) is open, ask the receiver
    every PROBE_INTERVAL_S whether it is back; once it is (the breaker half-open), replay what
    waits for it at once. Replay then starts within moments of the recovery, whatever the
    relay's backoff and the breaker's open time."""
    receivers = {"memory": (KIND_MEMORY,), TELEMETRY: (KIND_USAGE, KIND_AUDIT)}
    while True:
        await asyncio.sleep(PROBE_INTERVAL_S)
        for dependency, kinds in receivers.items():
            try:
                if await guard.recovered(dependency):
                    log.info("receiver back; replaying now", extra={"dependency": dependency})
                    await outbox.replay_now(*kinds)
            except Exception as exc:  # the relay's own retries still deliver; keep watching
                log.warning("recovery watch failed", extra={"error": type(exc).__name__})
