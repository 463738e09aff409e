"""What a release is made of: its unit, its plan, its states, and who gets the candidate.

Assignment is sticky per (tenant, session): a stable hash of the unit, the candidate version,
the tenant and the session (or the request, for a call without a session) gives a bucket in
[0, 10000); the candidate serves when the bucket is below weight * 100. Raising the weight only
adds buckets, so a conversation that reached the candidate stays on it until a rollback or the
promotion, and every replica computes the same answer from the same state.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from services.router.registry import SideEffect

# Buckets of the sticky assignment (weights are whole percents: 100 buckets per percent).
BUCKETS = 10_000


class UnitKind(StrEnum):
    TOOL = "tool"
    ROUTING = "routing"
    PROMPT = "prompt"


@dataclass(frozen=True, order=True)
class UnitKey:
    """A release unit: the tool or prompt name ("" for the routing rules) and its owning tenant
    ("" for platform-wide units)."""

    kind: UnitKind
    tenant: str
    name: str

    @property
    def label(self) -> str:
        """ "tool:calculator", "routing", "prompt:route-system", "tool:acme/files.read"."""
        if self.kind is UnitKind.ROUTING:
            return "routing"
        owner = f"{self.tenant}/" if self.tenant else ""
        return f"{self.kind.value}:{owner}{self.name}"

    @property
    def active_key(self) -> str:
        """The value that makes a second release of the unit in progress impossible."""
        return f"{self.kind.value}\x1f{self.tenant}\x1f{self.name}"


ROUTING_UNIT = UnitKey(UnitKind.ROUTING, "", "")


def bucket(*parts: str) -> int:
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def on_candidate(key: UnitKey, candidate: str, weight: int, tenant: str, draw: str) -> bool:
    """True when (tenant, draw) is among the ``weight`` percent assigned to ``candidate``."""
    if weight <= 0:
        return False
    if weight >= 100:
        return True
    return bucket(key.active_key, candidate, tenant, draw) < weight * (BUCKETS // 100)


class State(StrEnum):
    REFUSED = "refused"
    SHADOW = "shadow"
    CANARY = "canary"
    PAUSED = "paused"
    MONITORING = "monitoring"
    SUCCEEDED = "succeeded"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"
    FAILED = "failed"


ACTIVE = frozenset({State.SHADOW, State.CANARY, State.PAUSED, State.MONITORING})


class PlanKind(StrEnum):
    SHADOW_THEN_CANARY = "shadow-then-canary"
    CANARY_ONLY = "canary-only"
    IMMEDIATE = "immediate"


DEFAULT_STEPS = (5, 25, 50, 100)


@dataclass(frozen=True)
class Plan:
    """How a candidate is judged (ReleasePlan in router.proto says what each field means)."""

    kind: PlanKind = PlanKind.SHADOW_THEN_CANARY
    steps: tuple[int, ...] = DEFAULT_STEPS
    interval_s: float = 30.0
    threshold: int = 2
    shadow_share: float = 0.5
    shadow_intervals: int = 2
    monitor_s: float = 600.0
    min_requests: int = 20
    max_error_rate_increase: float = 0.02
    max_p95_ratio: float = 1.25
    p95_slack_ms: float = 20.0
    max_burn_rate: float = 14.4
    min_agreement: float = 0.99

    def to_json(self) -> str:
        data = asdict(self)
        data["kind"] = self.kind.value
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        data["kind"] = PlanKind(data["kind"])
        data["steps"] = tuple(data["steps"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def problems(self) -> list[tuple[str, str]]:
        """Fields out of range, as (field, problem) for INVALID_ARGUMENT."""
        found = []
        steps = self.steps
        if not steps or len(steps) > 20:
            found.append(("plan.steps", "1 to 20 weights"))
        elif (
            any(not 1 <= s <= 100 for s in steps)
            or any(b <= a for a, b in itertools.pairwise(steps))
            or steps[-1] != 100
        ):
            found.append(("plan.steps", "increasing percents from 1 to 100, ending at 100"))
        checks: Sequence[tuple[str, float, float, float]] = (
            ("plan.interval_seconds", self.interval_s, 0.2, 86_400),
            ("plan.threshold", self.threshold, 1, 100),
            ("plan.shadow_share", self.shadow_share, 0.01, 1),
            ("plan.shadow_intervals", self.shadow_intervals, 1, 100),
            ("plan.monitor_seconds", self.monitor_s, 0, 7 * 86_400),
            ("plan.min_requests", self.min_requests, 1, 1_000_000),
            ("plan.max_error_rate_increase", self.max_error_rate_increase, 0, 1),
            ("plan.max_p95_ratio", self.max_p95_ratio, 1, 100),
            ("plan.p95_slack_ms", self.p95_slack_ms, 0, 60_000),
            ("plan.max_burn_rate", self.max_burn_rate, 0, 1000),
            ("plan.min_agreement", self.min_agreement, 0, 1),
        )
        for name, value, low, high in checks:
            if not (math.isfinite(value) and low <= value <= high):
                found.append((name, f"between {low:g} and {high:g}"))
        return found


def shadow_refusal(key: UnitKey, side_effect: SideEffect | None) -> str:
    """Why the unit can never be shadowed ("" when it can)."""
    if key.kind is UnitKind.PROMPT:
        return (
            "a prompt is never shadowed: a copied call would ask the model again and spend "
            "tokens outside any budget"
        )
    if side_effect is SideEffect.WRITE:
        return "a write tool is never shadowed: a copied call would write a second time"
    return ""


@dataclass(frozen=True)
class Check:
    """One gate or analysis check: what was measured against what."""

    name: str
    passed: bool
    detail: str
    value: float = 0.0
    limit: float = 0.0


@dataclass(frozen=True)
class Figures:
    """One version's figures over a window (ReleaseFigures in router.proto)."""

    version: str
    source: str
    requests: int
    errors: int
    p95_ms: float
    window_start: datetime
    window_end: datetime
    error_burn_rate: float = 0.0
    latency_burn_rate: float = 0.0
    agreement: float = 0.0
    no_match: int = 0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def no_match_rate(self) -> float:
        return self.no_match / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Analysis:
    """One interval's judgement: outcome "passed", "failed" or "waiting", the checks and the
    figures they used, and what followed."""

    at: datetime
    state: State
    weight: int
    outcome: str
    checks: tuple[Check, ...]
    figures: tuple[Figures, ...]
    decision: str = ""

    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_json(self) -> str:
        return json.dumps(
            {
                "at": self.at.isoformat(),
                "state": self.state.value,
                "weight": self.weight,
                "outcome": self.outcome,
                "decision": self.decision,
                "checks": [asdict(c) for c in self.checks],
                "figures": [
                    {
                        **asdict(f),
                        "window_start": f.window_start.isoformat(),
                        "window_end": f.window_end.isoformat(),
                    }
                    for f in self.figures
                ],
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Analysis | None:
        if not text:
            return None
        data = json.loads(text)
        return cls(
            at=datetime.fromisoformat(data["at"]),
            state=State(data["state"]),
            weight=int(data["weight"]),
            outcome=data["outcome"],
            decision=data.get("decision", ""),
            checks=tuple(Check(**c) for c in data["checks"]),
            figures=tuple(
                Figures(
                    **{
                        **f,
                        "window_start": datetime.fromisoformat(f["window_start"]),
                        "window_end": datetime.fromisoformat(f["window_end"]),
                    }
                )
                for f in data["figures"]
            ),
        )

    def summary(self) -> dict[str, Any]:
        """The figures of the failed checks (or all checks), for an audit event's details."""
        checks = self.failed_checks() or list(self.checks)
        return {
            "outcome": self.outcome,
            "weight": self.weight,
            "checks": {
                c.name: {"value": round(c.value, 6), "limit": round(c.limit, 6)} for c in checks
            },
            "figures": {
                f"{f.version}/{f.source}": {
                    "requests": f.requests,
                    "errors": f.errors,
                    "p95_ms": round(f.p95_ms, 3),
                    "error_burn_rate": round(f.error_burn_rate, 3),
                }
                for f in self.figures
            },
        }


def checks_json(checks: Sequence[Check]) -> str:
    return json.dumps([asdict(c) for c in checks], sort_keys=True)


def checks_from_json(text: str) -> tuple[Check, ...]:
    return tuple(Check(**c) for c in json.loads(text)) if text else ()


@dataclass(frozen=True)
class Release:
    """A release as stored (router_releases)."""

    id: str
    unit: UnitKey
    stable_version: str
    candidate_version: str
    plan: Plan
    state: State
    paused_state: State | None
    weight: int
    step: int
    failed_checks: int
    passed_intervals: int
    started_at: datetime
    updated_at: datetime
    stage_started_at: datetime
    next_check_at: datetime | None
    finished_at: datetime | None
    monitor_until: datetime | None
    started_by: str
    reason: str
    gates: tuple[Check, ...]
    last_analysis: Analysis | None
    revision: int
    lease_owner: str
    lease_expires_at: datetime | None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


# Upper bounds (ms) of the shadow latency histogram's buckets; the last one is open.
LATENCY_BUCKETS_MS = (
    1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000,
)  # fmt: skip


def latency_bucket(ms: float) -> int:
    return next(
        (i for i, bound in enumerate(LATENCY_BUCKETS_MS) if ms <= bound), len(LATENCY_BUCKETS_MS)
    )


@dataclass
class ShadowTally:
    """Shadow comparisons of one release: counts, and latencies as histograms (so replicas'
    tallies add up; the p95 is the upper bound of the bucket that holds it)."""

    compared: int = 0
    agreed: int = 0
    stable_errors: int = 0
    candidate_errors: int = 0
    stable_hist: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    candidate_hist: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))

    def add(
        self,
        *,
        agreed: bool,
        stable_error: bool,
        candidate_error: bool,
        stable_ms: float,
        candidate_ms: float,
    ) -> None:
        self.compared += 1
        self.agreed += agreed
        self.stable_errors += stable_error
        self.candidate_errors += candidate_error
        self.stable_hist[latency_bucket(stable_ms)] += 1
        self.candidate_hist[latency_bucket(candidate_ms)] += 1

    def merge(self, other: ShadowTally) -> None:
        self.compared += other.compared
        self.agreed += other.agreed
        self.stable_errors += other.stable_errors
        self.candidate_errors += other.candidate_errors
        self.stable_hist = [a + b for a, b in zip(self.stable_hist, other.stable_hist, strict=True)]
        self.candidate_hist = [
            a + b for a, b in zip(self.candidate_hist, other.candidate_hist, strict=True)
        ]

    @staticmethod
    def p95(hist: Sequence[int]) -> float:
        total = sum(hist)
        if not total:
            return 0.0
        rank = -(-95 * total // 100)
        seen = 0
        for i, count in enumerate(hist):
            seen += count
            if seen >= rank:
                return float(LATENCY_BUCKETS_MS[i]) if i < len(LATENCY_BUCKETS_MS) else math.inf
        return math.inf

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ShadowTally:
        return cls(**json.loads(text))
