"""The release analyzer: every interval, judge each release in progress and apply the result.

Every replica runs one; exactly one acts per release. Each tick a replica renews (or takes) the
lease of every release in progress with one conditional update (free, expired, or already its
own), and analyzes only those it holds; every change it writes is again conditional on holding
the lease and on the row's revision. So two replicas never both act on a release, and when a
replica dies (kill -9), another takes its releases over once the lease expires
(``release_lease_s``) and carries on from the state in the database, where the dead one left
it. A replica stopping cleanly lets its leases go at once.

Figures come from telemetry (GetReleaseFigures: the per-request records of each version) and,
while shadowing, from the replicas' shadow tallies. Telemetry unreachable means "waiting": a
telemetry outage neither promotes nor rolls back a release. Every transition the analyzer
decides (step, promote, rollback, fail, complete) is recorded with the figures it used and
audited through the router's audit outbox.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from services.kit.audit import SUCCESS, audit_event, derived_event_id
from services.kit.metrics import meter
from services.router.audit import RouterAudit
from services.router.backends.config import PLATFORM_TENANT
from services.router.releases import analysis
from services.router.releases.model import (
    Analysis,
    Check,
    Figures,
    Release,
    State,
    UnitKind,
)
from services.router.releases.store import Event, ReleaseStore
from services.router.releases.view import ReleaseView
from toolmesh.common.v1 import audit_pb2
from toolmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc

log = logging.getLogger("toolmesh.router.releases")

ACTOR = "router"
CONTRACTS = ("toolmesh.router.v1", "toolmesh.telemetry.v1")
_KINDS = {
    UnitKind.TOOL: telemetry_pb2.RELEASE_UNIT_KIND_TOOL,
    UnitKind.ROUTING: telemetry_pb2.RELEASE_UNIT_KIND_ROUTING,
    UnitKind.PROMPT: telemetry_pb2.RELEASE_UNIT_KIND_PROMPT,
}
AUDITED = {
    "step": audit_pb2.AUDIT_ACTION_RELEASE_STEP,
    "promote": audit_pb2.AUDIT_ACTION_RELEASE_PROMOTE,
    "rollback": audit_pb2.AUDIT_ACTION_RELEASE_ROLLBACK,
    "fail": audit_pb2.AUDIT_ACTION_RELEASE_FAIL,
    "complete": audit_pb2.AUDIT_ACTION_RELEASE_COMPLETE,
}
_TRANSITIONS = meter().create_counter(
    "toolmesh.router.release.transitions",
    unit="{transition}",
    description="Release transitions by action (start, step, promote, rollback, abort, ...)",
)

# Called once a release completes (a backend tool's replaced version is retired).
Completed = Callable[[Release], Awaitable[None]]


def stamp(moment: datetime) -> Timestamp:
    result = Timestamp()
    result.FromDatetime(moment)
    return result


def count_transition(action: str, release: Release) -> None:
    _TRANSITIONS.add(1, {"action": action, "unit": release.unit.label})


def release_audit(
    action: int, release: Release, actor: str, detail: str, **details: object
) -> telemetry_pb2.AuditEvent:
    """An audit event of a release, in its unit owner's trail (the platform's for shared
    units), its id derived from the release and revision so a replay is stored once."""
    return audit_event(
        action=action,
        tenant=release.unit.tenant or PLATFORM_TENANT,
        actor=actor,
        target=f"{release.unit.label}@{release.candidate_version}",
        outcome=SUCCESS,
        contract_versions=CONTRACTS,
        details={
            "release": release.id,
            "stable": release.stable_version,
            "candidate": release.candidate_version,
            "state": release.state.value,
            "weight": release.weight,
            "detail": detail,
            **details,
        },
        event_id=derived_event_id("release", release.id, str(release.revision), str(action)),
    )


def _due(release: Release, now: datetime) -> bool:
    if release.state is State.PAUSED:
        return False
    return release.next_check_at is None or now >= release.next_check_at


class Analyzer:
    def __init__(
        self,
        store: ReleaseStore,
        view: ReleaseView,
        telemetry: telemetry_pb2_grpc.TelemetryStub,
        audit: RouterAudit | None,
        *,
        owner: str,
        lease_s: float,
        clock: Callable[[], datetime],
        completed: Completed | None = None,
        telemetry_timeout_s: float = 5.0,
    ) -> None:
        self._store = store
        self._view = view
        self._telemetry = telemetry
        self._audit = audit
        self.owner = owner
        self._lease_s = lease_s
        self._clock = clock
        self._completed = completed
        self._timeout = telemetry_timeout_s
        self._telemetry_down = False

    async def tick(self) -> None:
        """Renew this replica's leases and analyze every held release that is due."""
        now = self._clock()
        for release in await self._store.active():
            if not await self._store.take_lease(release.id, self.owner, now, self._lease_s):
                continue
            if _due(release, now):
                # Read again under the lease: an operator may have changed it meanwhile.
                fresh = await self._store.get(release.id)
                if fresh is not None and fresh.active and _due(fresh, now):
                    await self.analyze(fresh, now)

    async def stop(self) -> None:
        """Let every lease go, so another replica takes over at once."""
        try:
            await self._store.drop_leases(self.owner)
        except Exception:
            log.warning("could not let the release leases go; they expire on their own")

    async def analyze(self, release: Release, now: datetime) -> None:
        judged = await self._judge(release, now)
        step = analysis.decide(release, judged, now)
        judged = replace(judged, decision=step.detail)
        after = replace(step.release, last_analysis=judged)
        event = Event(now, step.action, f"{ACTOR} {self.owner}", step.detail, judged)
        if not await self._store.update(
            release, after, [event], owner=self.owner, now=now, stable=step.stable
        ):
            log.info(
                "release changed under the analyzer; judged again", extra={"release": release.id}
            )
            return
        if step.action != "check":
            count_transition(step.action, after)
            log.info(
                "release transition",
                extra={
                    "release": release.id,
                    "unit": release.unit.label,
                    "action": step.action,
                    "state": after.state.value,
                    "weight": after.weight,
                    "detail": step.detail,
                },
            )
        action = AUDITED.get(step.action)
        if action is not None and self._audit is not None:
            await self._audit.record(
                release_audit(
                    action,
                    replace(after, revision=release.revision + 1),
                    ACTOR,
                    step.detail,
                    analysis=judged.summary(),
                )
            )
        if step.action != "check":
            await self._view.refresh()
        if after.state is State.SUCCEEDED and self._completed is not None:
            await self._completed(after)

    async def _judge(self, release: Release, now: datetime) -> Analysis:
        plan = release.plan
        state = release.state
        if state is State.SHADOW:
            tally = await self._store.shadow(release.id)
            stable, candidate = analysis.shadow_figures(
                release, tally, release.stage_started_at, now
            )
            outcome, checks = analysis.judge_shadow(plan, stable, candidate)
            return Analysis(now, state, release.weight, outcome, tuple(checks), (stable, candidate))
        if state is State.MONITORING:
            windows = [(release.candidate_version, release.stage_started_at)]
        else:
            # Side by side: both versions over this step's window, so they are compared under
            # the same load and conditions (a baseline from another time would not be).
            windows = [
                (release.stable_version, release.stage_started_at),
                (release.candidate_version, release.stage_started_at),
            ]
        try:
            figures = await self._figures(release, windows, now)
        except aio.AioRpcError as error:
            return self._unreachable(release, now, error)
        if self._telemetry_down:
            log.info("telemetry reachable again; releases judged again")
            self._telemetry_down = False
        if state is State.MONITORING:
            outcome, checks = analysis.judge_monitoring(plan, figures[0])
        else:
            outcome, checks = analysis.judge_canary(plan, release.unit.kind, figures[0], figures[1])
        return Analysis(now, state, release.weight, outcome, tuple(checks), tuple(figures))

    def _unreachable(self, release: Release, now: datetime, error: aio.AioRpcError) -> Analysis:
        code = error.code()
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        if not self._telemetry_down:
            log.warning(
                "telemetry unreachable: releases wait (neither promoted nor rolled back)",
                extra={"code": name},
            )
        self._telemetry_down = True
        check = Check("telemetry", True, f"no figures: telemetry answered {name}; waiting")
        return Analysis(now, release.state, release.weight, analysis.WAITING, (check,), ())

    async def _figures(
        self, release: Release, windows: list[tuple[str, datetime]], now: datetime
    ) -> list[Figures]:
        unit = release.unit
        reply = await self._telemetry.GetReleaseFigures(
            telemetry_pb2.GetReleaseFiguresRequest(
                kind=_KINDS[unit.kind],
                name=unit.name,
                tenant=unit.tenant,
                versions=[
                    telemetry_pb2.VersionWindow(version=v, start=stamp(start), end=stamp(now))
                    for v, start in windows
                ],
            ),
            timeout=self._timeout,
        )
        return [
            Figures(
                version=f.version,
                source="traffic",
                requests=f.requests,
                errors=f.errors,
                p95_ms=f.p95_ms,
                window_start=start,
                window_end=now,
                error_burn_rate=f.error_burn_rate,
                latency_burn_rate=f.latency_burn_rate,
                no_match=f.no_match,
            )
            for f, (_, start) in zip(reply.versions, windows, strict=True)
        ]
