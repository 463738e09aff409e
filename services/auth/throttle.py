"""Backs off wrong secrets per (client id, source address), under a higher per-client ceiling.

Anyone who knows a client id can send wrong secrets for it. Counting failures per client id
alone would let them lock the owner out; counting per (client id, source) lets the owner's
right secret from its own address through while an attacker hammers from another. The
per-client ceiling still bounds the total guessing rate against one client from many
addresses; sources where the right secret was given recently (``trusted_s``) are exempt from
that ceiling (not from their own per-source limit), so even a distributed attack does not
lock the owner out of the addresses it uses.

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
from collections.abc import Callable
from typing import TypeVar

# Bounds memory when attempts come for many made-up client ids or from many addresses.
MAX_TRACKED = 10_000

K = TypeVar("K")
V = TypeVar("V")


class FailureThrottle:
    def __init__(
        self,
        *,
        per_source: int,
        per_client: int,
        window_s: float,
        backoff_s: float,
        trusted_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._per_source = per_source
        self._per_client = max(per_client, per_source)
        self._window = window_s
        self._backoff = backoff_s
        self._trusted_s = trusted_s
        self._clock = clock
        self._source_attempts: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()
        self._client_attempts: OrderedDict[str, deque[tuple[float, str]]] = OrderedDict()
        self._source_blocked: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._client_blocked: OrderedDict[str, float] = OrderedDict()
        # (client id, source) -> when the right secret last came from there.
        self._trusted: OrderedDict[tuple[str, str], float] = OrderedDict()

    def begin(self, client_id: str, source: str) -> float:
        """Seconds to wait before trying again, or 0 when the attempt may go ahead (it is then
        counted as a failure until ``succeeded``)."""
        now = self._clock()
        pair = (client_id, source)
        wait = _remaining(self._source_blocked, pair, now)
        if wait:
            return wait
        trusted = self._is_trusted(pair, now)
        if not trusted:
            wait = _remaining(self._client_blocked, client_id, now)
            if wait:
                return wait
        mine = self._source_attempts.pop(pair, None) or deque()
        while mine and mine[0] <= now - self._window:
            mine.popleft()
        everyone = self._client_attempts.pop(client_id, None) or deque()
        while everyone and everyone[0][0] <= now - self._window:
            everyone.popleft()
        wait = 0.0
        if len(mine) >= self._per_source:
            _put(self._source_blocked, pair, now + self._backoff)
            wait = self._backoff
        elif len(everyone) >= self._per_client and not trusted:
            _put(self._client_blocked, client_id, now + self._backoff)
            wait = self._backoff
        else:
            mine.append(now)
            everyone.append((now, source))
        _put(self._source_attempts, pair, mine)
        _put(self._client_attempts, client_id, everyone)
        return wait

    def succeeded(self, client_id: str, source: str) -> None:
        """The right secret came from ``source``: forget its counted attempts, trust it."""
        pair = (client_id, source)
        self._source_attempts.pop(pair, None)
        everyone = self._client_attempts.get(client_id)
        if everyone:
            kept = deque(item for item in everyone if item[1] != source)
            self._client_attempts[client_id] = kept
        _put(self._trusted, pair, self._clock())

    def _is_trusted(self, pair: tuple[str, str], now: float) -> bool:
        since = self._trusted.get(pair)
        if since is None:
            return False
        if now - since > self._trusted_s:
            del self._trusted[pair]
            return False
        return True


def _remaining(blocked: OrderedDict[K, float], key: K, now: float) -> float:
    until = blocked.get(key)
    if until is None:
        return 0.0
    if until > now:
        return until - now
    del blocked[key]
    return 0.0


def _put(table: OrderedDict[K, V], key: K, value: V) -> None:
    """Insert as the newest entry; the oldest go once the table is full."""
    table[key] = value
    table.move_to_end(key)
    while len(table) > MAX_TRACKED:
        table.popitem(last=False)
