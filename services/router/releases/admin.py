"""The release RPCs: start (gates, then the plan), get, list, and the operator's controls.

Tenancy: a release belongs to its unit's owner. Built-in tools, the routing rules, shared
backends' tools and the platform prompt selection are platform-wide units: starting,
controlling and even reading their releases needs ``platform:admin`` (their figures are every
tenant's traffic). A tenant's backend tools and its own prompt selection are that tenant's,
released by its ``admin`` (the gateway checks the scope) and seen with ``ops:read``. A
release of another tenant's unit is NOT_FOUND, exactly like one that does not exist.

The operator's requests are audited by the gateway (it knows who asked and whether the answer
reached them); the router audits the gates' result and the analyzer's own transitions.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc import aio

from services.kit.errors import abort, abort_invalid
from services.kit.scopes import PLATFORM_ADMIN
from services.router.audit import RouterAudit
from services.router.backends.config import PLATFORM_TENANT
from services.router.invoke import Executor
from services.router.models.prompts import KINDS, PromptNotFoundError, PromptStore
from services.router.notes import NotesStore
from services.router.registry import Example, SideEffect, Tool, ToolContext, load_lock
from services.router.releases import analysis, gates
from services.router.releases.analyzer import ACTOR, count_transition, release_audit
from services.router.releases.model import (
    ROUTING_UNIT,
    Analysis,
    Check,
    Figures,
    Plan,
    PlanKind,
    Release,
    State,
    UnitKey,
    UnitKind,
    shadow_refusal,
)
from services.router.releases.store import ActiveReleaseError, Event, ReleaseStore
from services.router.releases.view import ReleaseView
from services.router.served import Served
from toolmesh.common.v1 import audit_pb2, common_pb2
from toolmesh.router.v1 import router_pb2

log = logging.getLogger("toolmesh.router.releases")

MAX_NAME_CHARS = 128
MAX_VERSION_CHARS = 64
MAX_REASON_CHARS = 1000
MAX_EXAMPLES_CHARS = 256 * 1024
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
# Attempts at an operator's change when the analyzer changed the release at the same moment.
_CONTROL_ATTEMPTS = 5

_KINDS = {
    router_pb2.RELEASE_UNIT_KIND_TOOL: UnitKind.TOOL,
    router_pb2.RELEASE_UNIT_KIND_ROUTING: UnitKind.ROUTING,
    router_pb2.RELEASE_UNIT_KIND_PROMPT: UnitKind.PROMPT,
}
_KIND_MESSAGES = {kind: number for number, kind in _KINDS.items()}
_PLANS = {
    router_pb2.RELEASE_PLAN_KIND_SHADOW_THEN_CANARY: PlanKind.SHADOW_THEN_CANARY,
    router_pb2.RELEASE_PLAN_KIND_CANARY_ONLY: PlanKind.CANARY_ONLY,
    router_pb2.RELEASE_PLAN_KIND_IMMEDIATE: PlanKind.IMMEDIATE,
}
_PLAN_MESSAGES = {kind: number for number, kind in _PLANS.items()}
_STATES = {
    State.REFUSED: router_pb2.RELEASE_STATE_REFUSED,
    State.SHADOW: router_pb2.RELEASE_STATE_SHADOW,
    State.CANARY: router_pb2.RELEASE_STATE_CANARY,
    State.PAUSED: router_pb2.RELEASE_STATE_PAUSED,
    State.MONITORING: router_pb2.RELEASE_STATE_MONITORING,
    State.SUCCEEDED: router_pb2.RELEASE_STATE_SUCCEEDED,
    State.ROLLED_BACK: router_pb2.RELEASE_STATE_ROLLED_BACK,
    State.ABORTED: router_pb2.RELEASE_STATE_ABORTED,
    State.FAILED: router_pb2.RELEASE_STATE_FAILED,
}

Completed = Callable[[Release], Awaitable[None]]


def _stamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def plan_message(plan: Plan) -> router_pb2.ReleasePlan:
    return router_pb2.ReleasePlan(
        kind=_PLAN_MESSAGES[plan.kind],
        steps=list(plan.steps),
        interval_seconds=plan.interval_s,
        threshold=plan.threshold,
        shadow_share=plan.shadow_share,
        shadow_intervals=plan.shadow_intervals,
        monitor_seconds=plan.monitor_s,
        min_requests=plan.min_requests,
        max_error_rate_increase=plan.max_error_rate_increase,
        max_p95_ratio=plan.max_p95_ratio,
        p95_slack_ms=plan.p95_slack_ms,
        max_burn_rate=plan.max_burn_rate,
        min_agreement=plan.min_agreement,
    )


def plan_from(message: router_pb2.ReleasePlan, default_kind: PlanKind) -> Plan:
    """The plan asked for, each unset field at its default."""
    plan = Plan(kind=_PLANS.get(message.kind, default_kind))
    changes: dict[str, object] = {}
    if message.steps:
        changes["steps"] = tuple(message.steps)
    for field, attribute in (
        ("interval_seconds", "interval_s"),
        ("threshold", "threshold"),
        ("shadow_share", "shadow_share"),
        ("shadow_intervals", "shadow_intervals"),
        ("min_requests", "min_requests"),
    ):
        value = getattr(message, field)
        if value:
            changes[attribute] = value
    for field, attribute in (
        ("monitor_seconds", "monitor_s"),
        ("max_error_rate_increase", "max_error_rate_increase"),
        ("max_p95_ratio", "max_p95_ratio"),
        ("p95_slack_ms", "p95_slack_ms"),
        ("max_burn_rate", "max_burn_rate"),
        ("min_agreement", "min_agreement"),
    ):
        if message.HasField(field):
            changes[attribute] = getattr(message, field)
    return replace(plan, **changes)  # type: ignore[arg-type]


def _check(check: Check) -> router_pb2.ReleaseCheck:
    return router_pb2.ReleaseCheck(
        name=check.name,
        passed=check.passed,
        detail=check.detail,
        value=check.value,
        limit=check.limit,
    )


def _figures(figures: Figures) -> router_pb2.ReleaseFigures:
    return router_pb2.ReleaseFigures(
        version=figures.version,
        source=figures.source,
        requests=figures.requests,
        errors=figures.errors,
        error_rate=figures.error_rate,
        p95_ms=figures.p95_ms,
        error_burn_rate=figures.error_burn_rate,
        latency_burn_rate=figures.latency_burn_rate,
        agreement=figures.agreement,
        window_start=_stamp(figures.window_start),
        window_end=_stamp(figures.window_end),
        no_match=figures.no_match,
    )


def analysis_message(judged: Analysis) -> router_pb2.ReleaseAnalysis:
    return router_pb2.ReleaseAnalysis(
        at=_stamp(judged.at),
        state=_STATES[judged.state],
        weight=judged.weight,
        outcome=judged.outcome,
        checks=[_check(c) for c in judged.checks],
        figures=[_figures(f) for f in judged.figures],
        decision=judged.decision,
    )


def release_message(release: Release, events: list[Event] | None = None) -> router_pb2.Release:
    message = router_pb2.Release(
        id=release.id,
        unit=router_pb2.ReleaseUnit(
            kind=_KIND_MESSAGES[release.unit.kind],
            name=release.unit.name,
            tenant=release.unit.tenant,
        ),
        stable_version=release.stable_version,
        candidate_version=release.candidate_version,
        plan=plan_message(release.plan),
        state=_STATES[release.state],
        paused_state=(
            _STATES[release.paused_state]
            if release.paused_state
            else router_pb2.RELEASE_STATE_UNSPECIFIED
        ),
        weight=release.weight,
        step=release.step,
        failed_checks=release.failed_checks,
        started_at=_stamp(release.started_at),
        updated_at=_stamp(release.updated_at),
        finished_at=_stamp(release.finished_at),
        next_check_at=_stamp(release.next_check_at),
        started_by=release.started_by,
        reason=release.reason,
        gates=[_check(c) for c in release.gates],
        monitor_until=_stamp(release.monitor_until),
        analyzer=release.lease_owner if release.active else "",
    )
    if release.last_analysis is not None:
        message.last_analysis.CopyFrom(analysis_message(release.last_analysis))
    for event in events or []:
        message.events.append(
            router_pb2.ReleaseEvent(
                at=_stamp(event.at),
                action=event.action,
                actor=event.actor,
                detail=event.detail,
                analysis=analysis_message(event.analysis) if event.analysis else None,
            )
        )
    return message


def _platform(caller: common_pb2.Caller) -> bool:
    return PLATFORM_ADMIN in caller.scopes


@dataclass(frozen=True)
class Candidate:
    """A unit resolved for a start: its stable and candidate versions and, for tools, both
    versions' Tools and the backend's live fingerprint."""

    unit: UnitKey
    stable: str
    side_effect: SideEffect | None = None
    stable_tool: Tool | None = None
    candidate_tool: Tool | None = None
    live_fingerprint: str | None = None


class ReleaseAdmin:
    def __init__(
        self,
        store: ReleaseStore,
        view: ReleaseView,
        *,
        served: Served,
        prompts: PromptStore,
        executor: Executor,
        notes: NotesStore,
        audit: RouterAudit | None,
        clock: Callable[[], datetime],
        completed: Completed | None = None,
    ) -> None:
        self._store = store
        self._view = view
        self._served = served
        self._prompts = prompts
        self._executor = executor
        self._notes = notes
        self._audit = audit
        self._clock = clock
        self._completed = completed

    async def releasing_prompt(self, owner: str, name: str) -> str | None:
        """The release of a prompt selection in progress (PromptAdmin refuses changes then)."""
        found = await self._store.active_for(UnitKey(UnitKind.PROMPT, owner, name))
        return found.id if found is not None else None

    # -- start ----------------------------------------------------------------------------------

    async def start(
        self, request: router_pb2.StartReleaseRequest, context: aio.ServicerContext
    ) -> router_pb2.Release:
        caller = request.caller
        kind, examples = await self._checked(request, context)
        resolved = await self._resolve(kind, request, context)
        unit = resolved.unit
        if not unit.tenant and not _platform(caller):
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{unit.label} is a platform-wide unit: releasing it needs the scope "
                f"{PLATFORM_ADMIN}",
            )
        candidate = request.candidate_version
        if candidate == resolved.stable:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{candidate} is already the stable version of {unit.label}",
            )
        plan = await self._plan(request, unit, resolved.side_effect, context)
        # The database, not this replica's view: another replica may have just finished one.
        in_progress = await self._store.active_for(unit)
        if in_progress is not None:
            await self._busy(context, in_progress)
        checks = await self._gates(kind, request, resolved, examples)
        stable_version = resolved.stable
        if unit.kind is UnitKind.PROMPT and all(c.passed for c in checks):
            # The owner's own selection row carries the release (made now, not before every
            # check passed: a tenant without one follows the platform's until then).
            pinned = await self._prompts.pin(unit.tenant, unit.name, by=caller.subject)
            stable_version = str(pinned)
        release = self._new_release(request, unit, stable_version, plan, checks)
        events = [
            Event(release.started_at, "start", caller.subject, _start_detail(release, request)),
            Event(release.started_at, "gate", ACTOR, _gate_detail(checks)),
        ]
        stable = None
        if release.state is not State.REFUSED and plan.kind is PlanKind.IMMEDIATE:
            step = analysis.promote(
                release, release.started_at, actor_detail=f"promoted at once by {caller.subject}"
            )
            release, stable = step.release, step.stable
            events.append(Event(release.started_at, "promote", caller.subject, step.detail))
        try:
            await self._store.create(release, events, stable=stable)
        except ActiveReleaseError as error:
            found = await self._store.get(error.release_id)
            assert found is not None
            await self._busy(context, found)
        count_transition("refuse" if release.state is State.REFUSED else "start", release)
        await self._audit_gates(release, checks)
        await self._view.refresh()
        if release.state is State.SUCCEEDED and self._completed is not None:
            await self._completed(release)
        if unit.kind is UnitKind.PROMPT:
            self._prompts.forget()
        if release.state is State.REFUSED:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"release {release.id} refused: {release.reason}",
                error_details_pb2.PreconditionFailure(
                    violations=[
                        error_details_pb2.PreconditionFailure.Violation(
                            type="RELEASE_GATE", subject=c.name, description=c.detail
                        )
                        for c in checks
                        if not c.passed
                    ]
                ),
            )
        log.info(
            "release started",
            extra={
                "release": release.id,
                "unit": unit.label,
                "candidate": candidate,
                "plan": plan.kind.value,
                "state": release.state.value,
            },
        )
        return release_message(release)

    async def _checked(
        self, request: router_pb2.StartReleaseRequest, context: aio.ServicerContext
    ) -> tuple[UnitKind, list[Example]]:
        """The unit's kind and the examples supplied, or INVALID_ARGUMENT naming the fields."""
        kind = _KINDS.get(request.unit.kind)
        problems = [] if request.caller.tenant else [("caller.tenant", "required")]
        if kind is None:
            problems.append(("unit.kind", "one of TOOL, ROUTING or PROMPT"))
        elif kind is UnitKind.ROUTING and request.unit.name:
            problems.append(("unit.name", "empty for the routing rules"))
        elif kind is not UnitKind.ROUTING and not 1 <= len(request.unit.name) <= MAX_NAME_CHARS:
            problems.append(("unit.name", f"1 to {MAX_NAME_CHARS} characters"))
        elif kind is UnitKind.PROMPT and request.unit.name not in KINDS:
            problems.append(("unit.name", f"one of {', '.join(sorted(KINDS))}"))
        if not 1 <= len(request.candidate_version) <= MAX_VERSION_CHARS:
            problems.append(("candidate_version", f"1 to {MAX_VERSION_CHARS} characters"))
        if len(request.reason) > MAX_REASON_CHARS:
            problems.append(("reason", f"at most {MAX_REASON_CHARS} characters"))
        if request.shared and kind is not UnitKind.PROMPT:
            problems.append(("shared", "only for a prompt (the platform selection)"))
        examples: list[Example] = []
        if len(request.examples_json) > MAX_EXAMPLES_CHARS:
            problems.append(("examples_json", f"at most {MAX_EXAMPLES_CHARS} characters"))
        elif request.examples_json:
            if kind is not UnitKind.TOOL:
                problems.append(("examples_json", "only for a tool"))
            else:
                try:
                    examples = gates.parse_examples(request.examples_json)
                except ValueError as error:
                    problems.append(("examples_json", str(error)))
        if problems or kind is None:
            await abort_invalid(context, problems)
        return kind, examples

    async def _busy(self, context: aio.ServicerContext, release: Release) -> None:
        await abort(
            context,
            grpc.StatusCode.FAILED_PRECONDITION,
            f"release {release.id} of {release.unit.label} ({release.candidate_version}) is "
            f"{release.state.value}: promote or abort it before starting another",
        )

    async def _resolve(
        self, kind: UnitKind, request: router_pb2.StartReleaseRequest, context: aio.ServicerContext
    ) -> Candidate:
        name, candidate = request.unit.name, request.candidate_version
        tenant, now = request.caller.tenant, self._clock()
        if kind is UnitKind.ROUTING:
            stable = self._view.stable(ROUTING_UNIT) or await self._store.ensure_unit(
                ROUTING_UNIT, self._served.rules.seed, by=request.caller.subject, now=now
            )
            if candidate not in self._served.routers:
                loaded = ", ".join(sorted(self._served.routers))
                await abort(
                    context,
                    grpc.StatusCode.NOT_FOUND,
                    f"routing rules version {candidate} is not loaded (loaded: {loaded}); put "
                    "its file in the router's rules_dir on every replica",
                )
            return Candidate(ROUTING_UNIT, stable)
        if kind is UnitKind.PROMPT:
            owner = "" if request.shared else tenant
            if request.shared and not _platform(request.caller):
                await abort(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"the platform prompt selection needs the scope {PLATFORM_ADMIN}",
                )
            if not candidate.isdigit():
                await abort_invalid(context, [("candidate_version", "a prompt version number")])
            try:
                await self._prompts.get(owner, name, int(candidate))
                current = await self._prompts.selected(owner, name)
            except PromptNotFoundError as error:
                await abort(context, grpc.StatusCode.NOT_FOUND, str(error))
            return Candidate(UnitKey(UnitKind.PROMPT, owner, name), str(current.version))
        unit = self._served.unit_of(tenant, name)
        if unit is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"tool {name} is not registered")
        if "." not in name:
            registry = self._served.registry
            latest = registry.latest(name)
            stable = self._view.stable(unit) or await self._store.ensure_unit(
                unit, latest.spec.version if latest else candidate, by="bootstrap", now=now
            )
            stable_tool = registry.get(name, stable) or latest
            candidate_tool = registry.get(name, candidate)
            if candidate_tool is None:
                await abort(
                    context, grpc.StatusCode.NOT_FOUND, f"tool {name} has no version {candidate}"
                )
            assert stable_tool is not None
            return Candidate(
                unit, stable, candidate_tool.spec.side_effect, stable_tool, candidate_tool
            )
        found = self._served.backends.tool(tenant, name)
        assert found is not None
        runtime, tool_name = found
        versions = runtime.published.get(tool_name, {})
        stable_tool = runtime.tools.get(tool_name)
        if stable_tool is None:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"tool {name} has no served version now (its backend no longer offers it)",
            )
        stable = await self._store.ensure_unit(
            unit, stable_tool.spec.version, by="bootstrap", now=now
        )
        candidate_tool = versions.get(candidate)
        if candidate_tool is None:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"tool {name} has no published version {candidate} (approve the backend's "
                "contract as that version first)",
            )
        live = runtime.live.get(tool_name) if runtime.live is not None else None
        return Candidate(
            unit,
            stable,
            candidate_tool.spec.side_effect,
            stable_tool,
            candidate_tool,
            live.fingerprint() if live is not None else None,
        )

    async def _plan(
        self,
        request: router_pb2.StartReleaseRequest,
        unit: UnitKey,
        side_effect: SideEffect | None,
        context: aio.ServicerContext,
    ) -> Plan:
        refusal = shadow_refusal(unit, side_effect)
        default = PlanKind.CANARY_ONLY if refusal else PlanKind.SHADOW_THEN_CANARY
        plan = plan_from(request.plan, default)
        problems = plan.problems()
        if plan.kind is PlanKind.SHADOW_THEN_CANARY and refusal:
            problems.insert(0, ("plan.kind", f"{refusal}; use canary-only"))
        if problems:
            await abort_invalid(context, problems)
        return plan

    async def _gates(
        self,
        kind: UnitKind,
        request: router_pb2.StartReleaseRequest,
        resolved: Candidate,
        examples: list[Example],
    ) -> list[Check]:
        if kind is UnitKind.ROUTING:
            router = self._served.routers[request.candidate_version]
            lookup = self._served.lookup(request.caller.tenant, "")
            return [
                Check("rules", True, "compiled with RE2 and consistent with the registered tools"),
                gates.routing_examples_gate(router, router.rules.examples, lookup),
            ]
        if kind is UnitKind.PROMPT:
            return [Check("prompt", True, "published and checked against its kind")]
        stable, candidate = resolved.stable_tool, resolved.candidate_tool
        assert stable is not None and candidate is not None
        drift = (
            gates.builtin_drift_gate(candidate, load_lock())
            if candidate.origin is None
            else gates.backend_drift_gate(candidate, resolved.live_fingerprint)
        )
        context = ToolContext(
            tenant=resolved.unit.tenant or PLATFORM_TENANT,
            session_id="release-gate",
            request_id=f"release-gate-{uuid.uuid4().hex[:8]}",
            idempotency_key="",
            notes=self._notes,
        )
        return [
            gates.contract_gate(stable, candidate, allow_breaking=request.allow_breaking),
            drift,
            await gates.examples_gate(
                candidate, [*candidate.spec.examples, *examples], self._executor, context
            ),
        ]

    def _new_release(
        self,
        request: router_pb2.StartReleaseRequest,
        unit: UnitKey,
        stable: str,
        plan: Plan,
        checks: list[Check],
    ) -> Release:
        now = self._clock()
        failed = [c for c in checks if not c.passed]
        if failed:
            state, weight, step = State.REFUSED, 0, -1
        elif plan.kind is PlanKind.SHADOW_THEN_CANARY:
            state, weight, step = State.SHADOW, 0, -1
        else:
            state, weight, step = State.CANARY, plan.steps[0], 0
        refused = state is State.REFUSED
        return Release(
            id=uuid.uuid4().hex[:12],
            unit=unit,
            stable_version=stable,
            candidate_version=request.candidate_version,
            plan=plan,
            state=state,
            paused_state=None,
            weight=weight,
            step=step,
            failed_checks=0,
            passed_intervals=0,
            started_at=now,
            updated_at=now,
            stage_started_at=now,
            next_check_at=None if refused else now + plan_interval(plan),
            finished_at=now if refused else None,
            monitor_until=None,
            started_by=request.caller.subject,
            reason=(
                "; ".join(f"{c.name}: {c.detail}" for c in failed) if failed else request.reason
            ),
            gates=tuple(checks),
            last_analysis=None,
            revision=0,
            lease_owner="",
            lease_expires_at=None,
        )

    async def _audit_gates(self, release: Release, checks: list[Check]) -> None:
        if self._audit is None:
            return
        event = release_audit(
            audit_pb2.AUDIT_ACTION_RELEASE_GATE,
            release,
            ACTOR,
            _gate_detail(checks),
            checks={c.name: {"passed": c.passed, "detail": c.detail} for c in checks},
        )
        if release.state is State.REFUSED:
            event.outcome = "refused"
        await self._audit.record(event)

    # -- get and list ---------------------------------------------------------------------------

    def _visible(self, caller: common_pb2.Caller, release: Release) -> bool:
        return _platform(caller) or (bool(caller.tenant) and release.unit.tenant == caller.tenant)

    async def get(
        self, request: router_pb2.GetReleaseRequest, context: aio.ServicerContext
    ) -> router_pb2.Release:
        await self._owned(request.caller, request.id, context)
        found = await self._store.with_events(request.id)
        assert found is not None
        return release_message(*found)

    async def _owned(
        self, caller: common_pb2.Caller, release_id: str, context: aio.ServicerContext
    ) -> Release:
        problems = [] if caller.tenant else [("caller.tenant", "required")]
        if not 1 <= len(release_id) <= 32:
            problems.append(("id", "1 to 32 characters"))
        if problems:
            await abort_invalid(context, problems)
        release = await self._store.get(release_id)
        if release is None or not self._visible(caller, release):
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no release {release_id[:32]}")
        return release

    async def list(
        self, request: router_pb2.ListReleasesRequest, context: aio.ServicerContext
    ) -> list[router_pb2.Release]:
        caller = request.caller
        problems = [] if caller.tenant else [("caller.tenant", "required")]
        if not 0 <= request.limit <= MAX_LIMIT:
            problems.append(("limit", f"0 to {MAX_LIMIT}"))
        unit = None
        if request.unit.kind:
            kind = _KINDS.get(request.unit.kind)
            if kind is None:
                problems.append(("unit.kind", "one of TOOL, ROUTING or PROMPT"))
            else:
                unit = UnitKey(kind, request.unit.tenant, request.unit.name)
        if problems:
            await abort_invalid(context, problems)
        if unit is not None and unit.kind is UnitKind.TOOL and "." in unit.name:
            found = self._served.unit_of(caller.tenant, unit.name)
            unit = found or unit
        releases = await self._store.listing(
            tenants=None if _platform(caller) else [caller.tenant],
            unit=unit,
            active_only=request.active_only,
            limit=request.limit or DEFAULT_LIMIT,
        )
        return [release_message(r) for r in releases]

    # -- the operator's controls ----------------------------------------------------------------

    async def control(
        self, request: router_pb2.ControlReleaseRequest, context: aio.ServicerContext
    ) -> router_pb2.Release:
        action = request.action
        problems = []
        if action not in (
            router_pb2.RELEASE_CONTROL_PROMOTE,
            router_pb2.RELEASE_CONTROL_PAUSE,
            router_pb2.RELEASE_CONTROL_RESUME,
            router_pb2.RELEASE_CONTROL_ABORT,
        ):
            problems.append(("action", "one of PROMOTE, PAUSE, RESUME or ABORT"))
        if action == router_pb2.RELEASE_CONTROL_ABORT and not request.reason.strip():
            problems.append(("reason", "required to abort: say why"))
        if len(request.reason) > MAX_REASON_CHARS:
            problems.append(("reason", f"at most {MAX_REASON_CHARS} characters"))
        if problems:
            await abort_invalid(context, problems)
        # A platform-wide unit's release is visible (hence controllable) to platform:admin only.
        release = await self._owned(request.caller, request.id, context)
        for _ in range(_CONTROL_ATTEMPTS):
            step = await self._controlled(release, request, context)
            after, event, stable = step
            if await self._store.update(release, after, [event], stable=stable):
                count_transition(event.action, after)
                log.info(
                    "release controlled",
                    extra={
                        "release": release.id,
                        "action": event.action,
                        "by": request.caller.subject,
                        "state": after.state.value,
                    },
                )
                await self._view.refresh()
                if release.unit.kind is UnitKind.PROMPT:
                    self._prompts.forget()
                if after.state is State.SUCCEEDED and self._completed is not None:
                    await self._completed(after)
                return release_message(replace(after, revision=release.revision + 1))
            fresh = await self._store.get(release.id)
            assert fresh is not None
            release = fresh
        await abort(
            context,
            grpc.StatusCode.ABORTED,
            f"release {release.id} kept changing under the request; retry",
        )

    async def _controlled(
        self,
        release: Release,
        request: router_pb2.ControlReleaseRequest,
        context: aio.ServicerContext,
    ) -> tuple[Release, Event, tuple[str, str] | None]:
        """The release after the operator's action, the event, and the new stable versions."""
        now, who, why = self._clock(), request.caller.subject, request.reason.strip()
        state = release.state
        said = f": {why}" if why else ""
        action = request.action
        if action == router_pb2.RELEASE_CONTROL_PROMOTE:
            if state in (State.SHADOW, State.CANARY, State.PAUSED):
                step = analysis.promote(release, now, actor_detail=f"promoted by {who}{said}")
                return step.release, Event(now, "promote", who, step.detail), step.stable
            if state is State.MONITORING:
                step = analysis.complete(release, now)
                return step.release, Event(now, "complete", who, step.detail + said), step.stable
        elif action == router_pb2.RELEASE_CONTROL_PAUSE:
            if state in (State.SHADOW, State.CANARY):
                paused = replace(
                    release, state=State.PAUSED, paused_state=state, updated_at=now, reason=why
                )
                detail = f"paused by {who} at {release.weight}%{said}"
                return paused, Event(now, "pause", who, detail), None
        elif action == router_pb2.RELEASE_CONTROL_RESUME:
            if state is State.PAUSED and release.paused_state is not None:
                resumed = replace(
                    release,
                    state=release.paused_state,
                    paused_state=None,
                    updated_at=now,
                    stage_started_at=now,
                    next_check_at=now + plan_interval(release.plan),
                    reason="",
                )
                detail = f"resumed by {who} at {release.weight}%{said}"
                return resumed, Event(now, "resume", who, detail), None
        elif action == router_pb2.RELEASE_CONTROL_ABORT and release.active:
            aborted = replace(
                release,
                state=State.ABORTED,
                paused_state=None,
                weight=0,
                updated_at=now,
                finished_at=now,
                next_check_at=None,
                monitor_until=None,
                reason=f"aborted by {who}: {why}",
            )
            back = release.stable_version
            stable = (back, "") if state is State.MONITORING else None
            detail = f"aborted by {who}: {why}; all traffic to {back}"
            return aborted, Event(now, "abort", who, detail), stable
        name = router_pb2.ReleaseControl.Name(action).removeprefix("RELEASE_CONTROL_").lower()
        await abort(
            context,
            grpc.StatusCode.FAILED_PRECONDITION,
            f"release {release.id} is {state.value}: it cannot be {_PAST.get(name, name)}",
        )


_PAST = {"promote": "promoted", "pause": "paused", "resume": "resumed", "abort": "aborted"}


def plan_interval(plan: Plan) -> timedelta:
    return timedelta(seconds=plan.interval_s)


def _start_detail(release: Release, request: router_pb2.StartReleaseRequest) -> str:
    plan = release.plan
    shape = (
        f"steps {', '.join(f'{s}%' for s in plan.steps)} every {plan.interval_s:g} s, "
        f"threshold {plan.threshold}"
    )
    why = f"; {request.reason}" if request.reason else ""
    return (
        f"{release.candidate_version} against stable {release.stable_version}, plan "
        f"{plan.kind.value} ({shape}){why}"
    )


def _gate_detail(checks: list[Check]) -> str:
    return "; ".join(f"{c.name} {'passed' if c.passed else 'REFUSED'}: {c.detail}" for c in checks)
