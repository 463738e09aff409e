"""The routing rules file: loaded, compiled and validated once at start-up, refused if
inconsistent.

Every pattern is compiled by RE2 (``google-re2``), a regular-expression engine whose matching
time is linear in the length of the prompt whatever the pattern: no prompt can make it
backtrack, so a caller cannot buy seconds of router CPU with a crafted prompt. RE2 has no
look-around and no backreferences; a pattern that needs them is refused at start-up with the
tool and the pattern named, so no backtracking engine ever runs a rule. Matching is
case-insensitive. RE2 works on UTF-8: ``\\d``, ``\\w``, ``\\s`` and ``\\b`` are ASCII-only
(``\\pL``, ``\\pN`` name Unicode letters and digits), and match offsets are in characters.

Besides patterns the file may define named ``sets`` (pieces of pattern such as the number
or unit grammar), used as ``{name}`` in any pattern, so one grammar serves every rule.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import re2
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from services.router.registry import Registry

_OPTIONS = re2.Options()
_OPTIONS.case_sensitive = False
# Errors are reported through RulesError; RE2's own log line on stderr would only add noise.
_OPTIONS.log_errors = False
# A set reference: {name}, where RE2's own {n,m} repetition always starts with a digit.
_SET_REFERENCE = re2.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# A group reference in a rewrite's replacement: \1 .. \9.
_GROUP_REFERENCE = re2.compile(r"\\([1-9])")


class RulesError(ValueError):
    """The rules file is missing, unreadable or inconsistent."""


if TYPE_CHECKING:
    Regex = re2._Regexp[str]


@dataclass(frozen=True)
class Pattern:
    """A rule pattern as written (for messages) and compiled by RE2 (with sets expanded)."""

    source: str
    regex: Regex


def _expand(source: str, sets: dict[str, str]) -> str:
    def replace(match: re2._Match[str]) -> str:
        name = match.group(1)
        if name not in sets:
            raise ValueError(f"unknown set {{{name}}}")
        return f"(?:{sets[name]})"

    return _SET_REFERENCE.sub(replace, source)


def compile_pattern(source: str, sets: dict[str, str], where: str) -> Pattern:
    """``source`` compiled by RE2, or ValueError naming ``where`` and the pattern."""
    try:
        regex = re2.compile(_expand(source, sets), _OPTIONS)
    except (ValueError, re2.error) as error:
        reason = error.args[0] if error.args else error
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise ValueError(
            f"{where}: pattern {source!r} is not valid RE2 ({reason}); rules must compile "
            "with RE2 (no look-around, no backreferences) so matching stays linear in the "
            "prompt"
        ) from None
    return Pattern(source, regex)


@dataclass(frozen=True)
class Replacement:
    """A rewrite's replacement: literal text and \\1-style group references, expanded by us
    (the library's template expansion would unescape non-ASCII text)."""

    pieces: tuple[str | int, ...]

    @classmethod
    def parse(cls, text: str, groups: int, where: str) -> Replacement:
        pieces: list[str | int] = []
        end = 0
        for match in _GROUP_REFERENCE.finditer(text):
            group = int(match.group(1))
            if group > groups:
                raise ValueError(f"{where}: replacement {text!r} refers to missing group {group}")
            pieces += [text[end : match.start()], group]
            end = match.end()
        pieces.append(text[end:])
        return cls(tuple(piece for piece in pieces if piece != ""))

    def expand(self, match: re2._Match[str]) -> str:
        return "".join(p if isinstance(p, str) else match.group(p) or "" for p in self.pieces)


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


class Veto(_Strict):
    """A prompt matching ``pattern`` is not a request for the tool (or for any tool)."""

    pattern: str
    reason: str = Field(min_length=1)


class Rewrite(_Strict):
    pattern: str
    replace: str


@dataclass(frozen=True)
class Extracted:
    """The named groups of the first extraction pattern that matched, with their spans in
    the rewritten prompt (for the whole-token check)."""

    text: str
    groups: dict[str, str]
    spans: dict[str, tuple[int, int]]


class ToolRules(_Strict):
    # Applied in order, before intents and extraction (so "times" can become "*").
    rewrites: list[Rewrite] = []
    intents: list[IntentRule] = Field(min_length=1)
    # Matched against the prompt as sent: any match makes the intent 0.
    vetoes: list[Veto] = []
    # Tried in order; the named groups of the first that matches become the arguments.
    extract: list[str] = []

    _rewrites: list[tuple[Pattern, Replacement]] = PrivateAttr(default_factory=list)
    _intents: list[tuple[Pattern, float]] = PrivateAttr(default_factory=list)
    _vetoes: list[tuple[Pattern, str]] = PrivateAttr(default_factory=list)
    _extract: list[Pattern] = PrivateAttr(default_factory=list)

    def compile(self, name: str, sets: dict[str, str]) -> None:
        """Compile every pattern with RE2 (ValueError naming the tool and pattern)."""
        for rewrite in self.rewrites:
            pattern = compile_pattern(rewrite.pattern, sets, f"{name} rewrite")
            replacement = Replacement.parse(rewrite.replace, pattern.regex.groups, name)
            self._rewrites.append((pattern, replacement))
        for rule in self.intents:
            self._intents.append(
                (compile_pattern(rule.pattern, sets, f"{name} intent"), rule.score)
            )
        for veto in self.vetoes:
            self._vetoes.append((compile_pattern(veto.pattern, sets, f"{name} veto"), veto.reason))
        for source in self.extract:
            pattern = compile_pattern(source, sets, f"{name} extraction")
            if not pattern.regex.groupindex:
                raise ValueError(f"{name}: extraction pattern {source!r} has no named group")
            self._extract.append(pattern)

    @property
    def extraction_groups(self) -> set[str]:
        return {group for pattern in self._extract for group in pattern.regex.groupindex}

    def rewrite(self, prompt: str) -> str:
        for pattern, replacement in self._rewrites:
            prompt = pattern.regex.sub(replacement.expand, prompt)
        return prompt

    def veto(self, prompt: str) -> str:
        """The reason of the first veto that matches the prompt as sent, else ''."""
        return next((reason for p, reason in self._vetoes if p.regex.search(prompt)), "")

    def intent(self, rewritten: str) -> float:
        """The highest score among the intent patterns that match; 0 when none does."""
        return max((score for p, score in self._intents if p.regex.search(rewritten)), default=0.0)

    def extractions(self, rewritten: str) -> list[Extracted]:
        """Each extraction pattern's match, in order (the caller takes the first whole one)."""
        found = []
        for pattern in self._extract:
            match = pattern.regex.search(rewritten)
            if match is None:
                continue
            groups, spans = {}, {}
            for group, index in pattern.regex.groupindex.items():
                value = match.group(index)
                if value and value.strip():
                    groups[group] = value
                    spans[group] = match.span(index)
            found.append(Extracted(rewritten, groups, spans))
        return found


class RuleExample(_Strict):
    """A prompt and what these rules must make of it: the release gate of a rules version
    routes each one (``tool`` "" means no tool; ``arguments`` a subset of those extracted)."""

    prompt: str = Field(min_length=1, max_length=4000)
    tool: str = ""
    arguments: dict[str, Any] = {}


class Rules(_Strict):
    version: str = Field(min_length=1, max_length=64)
    threshold: float = Field(gt=0, le=1)
    weights: Weights
    # Named pieces of pattern, used as {name}; a set may use the sets defined before it.
    sets: dict[str, str] = {}
    # Prompts that ask for no tool at all (negations, several questions at once).
    vetoes: list[Veto] = []
    tools: dict[str, ToolRules]
    # What the release gate checks a new version against (docs/releases.md).
    examples: list[RuleExample] = []

    _vetoes: list[tuple[Pattern, str]] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _intent_required(self) -> Rules:
        # Otherwise a prompt matching no intent at all could still pick a tool.
        floor = self.weights.schema_fit + self.weights.health
        if self.threshold <= floor:
            raise ValueError(
                f"threshold {self.threshold:g} must exceed schema + health weights ({floor:g})"
            )
        return self

    @model_validator(mode="after")
    def _compile(self) -> Rules:
        sets: dict[str, str] = {}
        for name, body in self.sets.items():
            compile_pattern(body, sets, f"set {name}")
            sets[name] = _expand(body, sets)
        for veto in self.vetoes:
            self._vetoes.append((compile_pattern(veto.pattern, sets, "veto"), veto.reason))
        for name, tool_rules in self.tools.items():
            tool_rules.compile(name, sets)
        return self

    def veto(self, prompt: str) -> str:
        """The reason of the first rule-wide veto that matches, else ''."""
        return next((reason for p, reason in self._vetoes if p.regex.search(prompt)), "")

    def check_against(self, registry: Registry) -> list[str]:
        """Every routed built-in tool is registered and every extracted argument is in its
        schema. Backend tools ("<backend>.<tool>") are registered at run time: their rules are
        returned (to be reported once) and apply once the tool exists."""
        waiting = []
        for name in self.tools:
            if "." in name:
                waiting.append(name)
                continue
            tool = registry.latest(name)
            if tool is None:
                raise RulesError(f"rules route to {name!r}, which has no released version")
            unknown = self.unknown_groups(name, tool.spec.input_schema)
            if unknown:
                raise RulesError(
                    f"{name}: extraction groups {sorted(unknown)} are not input properties"
                )
        return waiting

    def unknown_groups(self, name: str, input_schema: Mapping[str, Any]) -> set[str]:
        """Extraction groups of ``name``'s rules that are not properties of the schema."""
        properties = set(input_schema.get("properties", {}))
        return self.tools[name].extraction_groups - properties


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


@dataclass(frozen=True)
class RuleBook:
    """Every routing rules version the router can serve, side by side: the seed file
    (``rules_file``, which a fresh install starts from) and each ``*.toml`` of the versions
    directory. Which version serves whom is the release state's (services.router.releases)."""

    versions: Mapping[str, Rules]
    seed: str

    def get(self, version: str) -> Rules | None:
        return self.versions.get(version)


def rules_sources(seed_file: Path, directory: Path | None) -> list[Path]:
    """The files a rule book is read from, in load order (their content is its digest)."""
    return [seed_file, *(sorted(directory.glob("*.toml")) if directory is not None else [])]


def load_rule_book(seed_file: Path, directory: Path | None) -> RuleBook:
    """The seed file and every version in ``directory``; the same version twice with
    different content is refused (a version is immutable)."""
    seed = load_rules(seed_file)
    versions: dict[str, Rules] = {seed.version: seed}
    sources = {seed.version: seed_file}
    for path in rules_sources(seed_file, directory)[1:]:
        rules = load_rules(path)
        known = versions.get(rules.version)
        if known is not None and known.model_dump() != rules.model_dump():
            raise RulesError(
                f"routing rules version {rules.version} is in {sources[rules.version]} and, "
                f"different, in {path}: a version never changes; give the new one its own"
            )
        versions.setdefault(rules.version, rules)
        sources.setdefault(rules.version, path)
    return RuleBook(versions, seed.version)
