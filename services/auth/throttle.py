"""Backs off a client id after repeated wrong secrets, to slow down guessing.

Every attempt counts as a failure from the moment it starts until it succeeds, so a burst of
concurrent guesses (each waits ~100 ms on argon2) cannot slip past the limit before the first
one fails.

State is in memory, so it is per replica: with N replicas behind round-robin an attacker gets
up to N times the attempts per window. That still bounds guessing against 256-bit random
secrets; a shared limit would need a database write on every attempt.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Any

# Bounds memory when attempts come for many made-up client ids.
_MAX_TRACKED = 10_000


class FailureThrottle:
    def __init__(self, failures: int, window_s: float, backoff_s: float) -> None:
        self._failures = failures
        self._window = window_s
        self._backoff = backoff_s
        self._attempts: OrderedDict[str, deque[float]] = OrderedDict()
        self._blocked_until: OrderedDict[str, float] = OrderedDict()

    def begin(self, client_id: str) -> float:
        """Seconds the client id must wait, or 0 when it may try (the try is now counted)."""
        now = time.monotonic()
        until = self._blocked_until.get(client_id)
        if until is not None:
            if until > now:
                return until - now
            del self._blocked_until[client_id]
        attempts = self._attempts.pop(client_id, None) or deque()
        while attempts and attempts[0] < now - self._window:
            attempts.popleft()
        if len(attempts) >= self._failures:
            self._blocked_until[client_id] = now + self._backoff
            _trim(self._blocked_until)
            return self._backoff
        attempts.append(now)
        self._attempts[client_id] = attempts
        _trim(self._attempts)
        return 0.0

    def succeeded(self, client_id: str) -> None:
        """The right secret was given: forget the client id's counted attempts."""
        self._attempts.pop(client_id, None)


def _trim(table: OrderedDict[str, Any]) -> None:
    while len(table) > _MAX_TRACKED:
        table.popitem(last=False)
