"""Circuit breakers per dependency and per tool, on the resilience4j model.

Written here because the Python breakers (pybreaker, aiobreaker, purgatory) count only
consecutive failures: none has a failure-rate sliding window, a slow-call rate or a fixed
number of half-open trial calls, which is what keeps a flapping dependency from being hammered.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from opentelemetry.metrics import CallbackOptions, Observation

from services.kit.metrics import meter

log = logging.getLogger(__name__)


class State(IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


@dataclass(frozen=True)
class BreakerConfig:
    # Calls remembered in the count-based sliding window.
    window_size: int = 20
    # No decision before this many calls are in the window.
    minimum_calls: int = 10
    # Open when this share of the window failed ...
    failure_rate_threshold: float = 0.5
    # ... or when this share was slower than slow_call_s.
    slow_call_rate_threshold: float = 0.8
    slow_call_s: float = 2.0
    # Fail fast this long before letting trial calls through.
    open_wait_s: float = 5.0
    # Trial calls allowed in half-open; all must succeed to close.
    half_open_calls: int = 3


class BreakerOpen(Exception):
    """The breaker refused the call without trying it."""

    def __init__(self, name: str, retry_after_s: float) -> None:
        super().__init__(f"circuit breaker {name} is open")
        self.name = name
        self.retry_after_s = retry_after_s


class CircuitBreaker:
    """Not thread-safe by design: one breaker lives on one asyncio event loop."""

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.config = config or BreakerConfig()
        self._clock = clock
        self._state = State.CLOSED
        self._window: deque[tuple[bool, bool]] = deque(maxlen=self.config.window_size)
        self._opened_at = 0.0
        self._trials_started = 0
        self._trials_succeeded = 0
        # Bumped on every state change: a permit from an older generation no longer counts.
        self._generation = 0
        self.transitions: list[tuple[State, State]] = []

    @property
    def state(self) -> State:
        if self._state is State.OPEN and self._clock() - self._opened_at >= self.config.open_wait_s:
            self._move(State.HALF_OPEN)
        return self._state

    def acquire(self) -> int:
        """Ask to make a call; raises BreakerOpen when the call must not be tried.

        Returns a permit to hand back to ``record`` or ``release``, so that a call started
        before a state change is not counted toward the new state.
        """
        state = self.state
        if state is State.OPEN:
            remaining = self.config.open_wait_s - (self._clock() - self._opened_at)
            raise BreakerOpen(self.name, max(remaining, 0.0))
        if state is State.HALF_OPEN:
            if self._trials_started >= self.config.half_open_calls:
                raise BreakerOpen(self.name, self.config.open_wait_s)
            self._trials_started += 1
        return self._generation

    def half_open_early(self) -> bool:
        """The dependency was seen healthy (say, its health check answered SERVING) before the
        open wait ended: let the trial calls through now instead of failing fast until then.
        True when the breaker is half-open afterwards."""
        if self.state is State.OPEN:
            self._move(State.HALF_OPEN)
        return self._state is State.HALF_OPEN

    def release(self, permit: int) -> None:
        """The call ended in an outcome that says nothing of the dependency's health
        (the caller's own error): count nothing, but free a half-open trial slot."""
        if permit == self._generation and self._state is State.HALF_OPEN:
            self._trials_started = max(0, self._trials_started - 1)

    def record(self, success: bool, duration_s: float, permit: int | None = None) -> None:
        """Report the outcome of a call that acquire() allowed."""
        if permit is not None and permit != self._generation:
            return  # started under an earlier state
        slow = duration_s >= self.config.slow_call_s
        if self._state is State.HALF_OPEN:
            if not success or slow:
                self._open()
                return
            self._trials_succeeded += 1
            if self._trials_succeeded >= self.config.half_open_calls:
                self._move(State.CLOSED)
            return
        if self._state is State.OPEN:
            return  # a call that started before the breaker opened
        self._window.append((success, slow))
        if len(self._window) < self.config.minimum_calls:
            return
        calls = len(self._window)
        failures = sum(1 for ok, _ in self._window if not ok)
        slows = sum(1 for _, was_slow in self._window if was_slow)
        if (
            failures / calls >= self.config.failure_rate_threshold
            or slows / calls >= self.config.slow_call_rate_threshold
        ):
            self._open()

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._move(State.OPEN)

    def _move(self, new: State) -> None:
        old = self._state
        if old is new:
            return
        self._state = new
        self._generation += 1
        self._window.clear()
        self._trials_started = 0
        self._trials_succeeded = 0
        self.transitions.append((old, new))
        _TRANSITIONS.add(1, {"breaker": self.name, "from": old.name, "to": new.name})
        log.warning(
            "circuit breaker transition",
            extra={"breaker": self.name, "from": old.name, "to": new.name},
        )


class BreakerRegistry:
    """Breakers by name, created on first use, exported as a state gauge."""

    def __init__(
        self, config: BreakerConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._config = config or BreakerConfig()
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}
        _REGISTRIES.add(self)

    def get(self, name: str) -> CircuitBreaker:
        breaker = self._breakers.get(name)
        if breaker is None:
            breaker = self._breakers[name] = CircuitBreaker(name, self._config, self._clock)
        return breaker

    def all(self) -> list[CircuitBreaker]:
        return list(self._breakers.values())


# Weak: a registry belongs to a server, and a process that builds several (tests do) must not
# keep reporting, nor keep alive, the breakers of servers long gone.
_REGISTRIES: weakref.WeakSet[BreakerRegistry] = weakref.WeakSet()


def _observe_states(_options: CallbackOptions) -> list[Observation]:
    return [
        Observation(int(b.state), {"breaker": b.name})
        for registry in list(_REGISTRIES)
        for b in registry.all()
    ]


_TRANSITIONS = meter().create_counter(
    "toolmesh.breaker.transitions", description="Circuit breaker state changes."
)
meter().create_observable_gauge(
    "toolmesh.breaker.state",
    callbacks=[_observe_states],
    description="Circuit breaker state: 0 closed, 1 open, 2 half-open.",
)
