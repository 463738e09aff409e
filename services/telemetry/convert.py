"""Conversions between telemetry's rows and its contract messages (no I/O, no checks).

Requests reach these only after services.telemetry.validation passed them, so every timestamp
converts without raising.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from services.telemetry import slo
from services.telemetry.audit import Verdict
from services.telemetry.checkpoints import Checkpoint
from services.telemetry.ledger import Amounts, BudgetState
from services.telemetry.records import VersionSamples
from services.telemetry.stats import GroupStats, nearest_rank
from services.telemetry.store import SpanRow
from services.telemetry.validation import stamp_ns
from toolmesh.telemetry.v1 import telemetry_pb2

PERIODS = {telemetry_pb2.BUDGET_PERIOD_DAY: "day", telemetry_pb2.BUDGET_PERIOD_MONTH: "month"}
_PERIOD_ENUMS = {name: value for value, name in PERIODS.items()}
COST_KEYS = {
    telemetry_pb2.COST_GROUP_BY_TENANT: "tenant",
    telemetry_pb2.COST_GROUP_BY_PRINCIPAL: "principal",
    telemetry_pb2.COST_GROUP_BY_TOOL: "tool_name",
    telemetry_pb2.COST_GROUP_BY_DAY: "day",
    telemetry_pb2.COST_GROUP_BY_MODEL: "model",
}
GROUPINGS = {
    telemetry_pb2.STATS_GROUP_BY_SERVICE: "service",
    telemetry_pb2.STATS_GROUP_BY_ROUTE: "route",
    telemetry_pb2.STATS_GROUP_BY_TOOL: "tool",
}
_PROBLEM_KINDS = {
    "edited": telemetry_pb2.AUDIT_PROBLEM_KIND_EDITED,
    "deleted": telemetry_pb2.AUDIT_PROBLEM_KIND_DELETED,
    "inserted": telemetry_pb2.AUDIT_PROBLEM_KIND_INSERTED,
    "reordered": telemetry_pb2.AUDIT_PROBLEM_KIND_REORDERED,
    "rewritten": telemetry_pb2.AUDIT_PROBLEM_KIND_REWRITTEN,
    "truncated": telemetry_pb2.AUDIT_PROBLEM_KIND_TRUNCATED,
    "wiped": telemetry_pb2.AUDIT_PROBLEM_KIND_WIPED,
    "checkpoint_invalid": telemetry_pb2.AUDIT_PROBLEM_KIND_CHECKPOINT_INVALID,
}
_SEVERITIES = {
    "page": telemetry_pb2.BURN_ALERT_SEVERITY_PAGE,
    "ticket": telemetry_pb2.BURN_ALERT_SEVERITY_TICKET,
}
UNKNOWN_SERVICE = "unknown_service"


def timestamp(nanos: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(nanos)
    return stamp


def usage_row(record: telemetry_pb2.UsageRecord) -> dict[str, Any]:
    """The ledger's columns of a validated record."""
    return {
        "request_id": record.request_id,
        "tenant": record.tenant,
        "principal": record.principal,
        "route": record.route,
        "tool_name": record.tool_name,
        "tool_version": record.tool_version,
        "tokens_in": record.tokens_in,
        "tokens_out": record.tokens_out,
        "tool_calls": record.tool_calls,
        "cost_units": record.cost_units,
        "occurred_at_ns": stamp_ns(record.occurred_at),
        "outcome": record.outcome,
        "reservation_id": record.reservation_id,
        "service": record.service or UNKNOWN_SERVICE,
        "duration_ms": record.duration_ms if record.HasField("duration_ms") else None,
        "grpc_status_code": record.grpc_status_code,
        "error": record.error,
        "tool_outcome": record.tool_outcome,
        "tool_duration_ms": record.tool_duration_ms,
        "trace_id": record.trace_id,
        "model": record.model,
        "prompts": ",".join(record.prompts),
        "rules_version": record.rules_version,
    }


def audit_row(event: telemetry_pb2.AuditEvent) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "occurred_at_ns": stamp_ns(event.occurred_at),
        "tenant": event.tenant,
        "actor": event.actor,
        "action": event.action,
        "target": event.target,
        "outcome": event.outcome,
        "request_id": event.request_id,
        "trace_id": event.trace_id,
        "policy_version": event.policy_version,
        "contract_versions": list(event.contract_versions),
        "details_json": event.details_json,
    }


def stats_row(grouping: str, group: GroupStats, service: str) -> telemetry_pb2.StatsRow:
    key = group.key
    if grouping == "service":
        keys = {"service": key[0]}
    elif grouping == "route":
        keys = {"service": key[0], "route": key[1]}
    else:
        keys = {"service": service, "tool_name": key[0], "tool_version": key[1]}
    return telemetry_pb2.StatsRow(
        **keys,
        count=group.count,
        errors=group.errors,
        error_rate=group.error_rate,
        mean_ms=group.mean_ms,
        p50_ms=group.p50_ms,
        p95_ms=group.p95_ms,
        p99_ms=group.p99_ms,
    )


def trace_span(row: SpanRow) -> telemetry_pb2.TraceSpan:
    span = telemetry_pb2.TraceSpan(
        span_id=row.span_id,
        parent_span_id=row.parent_span_id,
        service=row.service,
        name=row.name,
        kind=telemetry_pb2.SpanKind.Name(row.kind),
        start_time=timestamp(row.start_ns),
        duration_ms=row.duration_ms,
        error=row.error,
        attributes_json=row.attributes_json,
        route=row.route,
        tool_name=row.tool_name,
        tool_version=row.tool_version,
        tenant=row.tenant,
        exporter=row.exporter,
    )
    if row.grpc_status_code is not None:
        span.grpc_status_code = row.grpc_status_code
    return span


def amounts(value: Amounts) -> telemetry_pb2.BudgetAmounts:
    return telemetry_pb2.BudgetAmounts(
        tool_calls=value.tool_calls, tokens=value.tokens, cost_micros=value.cost_micros
    )


def budget_status(state: BudgetState) -> telemetry_pb2.BudgetStatus:
    budget = state.budget
    period_start, resets_at = Timestamp(), Timestamp()
    period_start.FromDatetime(state.period_start)
    resets_at.FromDatetime(state.resets_at)
    return telemetry_pb2.BudgetStatus(
        tenant=budget.tenant,
        principal=budget.principal,
        period=_PERIOD_ENUMS[budget.period],
        limits=amounts(state.limits),
        used=amounts(state.used),
        reserved=amounts(state.reserved),
        remaining=amounts(state.remaining),
        period_start=period_start,
        resets_at=resets_at,
    )


def stored_event(row: Any) -> telemetry_pb2.StoredAuditEvent:
    return telemetry_pb2.StoredAuditEvent(
        event=telemetry_pb2.AuditEvent(
            event_id=row.event_id,
            occurred_at=timestamp(row.occurred_at_ns),
            tenant=row.tenant,
            actor=row.actor,
            action=row.action,
            target=row.target,
            outcome=row.outcome,
            request_id=row.request_id,
            trace_id=row.trace_id,
            policy_version=row.policy_version,
            contract_versions=json.loads(row.contract_versions),
            details_json=row.details_json,
        ),
        seq=row.seq,
        prev_hash=row.prev_hash,
        hash=row.hash,
    )


def checkpoint(value: Checkpoint) -> telemetry_pb2.AuditCheckpoint:
    return telemetry_pb2.AuditCheckpoint(
        tenant=value.tenant,
        seq=value.seq,
        hash=value.hash,
        signed_at=timestamp(value.time_ns),
        key_id=value.key_id,
        signature=value.signature,
        log=value.log,
        entry=value.entry,
    )


def verdict(value: Verdict) -> telemetry_pb2.VerifyAuditResponse:
    response = telemetry_pb2.VerifyAuditResponse(
        ok=value.problem is None,
        events_checked=value.checked,
        head_seq=value.head_seq,
        head_hash=value.head_hash,
        dead_letter_notices=value.dead_letters,
        pruned_through_seq=value.pruned_seq,
    )
    if value.checkpoint is not None:
        response.last_checkpoint.CopyFrom(checkpoint(value.checkpoint))
    if value.problem is not None:
        problem = value.problem
        response.problem.CopyFrom(
            telemetry_pb2.AuditProblem(
                kind=_PROBLEM_KINDS[problem.kind],
                seq=problem.seq,
                event_id=problem.event_id,
                message=problem.message,
            )
        )
    return response


def sli_status(
    kind: telemetry_pb2.SliKind,
    target: Fraction,
    counts: Mapping[int, slo.WindowCounts],
    period_s: int,
    threshold_ms: float = 0.0,
) -> telemetry_pb2.SliStatus:
    period = counts[period_s]
    burns = slo.burn_rates(counts, target)
    return telemetry_pb2.SliStatus(
        kind=kind,
        target=float(target),
        latency_threshold_ms=threshold_ms,
        total=period.total,
        good=period.total - period.bad,
        sli=float(slo.sli(period.total - period.bad, period.total)),
        error_budget_remaining=float(slo.budget_remaining(period.bad, period.total, target)),
        burn_rates=[
            telemetry_pb2.BurnRate(
                window_seconds=window,
                burn_rate=float(burns[window]),
                total=counts[window].total,
                bad=counts[window].bad,
            )
            for window in slo.BURN_WINDOWS_S
        ],
        alerts=[
            telemetry_pb2.BurnAlert(
                severity=_SEVERITIES[state.rule.severity],
                long_window_seconds=state.rule.long_window_s,
                short_window_seconds=state.rule.short_window_s,
                threshold=float(state.rule.threshold),
                firing=state.firing,
            )
            for state in slo.alerts(burns)
        ],
    )


def version_figures(
    window: telemetry_pb2.VersionWindow, samples: VersionSamples, objective: slo.Objective
) -> telemetry_pb2.VersionFigures:
    """One version's figures, with the burn rates of ``objective``'s two SLIs."""
    durations = samples.durations
    count = len(durations)
    figures = telemetry_pb2.VersionFigures(
        version=window.version,
        requests=count,
        errors=samples.errors,
        slow=samples.slow,
        no_match=samples.no_match,
        window_start=window.start,
        window_end=window.end,
    )
    if count:
        figures.error_rate = samples.errors / count
        figures.p50_ms = nearest_rank(durations, 50)
        figures.p95_ms = nearest_rank(durations, 95)
        figures.mean_ms = sum(durations) / count
        figures.error_burn_rate = float(
            slo.burn_rate(samples.errors, count, objective.availability)
        )
        figures.latency_burn_rate = float(
            slo.burn_rate(samples.slow, count, objective.latency_target)
        )
    return figures
