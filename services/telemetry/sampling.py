"""Tail sampling of traces: which traces keep their spans, decided once per trace.

Statistics, SLOs and tool health no longer read spans (they come from the per-request
records), so spans only serve GetTrace: the traces worth keeping are the ones someone will
look at. Every trace with an error span or a span lasting at least the slow threshold is kept;
of the others, a share ``ratio`` is kept, chosen by the trace id exactly as OpenTelemetry's
TraceIdRatioBased sampler does (the low 64 bits below ratio * 2**64). The choice is therefore
the same on every replica and at any time, and a trace kept here at ratio r is also kept by a
head sampler at any ratio of at least r.

The decision is made in the database after the trace's last span has been quiet for a decision
window (services.telemetry.store.SpanStore.decide_pending), so it sees every span of the trace
whichever replica stored it, and no span waits in memory.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

_LOW_64 = (1 << 64) - 1


class Decision(enum.Enum):
    """Kept (and why) or dropped; the value names the reason in metrics."""

    ERROR = "error"
    SLOW = "slow"
    RATIO = "ratio"
    ALREADY_KEPT = "already_kept"
    DROP = "drop"


@dataclass(frozen=True)
class TraceFacts:
    """What the decision needs to know of a trace's pending spans."""

    trace_id: str
    has_error: bool
    longest_ms: float
    has_kept_spans: bool


def ratio_keeps(trace_id: str, ratio: float) -> bool:
    """OpenTelemetry's TraceIdRatioBased rule on a 32-hex-character trace id."""
    bound = round(ratio * (_LOW_64 + 1))
    return (int(trace_id, 16) & _LOW_64) < bound


def decide(facts: TraceFacts, *, ratio: float, slow_ms: float) -> Decision:
    if facts.has_kept_spans:
        return Decision.ALREADY_KEPT
    if facts.has_error:
        return Decision.ERROR
    if facts.longest_ms >= slow_ms:
        return Decision.SLOW
    if ratio_keeps(facts.trace_id, ratio):
        return Decision.RATIO
    return Decision.DROP
