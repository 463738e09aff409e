"""The judgement of one interval and what follows from it (pure functions, injected times),
the compatibility rule, and the sticky assignment."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from jsonschema import Draft202012Validator
from opentelemetry import trace

from services.kit import breaker
from services.kit.breaker import BreakerConfig, BreakerRegistry
from services.router.catalog import CALCULATOR, CALCULATOR_1_1, UNIT_CONVERT, UNIT_CONVERT_1_1
from services.router.compat import breaking_changes, narrowed
from services.router.invoke import Executor, ToolRunError
from services.router.registry import SideEffect, Tool, ToolContext, ToolOrigin, ToolSpec
from services.router.releases import analysis
from services.router.releases.model import (
    Analysis,
    Figures,
    Plan,
    PlanKind,
    Release,
    ShadowTally,
    State,
    UnitKey,
    UnitKind,
    on_candidate,
)

T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
UNIT = UnitKey(UnitKind.TOOL, "", "echo_word")
PLAN = Plan(steps=(10, 50, 100), interval_s=1.0, threshold=2, shadow_intervals=2, monitor_s=5)


def release(state: State = State.SHADOW, **changes: object) -> Release:
    base = Release(
        id="r1",
        unit=UNIT,
        stable_version="1.0.0",
        candidate_version="1.1.0",
        plan=PLAN,
        state=state,
        paused_state=None,
        weight=0,
        step=-1,
        failed_checks=0,
        passed_intervals=0,
        started_at=T0,
        updated_at=T0,
        stage_started_at=T0,
        next_check_at=T0 + timedelta(seconds=1),
        finished_at=None,
        monitor_until=None,
        started_by="op",
        reason="",
        gates=(),
        last_analysis=None,
        revision=0,
        lease_owner="",
        lease_expires_at=None,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def figures(version: str, requests: int, errors: int = 0, p95: float = 10.0) -> Figures:
    return Figures(
        version=version,
        source="traffic",
        requests=requests,
        errors=errors,
        p95_ms=p95,
        window_start=T0,
        window_end=T0,
        error_burn_rate=(errors / requests / 0.005) if requests else 0.0,
    )


def judged(state: State, outcome: str, weight: int = 0) -> Analysis:
    return Analysis(T0, state, weight, outcome, (), ())


def test_a_good_candidate_goes_shadow_then_every_step_then_promoted_then_completed() -> None:
    current = release()
    actions = []
    now = T0
    for _ in range(2 + 3):
        now += timedelta(seconds=1)
        step = analysis.decide(current, judged(current.state, analysis.PASSED), now)
        actions.append((step.action, step.release.state, step.release.weight))
        current = step.release
    assert actions == [
        ("check", State.SHADOW, 0),
        ("step", State.CANARY, 10),
        ("step", State.CANARY, 50),
        ("step", State.CANARY, 100),
        ("promote", State.MONITORING, 100),
    ]
    assert current.monitor_until == now + timedelta(seconds=5)
    # The promotion made the candidate stable, the old one kept as the previous version.
    promoted = analysis.decide(
        replace(current, state=State.CANARY, step=2), judged(State.CANARY, "passed"), now
    )
    assert promoted.stable == ("1.1.0", "1.0.0")
    # Monitoring without a breach until the window ends: complete, the previous let go.
    early = analysis.decide(current, judged(State.MONITORING, "passed"), now)
    assert early.action == "check" and early.release.state is State.MONITORING
    done = analysis.decide(current, judged(State.MONITORING, "waiting"), now + timedelta(seconds=5))
    assert (done.action, done.release.state, done.stable) == (
        "complete",
        State.SUCCEEDED,
        ("1.1.0", ""),
    )


def test_failed_analyses_roll_back_at_the_threshold_and_never_reset() -> None:
    """Flagger's threshold: failed checks before rollback; a pass in between halts nothing."""
    current = release(State.CANARY, weight=10, step=0)
    first = analysis.decide(current, judged(State.CANARY, analysis.FAILED, 10), T0)
    assert (first.action, first.release.failed_checks, first.release.weight) == ("check", 1, 10)
    passed = analysis.decide(first.release, judged(State.CANARY, analysis.PASSED, 10), T0)
    assert passed.release.failed_checks == 1 and passed.release.weight == 50
    second = analysis.decide(passed.release, judged(State.CANARY, analysis.FAILED, 50), T0)
    assert (second.action, second.release.state, second.release.weight) == (
        "rollback",
        State.ROLLED_BACK,
        0,
    )
    assert second.release.finished_at == T0 and second.stable is None
    assert "2 failed analyses (threshold 2)" in second.release.reason


def test_too_few_samples_wait_neither_advancing_nor_failing() -> None:
    current = release(State.CANARY, weight=10, step=0)
    step = analysis.decide(current, judged(State.CANARY, analysis.WAITING, 10), T0)
    assert (step.action, step.release.weight, step.release.failed_checks) == ("check", 10, 0)
    assert step.release.next_check_at == T0 + timedelta(seconds=1)


def test_a_breach_after_promotion_rolls_back_to_the_previous_version() -> None:
    current = release(
        State.MONITORING,
        weight=100,
        step=2,
        monitor_until=T0 + timedelta(seconds=60),
        failed_checks=1,
    )
    step = analysis.decide(current, judged(State.MONITORING, analysis.FAILED), T0)
    assert (step.action, step.release.state, step.stable) == ("fail", State.FAILED, ("1.0.0", ""))
    assert "the SLO was breached after promotion" in step.release.reason


def test_canary_checks_compare_the_candidate_with_the_stable_version() -> None:
    plan = replace(PLAN, min_requests=20)
    stable = figures("1.0.0", 200, errors=2, p95=40.0)
    good = figures("1.1.0", 40, errors=0, p95=45.0)
    outcome, checks = analysis.judge_canary(plan, UnitKind.TOOL, stable, good)
    assert outcome == analysis.PASSED and all(c.passed for c in checks)
    failing = figures("1.2.0", 40, errors=8, p95=45.0)
    outcome, checks = analysis.judge_canary(plan, UnitKind.TOOL, stable, failing)
    failed = {c.name for c in checks if not c.passed}
    assert outcome == analysis.FAILED and failed == {"error_rate", "burn_rate"}
    slow = figures("1.3.0", 40, p95=245.0)
    outcome, checks = analysis.judge_canary(plan, UnitKind.TOOL, stable, slow)
    p95 = next(c for c in checks if c.name == "p95_latency")
    assert outcome == analysis.FAILED and not p95.passed and p95.limit == 40 * 1.25 + 20
    few = figures("1.1.0", 19)
    assert analysis.judge_canary(plan, UnitKind.TOOL, stable, few)[0] == analysis.WAITING


def test_shadow_checks_agreement_errors_and_latency() -> None:
    plan = replace(PLAN, min_requests=10)
    tally = ShadowTally()
    for i in range(20):
        tally.add(
            agreed=i != 0,
            stable_error=False,
            candidate_error=False,
            stable_ms=8.0,
            candidate_ms=9.0,
        )
    stable, candidate = analysis.shadow_figures(release(), tally, T0, T0)
    assert candidate.agreement == pytest.approx(0.95)
    outcome, checks = analysis.judge_shadow(plan, stable, candidate)
    assert outcome == analysis.FAILED
    assert [c.name for c in checks if not c.passed] == ["shadow_agreement"]
    lenient = replace(plan, min_agreement=0.9)
    assert analysis.judge_shadow(lenient, stable, candidate)[0] == analysis.PASSED


def test_the_assignment_is_sticky_and_monotonic_in_the_weight() -> None:
    sessions = [f"s{i}" for i in range(2000)]
    at_10 = {s for s in sessions if on_candidate(UNIT, "1.1.0", 10, "acme", s)}
    at_50 = {s for s in sessions if on_candidate(UNIT, "1.1.0", 50, "acme", s)}
    assert 150 < len(at_10) < 250 and 900 < len(at_50) < 1100
    # Raising the weight only adds sessions: none that reached the candidate leaves it.
    assert at_10 <= at_50
    # The same (tenant, session) is assigned alike every time (every replica computes it).
    assert at_10 == {s for s in sessions if on_candidate(UNIT, "1.1.0", 10, "acme", s)}
    # Another candidate samples other sessions.
    other = {s for s in sessions if on_candidate(UNIT, "1.2.0", 10, "acme", s)}
    assert other != at_10
    assert not on_candidate(UNIT, "1.1.0", 0, "acme", "s1")
    assert on_candidate(UNIT, "1.1.0", 100, "acme", "s1")
    spread = Counter(on_candidate(UNIT, "1.1.0", 25, t, "s") for t in map(str, range(4000)))
    assert 900 < spread[True] < 1100


def _spec(**changes: object) -> ToolSpec:
    return replace(CALCULATOR_1_1, **changes)  # type: ignore[arg-type]


def breaks(old: ToolSpec, new: ToolSpec) -> list[str]:
    return breaking_changes(
        old_input=old.input_schema,
        new_input=new.input_schema,
        old_output=old.output_schema,
        new_output=new.output_schema,
        old_side_effect=old.side_effect.value,
        new_side_effect=new.side_effect.value,
    )


def test_the_compatibility_rule() -> None:
    # calculator 1.1.0 only dropped its input pattern: accepts more, promises the same.
    assert breaks(CALCULATOR, CALCULATOR_1_1) == []
    assert breaks(CALCULATOR_1_1, CALCULATOR) == ["it narrows input 'expression'"]
    # unit_convert 1.1.0 returns text where 1.0.0 returned numbers.
    assert breaks(UNIT_CONVERT, UNIT_CONVERT_1_1) == [
        "it changes what result property 'value' may hold",
        "it changes what result property 'result' may hold",
    ]
    base = CALCULATOR_1_1
    required = {
        **base.input_schema,
        "properties": {**base.input_schema["properties"], "base": {"type": "integer"}},
        "required": ["expression", "base"],
    }
    assert breaks(base, _spec(input_schema=required)) == ["it adds required input 'base'"]
    assert breaks(base, _spec(side_effect=SideEffect.WRITE)) == [
        "its side effect changed (read_only -> write)"
    ]
    fewer_out = {**base.output_schema, "required": ["expression", "value"]}
    assert breaks(base, _spec(output_schema=fewer_out)) == ["it no longer always returns 'exact'"]
    # Relaxations the rule can see: a larger maximum, a wider type or enum.
    assert not narrowed({"type": "string", "maxLength": 5}, {"type": "string", "maxLength": 9})
    assert narrowed({"type": "string", "maxLength": 9}, {"type": "string", "maxLength": 5})
    assert not narrowed({"type": "integer"}, {"type": "number"})
    assert not narrowed({"enum": ["a"]}, {"enum": ["a", "b"]})
    assert narrowed({"enum": ["a", "b"]}, {"enum": ["a"]})
    # A string constraint added beside a new string type narrows no number.
    assert not narrowed({"type": "number"}, {"type": ["number", "string"], "minLength": 1})
    assert narrowed({"type": "string"}, {"type": "string", "pattern": "^a"})


def test_plan_limits_name_the_field() -> None:
    assert Plan().problems() == []
    bad = Plan(steps=(50, 25), interval_s=0.01, threshold=0, kind=PlanKind.CANARY_ONLY)
    assert [field for field, _ in bad.problems()] == [
        "plan.steps",
        "plan.interval_seconds",
        "plan.threshold",
    ]
    assert Plan.from_json(PLAN.to_json()) == PLAN


async def test_a_shadow_copy_never_moves_the_backend_breaker_live_calls_share() -> None:
    """A failing candidate's copies open its own (per-version) breaker, not the backend's."""

    async def broken(_arguments: dict[str, object], _ctx: ToolContext) -> object:
        raise RuntimeError("candidate bug")

    spec = replace(CALCULATOR_1_1, name="files_read", version="2.0.0", examples=())
    tool = Tool(
        spec=spec,
        run=broken,  # type: ignore[arg-type]
        input_validator=Draft202012Validator(spec.input_schema),
        output_validator=Draft202012Validator(spec.output_schema),
        origin=ToolOrigin(backend="files", kind="grpc", tenant="acme", fingerprint="f" * 64),
    )
    breakers = BreakerRegistry(BreakerConfig(window_size=4, minimum_calls=2, open_wait_s=60))
    executor = Executor(max_result_bytes=4096, tracer=trace.get_tracer("test"), breakers=breakers)
    ctx = ToolContext("acme", "s", "r", "", None)  # type: ignore[arg-type]
    for _ in range(4):
        with pytest.raises(ToolRunError):
            await executor.run(tool, {"expression": "1"}, ctx, 1.0, shadow=True)
    assert breakers.get("backend:acme/files").state is breaker.State.CLOSED
    assert breakers.get(f"tool:{tool.limit_key}").state is breaker.State.OPEN
