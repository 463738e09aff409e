"""The per-tool circuit breaker, driven by a fake clock."""

from __future__ import annotations

import pytest

from services.router.breaker import Breaker, BreakerPolicy, CircuitOpenError, Outcome, State

POLICY = BreakerPolicy(window=4, min_calls=4, failure_rate=0.5, open_s=10, half_open_calls=2)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run(breaker: Breaker, *outcomes: Outcome) -> None:
    for outcome in outcomes:
        breaker.record(breaker.acquire(), outcome)


S, F, IG = Outcome.SUCCESS, Outcome.FAILURE, Outcome.IGNORED


def test_opens_at_the_failure_rate_once_enough_calls_are_known() -> None:
    breaker = Breaker(POLICY, Clock())
    run(breaker, F, F, S)
    assert breaker.state is State.CLOSED  # only three calls known
    run(breaker, S)
    assert breaker.state is State.OPEN


def test_a_sliding_window_forgets_old_failures() -> None:
    breaker = Breaker(POLICY, Clock())
    run(breaker, F, S, S, S, S, F, S, S)
    assert breaker.state is State.CLOSED


def test_ignored_outcomes_count_neither_way() -> None:
    breaker = Breaker(POLICY, Clock())
    run(breaker, F, IG, IG, IG, IG, S, S)
    assert breaker.state is State.CLOSED


def test_open_refuses_then_half_open_trials_close_it() -> None:
    clock = Clock()
    breaker = Breaker(POLICY, clock)
    run(breaker, F, F, F, F)
    with pytest.raises(CircuitOpenError) as refused:
        breaker.acquire()
    assert refused.value.retry_after_s == pytest.approx(10)
    clock.now += 10
    first, second = breaker.acquire(), breaker.acquire()
    assert breaker.state is State.HALF_OPEN
    with pytest.raises(CircuitOpenError):
        breaker.acquire()  # only two trial calls at a time
    breaker.record(first, S)
    breaker.record(second, S)
    assert breaker.state is State.CLOSED


def test_a_failed_trial_opens_it_again() -> None:
    clock = Clock()
    breaker = Breaker(POLICY, clock)
    run(breaker, F, F, F, F)
    clock.now += 10
    run(breaker, S, F)
    assert breaker.state is State.OPEN
    with pytest.raises(CircuitOpenError):
        breaker.acquire()


def test_an_ignored_trial_frees_its_place() -> None:
    clock = Clock()
    breaker = Breaker(POLICY, clock)
    run(breaker, F, F, F, F)
    clock.now += 10
    run(breaker, IG, S, S)
    assert breaker.state is State.CLOSED


def test_calls_admitted_before_a_state_change_do_not_count_after_it() -> None:
    clock = Clock()
    breaker = Breaker(POLICY, clock)
    stale = breaker.acquire()
    run(breaker, F, F, F, F)
    clock.now += 10
    trial = breaker.acquire()
    breaker.record(stale, F)  # finished late: must not reopen the half-open circuit
    assert breaker.state is State.HALF_OPEN
    breaker.record(trial, S)
    run(breaker, S)
    assert breaker.state is State.CLOSED
