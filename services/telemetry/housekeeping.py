"""Telemetry's periodic jobs: retention per data kind, tail-sampling decisions, reservation
sweeps and audit checkpoints.

Retention is enforced every ``prune_interval_s``: each pass deletes what is past its kind's
retention in chunks of at most 5,000 rows per transaction over an indexed column (spans by
end time, usage records by occurrence time, audit events by tenant and seq), looping until
nothing expired is left. So expired data is gone at most one interval plus one pass after it
expired, and ingest never waits for more than one chunk. Audit events are never deleted past
a signed checkpoint (services.telemetry.audit.AuditLog.prune) and are kept forever unless
``audit_retention_days`` is set.
"""

from __future__ import annotations

import logging
import time

from services.kit.metrics import meter
from services.kit.periodic import Stop, every
from services.telemetry.auditing import AuditCheckpoints
from services.telemetry.ledger import Ledger
from services.telemetry.settings import TelemetrySettings
from services.telemetry.store import SpanStore

log = logging.getLogger(__name__)

NS_PER_S = 1_000_000_000
# Budgets read the totals of the current day and month only; a little over two months back
# covers the month in progress whatever the day.
TOTALS_KEPT_S = 62 * 86400

_PRUNED = meter().create_counter(
    "toolmesh.telemetry.pruned_rows",
    unit="{row}",
    description="Rows deleted by retention, by kind: spans, usage, usage_totals, audit",
)
_TRACES_KEPT = meter().create_counter(
    "toolmesh.telemetry.traces_kept",
    unit="{trace}",
    description="Traces kept by tail sampling, by reason: error, slow, ratio, already_kept",
)
_TRACES_DROPPED = meter().create_counter(
    "toolmesh.telemetry.traces_dropped", unit="{trace}", description="Traces sampled away"
)
_SPANS_DROPPED = meter().create_counter(
    "toolmesh.telemetry.spans_dropped",
    unit="{span}",
    description="Spans deleted by tail sampling (their trace was not kept)",
)


class Housekeeping:
    def __init__(
        self,
        settings: TelemetrySettings,
        store: SpanStore,
        ledger: Ledger,
        checkpoints: AuditCheckpoints,
    ) -> None:
        self._settings = settings
        self._store = store
        self._ledger = ledger
        self._checkpoints = checkpoints

    async def enforce_retention(self) -> dict[str, int]:
        """One retention pass over every kind; rows deleted per kind."""
        now_ns = time.time_ns()
        settings = self._settings
        deleted = {
            "spans": await self._store.prune(now_ns - int(settings.retention_hours * 3600 * 1e9)),
            "usage_totals": await self._ledger.prune_totals(now_ns - TOTALS_KEPT_S * NS_PER_S),
        }
        if settings.usage_retention_days:
            cut = now_ns - int(settings.usage_retention_days * 86400 * 1e9)
            deleted["usage"] = await self._ledger.prune(cut)
        deleted["audit"] = await self._checkpoints.prune()
        for kind, count in deleted.items():
            if count:
                _PRUNED.add(count, {"kind": kind})
        if any(deleted.values()):
            log.info("retention enforced", extra={"deleted": deleted})
        return deleted

    async def decide_traces(self) -> None:
        """Tail sampling: decide every trace quiet for the decision window."""
        settings = self._settings
        result = await self._store.decide_pending(
            ended_before_ns=time.time_ns() - int(settings.trace_decision_wait_s * 1e9),
            ratio=settings.trace_keep_ratio,
            slow_ms=settings.trace_keep_slow_ms,
        )
        for reason, count in result.kept.items():
            _TRACES_KEPT.add(count, {"reason": reason})
        if result.dropped_traces:
            _TRACES_DROPPED.add(result.dropped_traces)
            _SPANS_DROPPED.add(result.dropped_spans)

    async def sweep_reservations(self) -> None:
        """Expired reservations already stopped counting; this only keeps the table small."""
        deleted = await self._ledger.delete_expired(time.time_ns())
        if deleted:
            log.info("deleted expired reservations", extra={"deleted": deleted})

    async def checkpoint_audit(self) -> None:
        signed = await self._checkpoints.checkpoint_all()
        if signed:
            log.info("audit heads checkpointed", extra={"tenants": signed})

    def start(self) -> list[Stop]:
        settings = self._settings
        return [
            every(settings.prune_interval_s, self.enforce_retention, name="retention"),
            every(settings.trace_decision_interval_s, self.decide_traces, name="tail-sampling"),
            every(
                settings.reservation_sweep_interval_s,
                self.sweep_reservations,
                name="reservation-sweep",
            ),
            # One interval after start: what a restart finds was signed before it or is signed
            # with the next changes.
            every(
                settings.audit_checkpoint_interval_s,
                self.checkpoint_audit,
                name="audit-checkpoint",
                first_after_s=settings.audit_checkpoint_interval_s,
            ),
        ]
