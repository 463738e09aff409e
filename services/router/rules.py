"""The routing rules file: loaded and validated once at start-up, refused if inconsistent."""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.router.registry import Registry


def _compiled(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as error:
        raise ValueError(f"invalid regular expression {pattern!r}: {error}") from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Weights(_Strict):
    intent: float = Field(ge=0, le=1)
    schema_fit: float = Field(ge=0, le=1, alias="schema")
    health: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> Weights:
        total = self.intent + self.schema_fit + self.health
        if not math.isclose(total, 1.0, abs_tol=1e-9):
            raise ValueError(f"weights must sum to 1, got {total:g}")
        return self


class IntentRule(_Strict):
    pattern: str
    score: float = Field(gt=0, le=1)

    @field_validator("pattern")
    @classmethod
    def _valid(cls, value: str) -> str:
        _compiled(value)
        return value


class Rewrite(_Strict):
    pattern: str
    replace: str

    @field_validator("pattern")
    @classmethod
    def _valid(cls, value: str) -> str:
        _compiled(value)
        return value


class ToolRules(_Strict):
    intents: list[IntentRule] = Field(min_length=1)
    rewrites: list[Rewrite] = []
    # Tried in order; the named groups of the first that matches become the arguments.
    extract: list[str] = []

    @field_validator("extract")
    @classmethod
    def _named_groups(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not _compiled(pattern).groupindex:
                raise ValueError(f"extraction pattern {pattern!r} has no named group")
        return value

    def intent(self, prompt: str) -> float:
        """The highest score among the intent patterns that match; 0 when none does."""
        return max(
            (rule.score for rule in self.intents if _compiled(rule.pattern).search(prompt)),
            default=0.0,
        )

    def extract_raw(self, prompt: str) -> dict[str, str]:
        """Named groups of the first matching extraction pattern, after the rewrites."""
        for rewrite in self.rewrites:
            prompt = _compiled(rewrite.pattern).sub(rewrite.replace, prompt)
        for pattern in self.extract:
            match = _compiled(pattern).search(prompt)
            if match:
                groups = match.groupdict().items()
                return {k: " ".join(v.split()) for k, v in groups if v and v.strip()}
        return {}


class Rules(_Strict):
    version: str = Field(min_length=1)
    threshold: float = Field(gt=0, le=1)
    weights: Weights
    tools: dict[str, ToolRules]

    @model_validator(mode="after")
    def _intent_required(self) -> Rules:
        # Otherwise a prompt matching no intent at all could still pick a tool.
        floor = self.weights.schema_fit + self.weights.health
        if self.threshold <= floor:
            raise ValueError(
                f"threshold {self.threshold:g} must exceed schema + health weights ({floor:g})"
            )
        return self

    def check_against(self, registry: Registry) -> None:
        """Every routed tool is registered and every extracted argument is in its schema."""
        for name, tool_rules in self.tools.items():
            tool = registry.latest(name)
            if tool is None:
                raise RulesError(f"rules route to {name!r}, which has no released version")
            properties = set(tool.spec.input_schema.get("properties", {}))
            for pattern in tool_rules.extract:
                unknown = set(_compiled(pattern).groupindex) - properties
                if unknown:
                    raise RulesError(
                        f"{name}: extraction groups {sorted(unknown)} are not input properties"
                    )


class RulesError(ValueError):
    """The rules file is missing, unreadable or inconsistent."""


def parse_rules(data: dict[str, Any]) -> Rules:
    try:
        return Rules.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'rules'}: {e['msg']}"
            for e in error.errors(include_url=False, include_input=False)
        )
        raise RulesError(f"invalid routing rules: {problems}") from None


def load_rules(path: Path) -> Rules:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise RulesError(f"cannot read routing rules {path}: {error}") from None
    return parse_rules(data)
