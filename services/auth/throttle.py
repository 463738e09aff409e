"""Backs off a client id after repeated wrong secrets, to slow down guessing.

State is in memory, so it is per replica: with N replicas behind round-robin an attacker gets
up to N times the failures per window. That still bounds guessing against 256-bit random
secrets; a shared limit would need a database write on every failure.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque

# Bounds memory when failures come for many made-up client ids.
_MAX_TRACKED = 10_000


class FailureThrottle:
    def __init__(self, failures: int, window_s: float, backoff_s: float) -> None:
        self._failures = failures
        self._window = window_s
        self._backoff = backoff_s
        self._recent: OrderedDict[str, deque[float]] = OrderedDict()
        self._blocked_until: dict[str, float] = {}

    def retry_after(self, client_id: str) -> float:
        """Seconds the client id must wait, or 0 when it may try."""
        until = self._blocked_until.get(client_id)
        if until is None:
            return 0.0
        left = until - time.monotonic()
        if left <= 0:
            del self._blocked_until[client_id]
            return 0.0
        return left

    def failed(self, client_id: str) -> None:
        now = time.monotonic()
        times = self._recent.pop(client_id, None) or deque()
        times.append(now)
        while times and times[0] < now - self._window:
            times.popleft()
        if len(times) >= self._failures:
            self._blocked_until[client_id] = now + self._backoff
            times.clear()
        else:
            self._recent[client_id] = times
            while len(self._recent) > _MAX_TRACKED:
                self._recent.popitem(last=False)
        while len(self._blocked_until) > _MAX_TRACKED:
            del self._blocked_until[next(iter(self._blocked_until))]

    def succeeded(self, client_id: str) -> None:
        self._recent.pop(client_id, None)
