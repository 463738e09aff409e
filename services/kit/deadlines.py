"""The request's deadline as a budget that shrinks across the hops.

gRPC Python does not propagate deadlines, so every downstream call is given what is left of
the request's budget minus a reserve that keeps time for the service to answer. The caller's
own deadline is never what ends a hanging hop: our client-side timeouts fire first, leaving
the reserve to send a fallback answer or a precise status.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# Less than this cannot carry a call; treat it as nothing left.
MIN_TIMEOUT_S = 0.001


class DeadlineSpentError(Exception):
    """Nothing of the budget is left for the next hop."""


@dataclass(frozen=True)
class Deadline:
    expires_at: float
    reserve_s: float
    clock: Callable[[], float] = time.monotonic

    @classmethod
    def for_request(
        cls,
        caller_remaining_s: float | None,
        *,
        default_s: float,
        max_s: float,
        reserve_ms: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> Deadline:
        """min(caller's remaining time, or the default when the caller set none; the maximum)."""
        budget = default_s if caller_remaining_s is None else caller_remaining_s
        return cls(clock() + min(budget, max_s), reserve_ms / 1000, clock)

    def remaining(self) -> float:
        return max(0.0, self.expires_at - self.clock())

    def timeout(self, cap_s: float | None = None) -> float:
        """Timeout for the next downstream call: what is left minus the reserve, at most
        ``cap_s``; DeadlineSpentError when nothing is left."""
        left = self.expires_at - self.clock() - self.reserve_s
        if left < MIN_TIMEOUT_S:
            raise DeadlineSpentError
        return left if cap_s is None else min(left, cap_s)

    def spent(self) -> bool:
        return self.expires_at - self.clock() - self.reserve_s < MIN_TIMEOUT_S
