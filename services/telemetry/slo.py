"""SLOs from configuration and the error-budget maths of the SRE workbook (pure functions).

Burn rate over a window = (bad / total) / (1 - target): 1 spends the error budget exactly
over the period, 14.4 spends 2% of a 30-day budget in one hour. The alerts are the workbook's
multi-window, multi-burn-rate pair: a long window for significance and a short one so an
alert stops soon after the problem does. Threshold comparisons use exact fractions, so a burn
of exactly 14.4 does not fire because of float noise in either direction.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

# Windows the burn rate is reported over, in seconds: 5 min, 30 min, 1 h, 6 h.
BURN_WINDOWS_S = (300, 1800, 3600, 21600)


@dataclass(frozen=True)
class AlertRule:
    severity: str
    long_window_s: int
    short_window_s: int
    threshold: Fraction


ALERT_RULES = (
    AlertRule("page", 3600, 300, Fraction("14.4")),
    AlertRule("ticket", 21600, 1800, Fraction(6)),
)


@dataclass(frozen=True)
class Objective:
    name: str
    service: str
    route: str
    tool: str
    availability: Fraction
    latency_threshold_ms: float
    latency_target: Fraction
    period_days: int


@dataclass(frozen=True)
class SloConfig:
    version: str
    objectives: tuple[Objective, ...]

    @classmethod
    def load(cls, path: Path) -> SloConfig:
        with path.open("rb") as file:
            return cls.from_mapping(tomllib.load(file))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> SloConfig:
        version = str(data.get("version", "")).strip()
        if not version:
            raise ValueError("slo config: version is required")
        objectives = tuple(_objective(i, item) for i, item in enumerate(data.get("objective", [])))
        names = [o.name for o in objectives]
        if len(set(names)) != len(names):
            raise ValueError("slo config: objective names must be unique")
        return cls(version, objectives)


def _target(where: str, value: object) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{where} must be a number")
    target = Fraction(str(value))
    if not 0 < target < 1:
        raise ValueError(f"{where} must be between 0 and 1, exclusive")
    return target


def _objective(index: int, item: Mapping[str, Any]) -> Objective:
    where = f"slo config: objective[{index}]"
    name, service = str(item.get("name", "")), str(item.get("service", ""))
    route, tool = str(item.get("route", "")), str(item.get("tool", ""))
    if not name or not service:
        raise ValueError(f"{where}: name and service are required")
    if bool(route) == bool(tool):
        raise ValueError(f"{where}: give exactly one of route and tool")
    threshold = float(item.get("latency_threshold_ms", 0))
    period_days = int(item.get("period_days", 30))
    if threshold <= 0 or not 1 <= period_days <= 90:
        raise ValueError(f"{where}: latency_threshold_ms > 0 and period_days 1..90")
    return Objective(
        name=name,
        service=service,
        route=route,
        tool=tool,
        availability=_target(f"{where}.availability", item.get("availability")),
        latency_threshold_ms=threshold,
        latency_target=_target(f"{where}.latency_target", item.get("latency_target")),
        period_days=period_days,
    )


def burn_rate(bad: int, total: int, target: Fraction) -> Fraction:
    """How many times faster than sustainable the window spends the error budget."""
    if total == 0:
        return Fraction(0)
    return Fraction(bad, total) / (1 - target)


def budget_remaining(bad: int, total: int, target: Fraction) -> Fraction:
    """Share of the period's error budget left: 1 untouched, 0 spent, below 0 overspent."""
    return 1 - burn_rate(bad, total, target)


def sli(good: int, total: int) -> Fraction:
    return Fraction(good, total) if total else Fraction(1)


@dataclass(frozen=True)
class AlertState:
    rule: AlertRule
    firing: bool


def alerts(burns: Mapping[int, Fraction]) -> list[AlertState]:
    """Each rule fires when both its windows burn strictly faster than its threshold."""
    return [
        AlertState(
            rule,
            burns[rule.long_window_s] > rule.threshold
            and burns[rule.short_window_s] > rule.threshold,
        )
        for rule in ALERT_RULES
    ]


@dataclass(frozen=True)
class WindowCounts:
    """Events of one SLI in one window: all of them and the bad ones."""

    total: int
    bad: int


def burn_rates(windows: Mapping[int, WindowCounts], target: Fraction) -> dict[int, Fraction]:
    """Burn rate over each of BURN_WINDOWS_S, from counts that cover at least those windows."""
    return {
        size: burn_rate(windows[size].bad, windows[size].total, target) for size in BURN_WINDOWS_S
    }


# What a release unit is judged against when no objective covers it.
DEFAULT_UNIT_OBJECTIVE = Objective(
    name="",
    service="",
    route="",
    tool="",
    availability=Fraction("0.99"),
    latency_threshold_ms=500.0,
    latency_target=Fraction("0.95"),
    period_days=30,
)


def unit_objective(config: SloConfig, kind: str, name: str) -> Objective:
    """The objective a release unit's burn rates use: for a tool, the objective of that tool,
    else of every tool ("*"); for routing rules and prompts (which serve whole requests), the
    first objective of a route; else DEFAULT_UNIT_OBJECTIVE."""
    objectives = config.objectives
    if kind == "tool":
        found = next((o for o in objectives if o.tool == name), None) or next(
            (o for o in objectives if o.tool == "*"), None
        )
    else:
        found = next((o for o in objectives if o.route), None)
    return found or DEFAULT_UNIT_OBJECTIVE
