"""The circuit breaker's state machine, driven by a hand-moved clock."""

from __future__ import annotations

import gc
import uuid

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from services.kit.breaker import (
    BreakerConfig,
    BreakerOpen,
    BreakerRegistry,
    CircuitBreaker,
    State,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


CONFIG = BreakerConfig(
    window_size=10,
    minimum_calls=4,
    failure_rate_threshold=0.5,
    slow_call_rate_threshold=0.75,
    slow_call_s=1.0,
    open_wait_s=5.0,
    half_open_calls=2,
)


def _call(breaker: CircuitBreaker, ok: bool, duration: float = 0.01) -> None:
    breaker.acquire()
    breaker.record(ok, duration)


def test_stays_closed_below_minimum_calls() -> None:
    breaker = CircuitBreaker("dep", CONFIG, Clock())
    for _ in range(3):
        _call(breaker, ok=False)
    assert breaker.state is State.CLOSED


def test_opens_on_failure_rate_and_fails_fast() -> None:
    clock = Clock()
    breaker = CircuitBreaker("dep", CONFIG, clock)
    for ok in (True, False, True, False):
        _call(breaker, ok)
    assert breaker.state is State.OPEN
    with pytest.raises(BreakerOpen) as refused:
        breaker.acquire()
    assert refused.value.retry_after_s == pytest.approx(5.0)


def test_opens_on_slow_call_rate() -> None:
    breaker = CircuitBreaker("dep", CONFIG, Clock())
    for _ in range(4):
        _call(breaker, ok=True, duration=1.5)
    assert breaker.state is State.OPEN


def test_half_open_lets_a_few_trials_through_and_closes_on_success() -> None:
    clock = Clock()
    breaker = CircuitBreaker("dep", CONFIG, clock)
    for _ in range(4):
        _call(breaker, ok=False)
    clock.now += 5.0
    assert breaker.state is State.HALF_OPEN
    breaker.acquire()
    breaker.acquire()
    with pytest.raises(BreakerOpen):
        breaker.acquire()  # only two trial calls
    breaker.record(True, 0.01)
    breaker.record(True, 0.01)
    assert breaker.state is State.CLOSED
    assert breaker.transitions == [
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
    ]


def test_a_failed_trial_opens_again() -> None:
    clock = Clock()
    breaker = CircuitBreaker("dep", CONFIG, clock)
    for _ in range(4):
        _call(breaker, ok=False)
    clock.now += 5.0
    _call(breaker, ok=False)
    assert breaker.state is State.OPEN
    clock.now += 4.9
    assert breaker.state is State.OPEN
    clock.now += 0.1
    assert breaker.state is State.HALF_OPEN


def test_a_dependency_seen_healthy_gets_its_trials_before_the_open_wait_ends() -> None:
    clock = Clock()
    breaker = CircuitBreaker("dep", CONFIG, clock)
    assert not breaker.half_open_early()  # closed: nothing to do
    assert breaker.state is State.CLOSED
    for _ in range(4):
        _call(breaker, ok=False)
    clock.now += 1.0
    assert breaker.half_open_early()
    breaker.acquire()
    breaker.record(True, 0.01)
    breaker.acquire()
    breaker.record(True, 0.01)
    assert breaker.state is State.CLOSED


def test_window_slides_so_old_failures_are_forgotten() -> None:
    breaker = CircuitBreaker("dep", CONFIG, Clock())
    for ok in [True] * 6 + [False] * 2 + [True] * 10:
        _call(breaker, ok)
    # The two early failures slid out of the 10-call window.
    for _ in range(4):
        _call(breaker, ok=False)
    assert breaker.state is State.CLOSED  # 4 of the last 10 failed; 6 would have opened it
    _call(breaker, ok=False)
    assert breaker.state is State.OPEN  # 5 of 10


def test_a_call_from_before_a_state_change_does_not_count() -> None:
    clock = Clock()
    breaker = CircuitBreaker("dep", CONFIG, clock)
    stale = breaker.acquire()
    for _ in range(4):
        _call(breaker, ok=False)
    clock.now += 5.0
    assert breaker.state is State.HALF_OPEN
    trial = breaker.acquire()
    breaker.record(False, 0.01, stale)  # the old call's failure must not reopen it
    assert breaker.state is State.HALF_OPEN
    breaker.record(True, 0.01, trial)
    breaker.record(True, 0.01, breaker.acquire())
    assert breaker.state is State.CLOSED


def test_release_frees_a_half_open_trial_without_counting() -> None:
    clock = Clock()
    breaker = CircuitBreaker("dep", CONFIG, clock)
    for _ in range(4):
        _call(breaker, ok=False)
    clock.now += 5.0
    first = breaker.acquire()
    breaker.acquire()
    breaker.release(first)  # the caller's own error: neither success nor failure
    third = breaker.acquire()  # the freed slot can be used
    assert breaker.state is State.HALF_OPEN
    breaker.record(True, 0.01, third)


def test_a_registrys_breakers_run_on_its_clock() -> None:
    clock = Clock()
    breaker = BreakerRegistry(CONFIG, clock).get("dep")
    for _ in range(4):
        _call(breaker, ok=False)
    assert breaker.state is State.OPEN
    clock.now += 5.0
    assert breaker.state is State.HALF_OPEN


def _reported(reader: InMemoryMetricReader) -> set[str]:
    data = reader.get_metrics_data()
    return {
        str(point.attributes["breaker"])
        for resource in (data.resource_metrics if data else [])
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "toolmesh.breaker.state"
        for point in metric.data.data_points
        if point.attributes
    }


def test_the_state_gauge_forgets_the_breakers_of_a_registry_gone(
    metric_reader: InMemoryMetricReader,
) -> None:
    """A process that builds several servers (as the tests do) reports only the live ones."""
    name = f"dep-{uuid.uuid4().hex}"
    registry = BreakerRegistry(CONFIG)
    registry.get(name)
    assert name in _reported(metric_reader)
    del registry
    gc.collect()
    assert name not in _reported(metric_reader)
