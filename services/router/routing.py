"""Scoring tools for a prompt: C = a*I + b*S + c*H over the caller's allowed tools only."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from jsonschema import Draft202012Validator

from services.router.registry import Registry, Tool, is_allowed
from services.router.rules import Rules, ToolRules, Weights

# Captured numbers beyond this many digits stay text rather than become huge ints or infinity.
MAX_NUMBER_DIGITS = 30


def confidence(weights: Weights, intent: float, schema_fit: float, health: float) -> float:
    """The router's confidence in a tool; each part and the result lie in [0, 1]."""
    return weights.intent * intent + weights.schema_fit * schema_fit + weights.health * health


def schema_fit(validator: Draft202012Validator, arguments: Mapping[str, Any]) -> float:
    """1.0 when the arguments validate; else the share of properties that are present and valid.

    The properties counted are the required ones, or all declared ones when none is required.
    """
    if validator.is_valid(arguments):
        return 1.0
    schema = validator.schema if isinstance(validator.schema, Mapping) else {}
    properties: Mapping[str, Any] = schema.get("properties", {})
    wanted = list(schema.get("required", [])) or list(properties)
    if not wanted:
        return 0.0
    good = sum(
        1
        for name in wanted
        if name in arguments
        and validator.evolve(schema=properties.get(name, {})).is_valid(arguments[name])
    )
    return good / len(wanted)


def coerce(raw: Mapping[str, str], schema: Mapping[str, Any]) -> dict[str, Any]:
    """Text captured from the prompt, typed by the input schema (number, integer, string)."""
    properties: Mapping[str, Any] = schema.get("properties", {})
    arguments: dict[str, Any] = {}
    for name, text in raw.items():
        kind = properties.get(name, {}).get("type")
        if kind in ("number", "integer"):
            try:
                number = Decimal(text)
            except InvalidOperation:
                number = Decimal("NaN")
            if not number.is_finite() or abs(number.adjusted()) > MAX_NUMBER_DIGITS:
                arguments[name] = text  # left as text: the schema check will count it as wrong
                continue
            if number == number.to_integral_value():
                arguments[name] = int(number)
            else:
                arguments[name] = text if kind == "integer" else float(number)
        else:
            arguments[name] = text
    return arguments


@dataclass(frozen=True)
class Candidate:
    tool: Tool
    intent: float
    schema_fit: float
    health: float
    confidence: float
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Decision:
    matched: bool
    candidates: list[Candidate]
    threshold: float
    rules_version: str
    reason: str

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    @property
    def arguments_json(self) -> str:
        best = self.best
        return json.dumps(best.arguments) if self.matched and best else ""


HealthLookup = Callable[[str, str], float]


class ToolRouter:
    def __init__(self, rules: Rules, registry: Registry, health: HealthLookup) -> None:
        rules.check_against(registry)
        self._rules = rules
        self._registry = registry
        self._health = health

    def _score(self, tool: Tool, tool_rules: ToolRules, prompt: str) -> Candidate:
        intent = tool_rules.intent(prompt)
        arguments = coerce(tool_rules.extract_raw(prompt), tool.spec.input_schema)
        fit = schema_fit(tool.input_validator, arguments)
        health = min(1.0, max(0.0, self._health(tool.spec.name, tool.spec.version)))
        return Candidate(
            tool=tool,
            intent=intent,
            schema_fit=fit,
            health=health,
            confidence=confidence(self._rules.weights, intent, fit, health),
            arguments=arguments,
        )

    def route(self, prompt: str, allowed_tools: Iterable[str]) -> Decision:
        allowed = list(allowed_tools)
        candidates = []
        for name, tool_rules in self._rules.tools.items():
            tool = self._registry.latest(name)
            if tool is not None and is_allowed(name, allowed):
                candidates.append(self._score(tool, tool_rules, prompt))
        candidates.sort(key=lambda c: (-c.confidence, c.tool.spec.name))
        threshold = self._rules.threshold
        if not candidates:
            reason = "no tool is allowed for this caller"
            return Decision(False, [], threshold, self._rules.version, reason)
        best = candidates[0]
        parts = (
            f"intent {best.intent:.2f}, schema fit {best.schema_fit:.2f}, health {best.health:.2f}"
        )
        if best.confidence >= threshold:
            reason = (
                f"{best.tool.spec.name} scored {best.confidence:.2f} >= threshold "
                f"{threshold:.2f} ({parts})"
            )
            return Decision(True, candidates, threshold, self._rules.version, reason)
        reason = (
            f"no tool is confident enough: the best, {best.tool.spec.name}, scored "
            f"{best.confidence:.2f} < threshold {threshold:.2f} ({parts})"
        )
        return Decision(False, candidates, threshold, self._rules.version, reason)
