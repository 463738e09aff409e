"""A circuit breaker per tool version: a failing tool is refused at once instead of awaited.

Count-based sliding window as in resilience4j: closed -> open when at least ``min_calls`` of the
last ``window`` calls are known and their failure rate reaches ``failure_rate``; open refuses
calls for ``open_s`` seconds; then half-open lets ``half_open_calls`` trial calls through: all
succeed -> closed, any fails -> open again. Calls refused for their own arguments count neither
way. The pybreaker family counts consecutive failures only, hence this small class.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum


class Outcome(Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    # The call says nothing about the tool's health (bad arguments, caller cancelled).
    IGNORED = "ignored"


class State(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerPolicy:
    window: int = 20
    min_calls: int = 10
    failure_rate: float = 0.5
    open_s: float = 10.0
    half_open_calls: int = 3


class CircuitOpenError(Exception):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"circuit open; retry in {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


class Breaker:
    def __init__(
        self, policy: BreakerPolicy, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._state = State.CLOSED
        self._results: deque[bool] = deque(maxlen=policy.window)
        self._opened_at = 0.0
        self._trials = 0
        self._trial_successes = 0
        # Bumped on every state change, so a call admitted before one is not counted after it.
        self._generation = 0

    @property
    def state(self) -> State:
        return self._state

    def acquire(self) -> int:
        """A permit for one call, or CircuitOpenError; give the permit back to ``record``."""
        if self._state is State.OPEN:
            waited = self._clock() - self._opened_at
            if waited < self._policy.open_s:
                raise CircuitOpenError(self._policy.open_s - waited)
            self._change(State.HALF_OPEN)
            self._trials = self._trial_successes = 0
        if self._state is State.HALF_OPEN:
            if self._trials >= self._policy.half_open_calls:
                raise CircuitOpenError(0.0)
            self._trials += 1
        return self._generation

    def record(self, permit: int, outcome: Outcome) -> None:
        if permit != self._generation:
            return  # admitted in an earlier state: says nothing about this one
        if self._state is State.HALF_OPEN:
            if outcome is Outcome.FAILURE:
                self._open()
            elif outcome is Outcome.IGNORED:
                self._trials -= 1
            else:
                self._trial_successes += 1
                if self._trial_successes >= self._policy.half_open_calls:
                    self._change(State.CLOSED)
            return
        if outcome is Outcome.IGNORED:
            return
        self._results.append(outcome is Outcome.SUCCESS)
        failures = self._results.count(False)
        if (
            len(self._results) >= self._policy.min_calls
            and failures / len(self._results) >= self._policy.failure_rate
        ):
            self._open()

    def _open(self) -> None:
        self._change(State.OPEN)
        self._opened_at = self._clock()

    def _change(self, state: State) -> None:
        self._state = state
        self._generation += 1
        self._results.clear()
