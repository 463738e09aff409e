"""One interval's judgement of a release, and what follows from it (pure functions).

Each interval the candidate is judged on its own figures against the stable version's:

- shadow: agreement of the copied calls' results, their error rate and p95 against the
  stable calls they copied;
- canary: the candidate's error rate and p95 against the stable version's over the same
  window (this step's, side by side under the same load; telemetry's per-request records),
  the burn rates of its error and latency budgets against the unit's SLO (what still judges
  the final step, where the stable version serves nobody), and for routing rules the share
  of prompts left without a tool;
- monitoring (after promotion): the unit's SLO, both burn rates (availability and latency).

Too few samples (``min_requests``) is "waiting": neither advances nor counts as failed, so a
rarely used unit waits for evidence instead of being judged on noise. A failed analysis
counts; when the count reaches ``threshold`` (Flagger's semantics: failed checks before
rollback, never reset by a later pass) the release rolls back. A passed analysis advances one
stage or step; a passed final step promotes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from services.router.releases.model import (
    Analysis,
    Check,
    Figures,
    Plan,
    Release,
    ShadowTally,
    State,
    UnitKind,
)

PASSED = "passed"
FAILED = "failed"
WAITING = "waiting"


def _outcome(checks: list[Check]) -> str:
    return PASSED if all(c.passed for c in checks) else FAILED


def shadow_figures(
    release: Release, tally: ShadowTally, start: datetime, end: datetime
) -> tuple[Figures, Figures]:
    """The stable calls copied and the candidate's copies, as two versions' figures."""
    agreement = tally.agreed / tally.compared if tally.compared else 0.0
    stable = Figures(
        version=release.stable_version,
        source="shadow",
        requests=tally.compared,
        errors=tally.stable_errors,
        p95_ms=ShadowTally.p95(tally.stable_hist),
        window_start=start,
        window_end=end,
    )
    candidate = Figures(
        version=release.candidate_version,
        source="shadow",
        requests=tally.compared,
        errors=tally.candidate_errors,
        p95_ms=ShadowTally.p95(tally.candidate_hist),
        window_start=start,
        window_end=end,
        agreement=agreement,
    )
    return stable, candidate


def _error_rate(plan: Plan, stable: Figures, candidate: Figures, *, shadow: bool) -> Check:
    base = stable.error_rate if stable.requests >= plan.min_requests or shadow else 0.0
    limit = base + plan.max_error_rate_increase
    return Check(
        "shadow_error_rate" if shadow else "error_rate",
        candidate.error_rate <= limit,
        f"candidate {candidate.error_rate:.2%} of {candidate.requests} calls failed, stable "
        f"{stable.error_rate:.2%} of {stable.requests}; allowed up to {limit:.2%}",
        candidate.error_rate,
        limit,
    )


def _p95(plan: Plan, stable: Figures, candidate: Figures, *, shadow: bool) -> Check:
    name = "shadow_p95_latency" if shadow else "p95_latency"
    if stable.requests < plan.min_requests and not shadow:
        return Check(
            name,
            True,
            f"candidate p95 {candidate.p95_ms:.1f} ms; stable has too few calls "
            f"({stable.requests}) to compare with",
            candidate.p95_ms,
            0.0,
        )
    limit = stable.p95_ms * plan.max_p95_ratio + plan.p95_slack_ms
    return Check(
        name,
        candidate.p95_ms <= limit,
        f"candidate p95 {candidate.p95_ms:.1f} ms, stable {stable.p95_ms:.1f} ms; allowed up "
        f"to {limit:.1f} ms ({plan.max_p95_ratio:g} x stable + {plan.p95_slack_ms:g} ms)",
        candidate.p95_ms,
        limit,
    )


def _burn(name: str, plan: Plan, figures: Figures, rate: float, what: str) -> Check:
    return Check(
        name,
        rate <= plan.max_burn_rate,
        f"{figures.version} burns its {what} budget {rate:.2f}x over {figures.requests} "
        f"requests; allowed up to {plan.max_burn_rate:g}x",
        rate,
        plan.max_burn_rate,
    )


def judge_shadow(plan: Plan, stable: Figures, candidate: Figures) -> tuple[str, list[Check]]:
    if candidate.requests < plan.min_requests:
        return WAITING, [
            Check(
                "samples",
                True,
                f"{candidate.requests} shadow comparisons of the {plan.min_requests} needed",
                candidate.requests,
                plan.min_requests,
            )
        ]
    checks = [
        Check(
            "shadow_agreement",
            candidate.agreement >= plan.min_agreement,
            f"{candidate.agreement:.2%} of {candidate.requests} copied calls gave the stable "
            f"version's result; at least {plan.min_agreement:.2%} needed",
            candidate.agreement,
            plan.min_agreement,
        ),
        _error_rate(plan, stable, candidate, shadow=True),
        _p95(plan, stable, candidate, shadow=True),
    ]
    return _outcome(checks), checks


def judge_canary(
    plan: Plan, kind: UnitKind, stable: Figures, candidate: Figures
) -> tuple[str, list[Check]]:
    if candidate.requests < plan.min_requests:
        return WAITING, [
            Check(
                "samples",
                True,
                f"{candidate.requests} candidate requests of the {plan.min_requests} needed",
                candidate.requests,
                plan.min_requests,
            )
        ]
    checks = [
        _error_rate(plan, stable, candidate, shadow=False),
        _p95(plan, stable, candidate, shadow=False),
        _burn("burn_rate", plan, candidate, candidate.error_burn_rate, "error"),
        _burn("latency_burn_rate", plan, candidate, candidate.latency_burn_rate, "latency"),
    ]
    if kind is UnitKind.ROUTING:
        base = stable.no_match_rate if stable.requests >= plan.min_requests else 0.0
        limit = base + plan.max_error_rate_increase
        checks.append(
            Check(
                "no_match_rate",
                candidate.no_match_rate <= limit,
                f"candidate left {candidate.no_match_rate:.2%} of prompts without a tool, "
                f"stable {stable.no_match_rate:.2%}; allowed up to {limit:.2%}",
                candidate.no_match_rate,
                limit,
            )
        )
    return _outcome(checks), checks


def judge_monitoring(plan: Plan, current: Figures) -> tuple[str, list[Check]]:
    if current.requests < plan.min_requests:
        return WAITING, [
            Check(
                "samples",
                True,
                f"{current.requests} requests since promotion of the {plan.min_requests} needed",
                current.requests,
                plan.min_requests,
            )
        ]
    checks = [
        _burn("slo_availability", plan, current, current.error_burn_rate, "error"),
        _burn("slo_latency", plan, current, current.latency_burn_rate, "latency"),
    ]
    return _outcome(checks), checks


@dataclass(frozen=True)
class Step:
    """What an analysis leads to: the release as it becomes, the event to record (and audit),
    and the unit's new (stable, previous) versions when they change."""

    release: Release
    action: str
    detail: str
    stable: tuple[str, str] | None = None


def _failed_names(analysis: Analysis) -> str:
    return ", ".join(f"{c.name} ({c.detail})" for c in analysis.failed_checks())


def decide(release: Release, analysis: Analysis, now: datetime) -> Step:
    """The release after ``analysis`` at ``now``."""
    plan = release.plan
    stage = release.state
    next_check = now + timedelta(seconds=plan.interval_s)
    base = replace(release, updated_at=now, next_check_at=next_check, last_analysis=analysis)
    if stage is State.MONITORING:
        return _decide_monitoring(base, analysis, now)
    if analysis.outcome == FAILED:
        failed = release.failed_checks + 1
        if failed >= plan.threshold:
            reason = f"{failed} failed analyses (threshold {plan.threshold}): " + _failed_names(
                analysis
            )
            return Step(
                replace(
                    base,
                    state=State.ROLLED_BACK,
                    weight=0,
                    failed_checks=failed,
                    finished_at=now,
                    next_check_at=None,
                    reason=reason,
                ),
                "rollback",
                reason,
            )
        return Step(
            replace(base, failed_checks=failed),
            "check",
            f"failed analysis {failed} of {plan.threshold}: {_failed_names(analysis)}",
        )
    if analysis.outcome == WAITING:
        return Step(base, "check", analysis.checks[0].detail if analysis.checks else "waiting")
    if stage is State.SHADOW:
        passed = release.passed_intervals + 1
        if passed < plan.shadow_intervals:
            return Step(
                replace(base, passed_intervals=passed),
                "check",
                f"shadow analysis passed ({passed} of {plan.shadow_intervals})",
            )
        first = plan.steps[0]
        return Step(
            replace(
                base,
                state=State.CANARY,
                step=0,
                weight=first,
                passed_intervals=passed,
                stage_started_at=now,
            ),
            "step",
            f"shadow passed {passed} analyses: canary at {first}%",
        )
    if release.step + 1 < len(plan.steps):
        weight = plan.steps[release.step + 1]
        return Step(
            replace(base, step=release.step + 1, weight=weight, stage_started_at=now),
            "step",
            f"canary step {release.step + 1} passed at {release.weight}%: now {weight}%",
        )
    return promote(base, now, actor_detail=f"the final step ({release.weight}%) passed")


def promote(release: Release, now: datetime, *, actor_detail: str) -> Step:
    """The candidate becomes stable; the previous version stays ready while monitored."""
    plan = release.plan
    monitored = plan.monitor_s > 0
    promoted = replace(
        release,
        state=State.MONITORING if monitored else State.SUCCEEDED,
        paused_state=None,
        weight=100,
        failed_checks=0,
        stage_started_at=now,
        updated_at=now,
        monitor_until=now + timedelta(seconds=plan.monitor_s) if monitored else None,
        next_check_at=now + timedelta(seconds=plan.interval_s) if monitored else None,
        finished_at=None if monitored else now,
    )
    watch = f"; the SLO is watched until {promoted.monitor_until:%H:%M:%S}" if monitored else ""
    return Step(
        promoted,
        "promote",
        f"{release.candidate_version} promoted: {actor_detail}{watch}",
        stable=(release.candidate_version, release.stable_version),
    )


def _decide_monitoring(base: Release, analysis: Analysis, now: datetime) -> Step:
    plan = base.plan
    if analysis.outcome == FAILED:
        failed = base.failed_checks + 1
        if failed >= plan.threshold:
            reason = (
                f"the SLO was breached after promotion ({failed} failed analyses, threshold "
                f"{plan.threshold}): {_failed_names(analysis)}; back to {base.stable_version}"
            )
            return Step(
                replace(
                    base,
                    state=State.FAILED,
                    weight=0,
                    failed_checks=failed,
                    finished_at=now,
                    next_check_at=None,
                    monitor_until=None,
                    reason=reason,
                ),
                "fail",
                reason,
                stable=(base.stable_version, ""),
            )
        return Step(
            replace(base, failed_checks=failed),
            "check",
            f"failed analysis {failed} of {plan.threshold} after promotion: "
            + _failed_names(analysis),
        )
    if base.monitor_until is not None and now >= base.monitor_until:
        return complete(base, now)
    return Step(base, "check", f"monitoring: {analysis.outcome}")


def complete(release: Release, now: datetime) -> Step:
    """Monitoring is over: the release succeeded and the previous version is let go."""
    done = replace(
        release,
        state=State.SUCCEEDED,
        updated_at=now,
        finished_at=now,
        next_check_at=None,
        monitor_until=None,
    )
    return Step(
        done,
        "complete",
        f"{release.candidate_version} stayed within its SLO; {release.stable_version} let go",
        stable=(release.candidate_version, ""),
    )
