"""Latency and error statistics per group, computed exactly from every record in the window."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

PERCENTILES = (50, 95, 99)


@dataclass(frozen=True)
class GroupStats:
    key: tuple[str, ...]
    count: int
    errors: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.count


def nearest_rank(ordered: Sequence[float], percentile: int) -> float:
    """The smallest value with at least ``percentile``% of the values at or below it.

    Integer arithmetic for the rank, so 95% of 20 values is exactly the 19th.
    """
    rank = max(1, -(-percentile * len(ordered) // 100))
    return ordered[rank - 1]


def summarize(samples: Iterable[Sequence[Any]]) -> list[GroupStats]:
    """Rows of (key..., duration_ms, error) -> one GroupStats per key, sorted by key.

    The percentiles are exact (nearest rank over every duration in the window), not estimated
    from buckets or sketches: the window's durations are all fetched and sorted here.
    """
    durations: dict[tuple[str, ...], list[float]] = {}
    errors: dict[tuple[str, ...], int] = {}
    for *key_parts, duration_ms, error in samples:
        key = tuple(key_parts)
        durations.setdefault(key, []).append(duration_ms)
        errors[key] = errors.get(key, 0) + bool(error)
    result = []
    for key in sorted(durations):
        ordered = sorted(durations[key])
        p50, p95, p99 = (nearest_rank(ordered, p) for p in PERCENTILES)
        result.append(
            GroupStats(
                key=key,
                count=len(ordered),
                errors=errors[key],
                mean_ms=sum(ordered) / len(ordered),
                p50_ms=p50,
                p95_ms=p95,
                p99_ms=p99,
            )
        )
    return result
