"""Scoring tools for a prompt: C = a*I + b*S + c*H over the caller's allowed tools only.

Never a wrong answer: a prompt that a rule vetoes (a negation, a date that looks like a
subtraction) gets intent 0; arguments are taken only as whole tokens (a capture that would cut
``1e400`` to ``1`` vetoes the tool); and a prompt that two tools would both answer is declined
rather than half-answered.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from jsonschema.protocols import Validator

from services.router.registry import Registry, Tool, is_allowed
from services.router.rules import Extracted, Rules, ToolRules, Weights
from services.router.tools.numbers import SIGNS, NumberError, parse_number

# Captured numbers beyond this many digits stay text rather than become huge ints or infinity.
MAX_NUMBER_DIGITS = 30
# RE2's \s is ASCII: other spaces (no-break, thin, ideographic, vertical tab ...) are read as
# plain spaces, one for one so that character offsets stay where they were.
_SPACES = {i: " " for i in range(0x3001) if chr(i).isspace() and chr(i) not in "\t\n\f\r "}


def confidence(weights: Weights, intent: float, schema_fit: float, health: float) -> float:
    """The router's confidence in a tool; each part and the result lie in [0, 1]."""
    return weights.intent * intent + weights.schema_fit * schema_fit + weights.health * health


def schema_fit(validator: Validator, arguments: Mapping[str, Any]) -> float:
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


def _number(text: str, kind: str) -> int | float | str:
    """A JSON number only when it carries the captured value exactly; else the text, which
    the schema check then counts as wrong (and InvokeTool refuses)."""
    try:
        number = parse_number(text)
    except NumberError:
        return text
    if abs(number.adjusted()) > MAX_NUMBER_DIGITS:
        return text
    if number == number.to_integral_value():
        return int(number)
    if kind == "number" and Decimal(repr(float(number))) == number:
        return float(number)
    return text


def coerce(raw: Mapping[str, str], schema: Mapping[str, Any]) -> dict[str, Any]:
    """Text captured from the prompt, typed by the input schema (number, integer, string).

    A property that accepts text as well as numbers gets the text: the tool reads it whole.
    """
    properties: Mapping[str, Any] = schema.get("properties", {})
    arguments: dict[str, Any] = {}
    for name, text in raw.items():
        kind = properties.get(name, {}).get("type")
        words = " ".join(text.split())
        arguments[name] = _number(words, kind) if kind in ("number", "integer") else words
    return arguments


def _word(char: str) -> bool:
    return char.isalnum() or char == "_"


def _glued(text: str, i: int) -> bool:
    """True when text[i-1] and text[i] belong to one token: letters and digits run together,
    a decimal point or thousands comma between digits, a sign or point before a digit."""
    before, after = text[i - 1], text[i]
    if _word(before) and _word(after):
        return True
    if before in ".,'" and after.isdigit() and i >= 2 and text[i - 2].isdigit():
        return True
    if after in ".,'" and before.isdigit() and i + 1 < len(text) and text[i + 1].isdigit():
        return True
    return (before == "." or before in SIGNS) and after.isdigit()


def fragment(extracted: Extracted) -> str:
    """The token a captured argument would cut out of the prompt, or '' when every argument
    is whole. Arguments may touch each other ("5km": value then unit), nothing else."""
    text = extracted.text
    spans = list(extracted.spans.values())

    def in_other(index: int, own: int) -> bool:
        return any(s <= index < e for k, (s, e) in enumerate(spans) if k != own)

    for own, (first, last) in enumerate(spans):
        start, end = first, last
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        cut_left = start > 0 and not in_other(start - 1, own) and _glued(text, start)
        cut_right = end < len(text) and not in_other(end, own) and _glued(text, end)
        if cut_left or cut_right:
            left = start
            while left > 0 and not text[left - 1].isspace():
                left -= 1
            right = end
            while right < len(text) and not text[right].isspace():
                right += 1
            return text[left:right][:40]
    return ""


@dataclass(frozen=True)
class Candidate:
    tool: Tool
    intent: float
    schema_fit: float
    health: float
    confidence: float
    arguments: dict[str, Any]
    # Why the intent was forced to 0 (a veto, or an argument that would cut a token), or ''.
    vetoed: str = ""


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
# (tenant, "<backend>.<tool>") -> the served backend tool, or None.
BackendLookup = Callable[[str, str], Tool | None]
# Told once per rule that names a backend tool which cannot be routed to (and why).
RuleNotice = Callable[[str, str], None]
# A tool name -> the version serving this caller (releases assign it per tenant and session),
# or None when the caller cannot be routed to it now.
ToolLookup = Callable[[str], Tool | None]


class ToolRouter:
    def __init__(
        self,
        rules: Rules,
        registry: Registry,
        health: HealthLookup,
        backends: BackendLookup | None = None,
        notice: RuleNotice | None = None,
    ) -> None:
        self.waiting = rules.check_against(registry)
        self._rules = rules
        self._registry = registry
        self._health = health
        self._backends = backends
        self._notice = notice
        # Backend tools whose current contract lacks a property the rules extract.
        self._unfit: dict[str, str] = {}

    @property
    def rules(self) -> Rules:
        return self._rules

    def _tool(self, name: str, tenant: str, lookup: ToolLookup | None) -> Tool | None:
        """The tool a rule names, as the caller's tenant sees it (None: not routable now)."""
        if lookup is not None:
            tool = lookup(name)
        elif "." not in name:
            tool = self._registry.latest(name)
        else:
            tool = self._backends(tenant, name) if self._backends is not None else None
        if tool is None or "." not in name:
            return tool
        fingerprint = tool.origin.fingerprint if tool.origin else ""
        if self._unfit.get(name) == fingerprint:
            return None
        unknown = self._rules.unknown_groups(name, tool.spec.input_schema)
        if unknown:
            self._unfit[name] = fingerprint
            if self._notice is not None:
                self._notice(name, f"extraction groups {sorted(unknown)} are not input properties")
            return None
        return tool

    def _arguments(
        self, tool: Tool, tool_rules: ToolRules, rewritten: str
    ) -> tuple[dict[str, Any], str]:
        """Arguments from the first extraction whose captures are whole tokens; when every
        match would cut a token, no arguments and the reason (the tool is then vetoed)."""
        cut = ""
        for extracted in tool_rules.extractions(rewritten):
            token = fragment(extracted)
            if not token:
                return coerce(extracted.groups, tool.spec.input_schema), ""
            cut = cut or token
        return {}, (f"an argument would be cut out of {cut!r}" if cut else "")

    def _score(self, tool: Tool, tool_rules: ToolRules, prompt: str, veto: str) -> Candidate:
        rewritten = tool_rules.rewrite(prompt)
        veto = veto or tool_rules.veto(prompt)
        arguments, cut = self._arguments(tool, tool_rules, rewritten)
        veto = veto or cut
        intent = 0.0 if veto else tool_rules.intent(rewritten)
        fit = schema_fit(tool.input_validator, arguments)
        health = min(1.0, max(0.0, self._health(tool.spec.name, tool.spec.version)))
        return Candidate(
            tool=tool,
            intent=intent,
            schema_fit=fit,
            health=health,
            confidence=confidence(self._rules.weights, intent, fit, health),
            arguments=arguments,
            vetoed=veto,
        )

    def route(
        self,
        prompt: str,
        allowed_tools: Iterable[str],
        tenant: str = "",
        lookup: ToolLookup | None = None,
    ) -> Decision:
        """Score every allowed tool; CPU-bound (RE2 and JSON Schema), linear in the prompt.

        Backend tools take part when rules name them and the caller's tenant sees them.
        ``lookup`` gives the version of each tool that serves this caller (default: the
        latest release of a built-in tool, the served version of a backend tool)."""
        allowed = list(allowed_tools)
        prompt = prompt.translate(_SPACES)
        veto = self._rules.veto(prompt)
        candidates = []
        for name, tool_rules in self._rules.tools.items():
            if not is_allowed(name, allowed):
                continue
            tool = self._tool(name, tenant, lookup)
            if tool is not None:
                candidates.append(self._score(tool, tool_rules, prompt, veto))
        candidates.sort(key=lambda c: (-c.confidence, c.tool.spec.name))
        threshold = self._rules.threshold
        version = self._rules.version
        if not candidates:
            reason = "no tool is allowed for this caller"
            return Decision(False, [], threshold, version, reason)
        best = candidates[0]
        parts = (
            f"intent {best.intent:.2f}, schema fit {best.schema_fit:.2f}, health {best.health:.2f}"
        )
        confident = [c for c in candidates if c.confidence >= threshold]
        if len(confident) > 1:
            scores = ", ".join(f"{c.tool.spec.name} {c.confidence:.2f}" for c in confident)
            reason = (
                f"the prompt asks for more than one tool ({scores} all reach the threshold "
                f"{threshold:.2f}); ask one thing at a time"
            )
            return Decision(False, candidates, threshold, version, reason)
        if confident:
            reason = (
                f"{best.tool.spec.name} scored {best.confidence:.2f} >= threshold "
                f"{threshold:.2f} ({parts})"
            )
            return Decision(True, candidates, threshold, version, reason)
        why = f"; {best.vetoed}" if best.vetoed else ""
        reason = (
            f"no tool is confident enough: the best, {best.tool.spec.name}, scored "
            f"{best.confidence:.2f} < threshold {threshold:.2f} ({parts}){why}"
        )
        return Decision(False, candidates, threshold, version, reason)


class RoutingBusyError(Exception):
    """Too many long prompts are waiting to be scored; the caller should retry later."""


class RoutePool:
    """Where Route's scoring runs: short prompts on the event loop, long ones on a small pool.

    Scoring is CPU work (RE2 matching, rewrites, JSON Schema checks) linear in the prompt:
    measured here about 0.15 ms for an everyday prompt and up to 25 ms for an 8,000-character
    prompt built to hit every rewrite. Handing a prompt to a thread costs about 0.08 ms more
    than scoring it inline, so short prompts (at most ``inline_chars``, at worst about 2 ms)
    stay on the loop and longer ones go to ``threads`` worker threads. RE2 releases the GIL
    while it matches; the Python around it does not, but a worker holds the GIL for at most
    the interpreter's switch interval (5 ms) at a time, so the loop keeps answering other
    Route calls while a long prompt is scored. At most ``max_waiting`` long prompts wait for
    a thread: beyond that RoutingBusyError (RESOURCE_EXHAUSTED) rather than an unbounded
    queue, and a waiting prompt whose caller gave up is dropped before it runs.
    """

    def __init__(
        self,
        router: ToolRouter,
        *,
        inline_chars: int = 512,
        threads: int = 2,
        max_waiting: int = 64,
    ) -> None:
        self._router = router
        self._inline_chars = inline_chars
        self._max_waiting = max_waiting
        self._pending = 0
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="route")

    async def route(
        self,
        prompt: str,
        allowed_tools: Iterable[str],
        tenant: str = "",
        *,
        router: ToolRouter | None = None,
        lookup: ToolLookup | None = None,
    ) -> Decision:
        """Score with ``router`` (a rules version; default the pool's own) and ``lookup``."""
        allowed = list(allowed_tools)
        scorer = router or self._router
        if len(prompt) <= self._inline_chars:
            return scorer.route(prompt, allowed, tenant, lookup)
        if self._pending >= self._max_waiting:
            raise RoutingBusyError(f"{self._pending} long prompts are already being routed")
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._executor, scorer.route, prompt, allowed, tenant, lookup
            )
        finally:
            self._pending -= 1

    async def close(self) -> None:
        """Drop waiting prompts; a prompt being scored finishes on its own (milliseconds)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
