"""The model's turn at routing, and its phrasing of answers.

Routing: the model is shown only the caller's allowed tools (as function definitions, or as a
JSON-schema-constrained choice for servers without tool calling) and the session's recent turns
as context, and proposes one tool with arguments, or none. The proposal is scored like a rule's,
``C = a*I + b*S + c*H`` with the rules file's weights and threshold:

- I, how sure the model was of the tool. When the server returns token log-probabilities (JSON
  modes), I is the probability of the tool's name among the names it could have written: for
  each token of the name, exp(logprob) divided by the sum of exp(logprob) over that position's
  top alternatives that keep the text a prefix of an offered name (or "none"); I is the product
  over the name's tokens. Without log-probabilities, I is the routing prompt version's
  ``intent_without_logprobs`` (0.7 for the seeded version).
- S, how well the arguments fit the tool's input schema (services.router.routing.schema_fit);
  arguments that do not validate (S < 1) never run, whatever C is.
- H, the tool's recent success rate, as for rules.

A tool the model names that was not offered never runs; neither does anything the model says
change which tools are offered. Tool results and history reach the model in their own roles
(tool, user, assistant), never in the system prompt.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from services.router.models import tokens
from services.router.models.prompts import (
    ANSWER,
    DEFAULT_INTENT_WITHOUT_LOGPROBS,
    ROUTE_SYSTEM,
    Prompt,
    PromptStore,
)
from services.router.models.provider import Completion, Providers
from services.router.registry import Tool
from services.router.routing import confidence, schema_fit
from services.router.rules import Weights
from toolmesh.common.v1 import common_pb2

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletion

ToolChoice = Literal["tools", "json_schema", "json_object"]
NONE = "none"
# Arguments of the tool call shown to the answer model; larger ones are shown as {}.
ANSWER_ARGUMENTS_BYTES = 512
_FUNCTION_NAME = re.compile(r"[^a-zA-Z0-9_-]")
_ROLES = {common_pb2.TURN_ROLE_USER: "user", common_pb2.TURN_ROLE_ASSISTANT: "assistant"}


@dataclass(frozen=True)
class ModelSettings:
    tool_choice: ToolChoice
    # Longest a model call may take (never past the caller's deadline).
    timeout_s: float
    route_max_tokens: int
    answer_max_tokens: int
    max_history_tokens: int
    max_result_bytes: int
    max_tools: int
    top_logprobs: int
    temperature: float
    # Tenants whose Runs ask the model first (before the rules); "*" for every tenant.
    model_first: frozenset[str]
    # Tenants whose answers the model phrases; "*" for every tenant.
    phrased: frozenset[str]

    def model_first_for(self, tenant: str) -> bool:
        return "*" in self.model_first or tenant in self.model_first

    def phrased_for(self, tenant: str) -> bool:
        return "*" in self.phrased or tenant in self.phrased


@dataclass(frozen=True)
class Plan:
    """What a model call may cost at most, and the prompt it will use."""

    max_input_tokens: int
    max_output_tokens: int
    prompt: Prompt


@dataclass(frozen=True)
class Usage:
    model: str
    provider: str
    input_tokens: int
    output_tokens: int
    duration_ms: float
    reported: bool
    prompt: Prompt


@dataclass(frozen=True)
class Proposal:
    """The model's scored proposal; ``matched`` only when it may run."""

    matched: bool
    reason: str
    usage: Usage
    tool: Tool | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    intent: float = 0.0
    schema_fit: float = 0.0
    health: float = 0.0
    confidence: float = 0.0


def function_names(tools: Sequence[Tool]) -> dict[str, Tool]:
    """Names the Chat Completions API accepts (``[a-zA-Z0-9_-]{1,64}``) for the tools, each
    unique: "time.get_current_time" becomes "time_get_current_time"."""
    names: dict[str, Tool] = {}
    for tool in tools:
        base = _FUNCTION_NAME.sub("_", tool.spec.name)[:60] or "tool"
        name, n = base, 1
        while name in names or name == NONE:
            n += 1
            name = f"{base[:56]}_{n}"
        names[name] = tool
    return names


def _tool_list(tools: Iterable[Tool]) -> str:
    return "\n".join(
        f"- {t.spec.name}: {' '.join(t.spec.description.split()) or 'no description'}"
        for t in tools
    )


def _cut_history(history: Sequence[common_pb2.Turn], budget: int) -> list[dict[str, str]]:
    """The most recent turns whose bound fits in ``budget`` tokens, oldest first."""
    kept: list[dict[str, str]] = []
    for turn in reversed(history):
        role = _ROLES.get(turn.role)
        if role is None or not turn.content:
            continue
        message = {"role": role, "content": turn.content}
        cost = tokens.message_bound(message)
        if cost > budget:
            break
        budget -= cost
        kept.append(message)
    kept.reverse()
    return kept


def name_confidence(
    logprobs: Sequence[Any], content: str, start: int, end: int, names: Iterable[str]
) -> float | None:
    """I from the tokens spanning content[start:end] (the name's value), renormalized over the
    alternatives that could still spell an allowed name; None when the tokens do not line up
    with the content (then the prompt version's constant applies)."""
    valid = set(names)
    texts = [getattr(t, "token", "") for t in logprobs]
    if "".join(texts) != content:
        return None
    offset, probability, seen = 0, 1.0, False
    for entry, text in zip(logprobs, texts, strict=True):
        token_start, token_end = offset, offset + len(text)
        offset = token_end
        if token_end <= start or token_start >= end:
            continue
        seen = True
        lead = content[token_start:start] if token_start < start else ""
        before = content[start:token_start] if token_start > start else ""
        alternatives = {text: entry.logprob}
        for alternative in getattr(entry, "top_logprobs", None) or []:
            alternatives.setdefault(alternative.token, alternative.logprob)
        total = 0.0
        for candidate, logprob in alternatives.items():
            if not candidate.startswith(lead):
                continue
            spelled = before + candidate[len(lead) :]
            if '"' in spelled:
                fits = spelled.split('"', 1)[0] in valid
            else:
                fits = any(name.startswith(spelled) for name in valid)
            if fits:
                total += math.exp(logprob)
        if total <= 0:
            return None
        probability *= math.exp(entry.logprob) / total
    return min(1.0, max(0.0, probability)) if seen else None


class ModelRouter:
    def __init__(
        self,
        providers: Providers,
        prompts: PromptStore,
        settings: ModelSettings,
        *,
        weights: Weights,
        threshold: float,
        health: Callable[[str, str], float],
        clock: Callable[[], float],
    ) -> None:
        self.providers = providers
        self._prompts = prompts
        self.settings = settings
        # The rules file's weights and threshold: model proposals are scored like rules.
        self._weights = weights
        self._threshold = threshold
        self._health = health
        self._clock = clock

    @property
    def model(self) -> str:
        return self.providers.primary.model

    @property
    def fallback_model(self) -> str:
        fallback = self.providers.fallback
        return fallback.model if fallback is not None else ""

    def offer(self, tools: Sequence[Tool]) -> list[Tool]:
        return sorted(tools, key=lambda t: t.spec.name)[: self.settings.max_tools]

    # -- routing ------------------------------------------------------------------------------

    def _route_body(
        self, prompt: Prompt, offered: Sequence[Tool], text: str, history: list[dict[str, str]]
    ) -> tuple[dict[str, Any], dict[str, Tool]]:
        system = prompt.render(tools=_tool_list(offered))
        messages = [
            {"role": "system", "content": system},
            *history,
            {"role": "user", "content": text},
        ]
        body: dict[str, Any] = {
            "messages": messages,
            "max_tokens": self.settings.route_max_tokens,
            "temperature": self.settings.temperature,
        }
        mode = self.settings.tool_choice
        if mode == "tools":
            aliases = function_names(offered)
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": alias,
                        "description": tool.spec.description,
                        "parameters": dict(tool.spec.input_schema),
                    },
                }
                for alias, tool in aliases.items()
            ]
            return body, aliases
        choices: list[dict[str, Any]] = [
            {
                "type": "object",
                "properties": {
                    "tool": {"const": t.spec.name},
                    "arguments": dict(t.spec.input_schema),
                },
                "required": ["tool", "arguments"],
            }
            for t in offered
        ]
        choices.append(
            {"type": "object", "properties": {"tool": {"const": NONE}}, "required": ["tool"]}
        )
        schema = {"anyOf": choices}
        if mode == "json_schema":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "tool_choice", "schema": schema},
            }
        else:
            body["response_format"] = {"type": "json_object", "schema": schema}
        if self.settings.top_logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = self.settings.top_logprobs
        return body, {t.spec.name: t for t in offered}

    async def route_plan(
        self, tenant: str, offered: Sequence[Tool], text: str, *, session: str = ""
    ) -> Plan:
        """The bound of the routing call for ``text`` (history cut to its own bound), with
        the routing prompt version that serves (tenant, session)."""
        prompt = await self._prompts.selected(tenant, ROUTE_SYSTEM, session)
        body, _ = self._route_body(prompt, offered, text, [])
        bound = tokens.request_bound(body["messages"], body.get("tools"))
        return Plan(
            bound + self.settings.max_history_tokens, self.settings.route_max_tokens, prompt
        )

    async def propose(
        self,
        tenant: str,
        offered: Sequence[Tool],
        text: str,
        history: Sequence[common_pb2.Turn],
        deadline: float,
        *,
        session: str = "",
    ) -> Proposal:
        """Ask the model; raises ModelUnavailableError/ModelRefusedError when it cannot."""
        prompt = await self._prompts.selected(tenant, ROUTE_SYSTEM, session)
        turns = _cut_history(history, self.settings.max_history_tokens)
        body, names = self._route_body(prompt, offered, text, turns)
        completion = await self.providers.complete(body, deadline)
        usage = self._usage(completion, prompt, body)
        return self._score(completion.response, names, prompt, usage)

    def _usage(self, completion: Completion, prompt: Prompt, body: Mapping[str, Any]) -> Usage:
        reported = completion.response.usage
        if reported is not None:
            used_in, used_out = reported.prompt_tokens, reported.completion_tokens
        else:  # charged at the bound: never less than it may have used
            used_in = tokens.request_bound(body["messages"], body.get("tools"))
            used_out = int(body["max_tokens"])
        return Usage(
            model=completion.model,
            provider=completion.provider,
            input_tokens=used_in,
            output_tokens=used_out,
            duration_ms=completion.duration_s * 1000,
            reported=reported is not None,
            prompt=prompt,
        )

    def _parse(
        self, response: ChatCompletion, names: Mapping[str, Tool]
    ) -> tuple[str, Any, tuple[int, int] | None] | str:
        """(chosen name, arguments, span of the name in the content) or why it is malformed."""
        if not response.choices:
            return "the model answered no choice"
        message = response.choices[0].message
        if self.settings.tool_choice == "tools":
            calls = message.tool_calls or []
            if not calls:
                return (NONE, {}, None)
            function = getattr(calls[0], "function", None)
            if function is None:
                return "the model's tool call has no function"
            try:
                arguments = json.loads(function.arguments or "{}")
            except ValueError:
                return f"the model's arguments for {function.name[:64]} are not valid JSON"
            return (function.name, arguments, None)
        content = message.content or ""
        try:
            data = json.loads(content)
        except ValueError:
            finish = response.choices[0].finish_reason
            cut = " (cut off at max_tokens)" if finish == "length" else ""
            return f"the model's answer is not valid JSON{cut}"
        if not isinstance(data, dict) or not isinstance(data.get("tool"), str):
            return 'the model\'s answer has no "tool" name'
        name = data["tool"]
        span = _value_span(content, name)
        return (name, data.get("arguments", {}), span)

    def _score(
        self, response: ChatCompletion, names: Mapping[str, Tool], prompt: Prompt, usage: Usage
    ) -> Proposal:
        parsed = self._parse(response, names)
        if isinstance(parsed, str):
            return Proposal(False, f"{parsed}; no tool runs", usage)
        name, arguments, span = parsed
        if name == NONE:
            return Proposal(False, "the model chose no tool", usage)
        tool = names.get(name)
        if tool is None:
            return Proposal(
                False,
                f"the model named {name[:64]!r}, which is not among the caller's allowed tools; "
                "nothing runs",
                usage,
            )
        intent = None
        choice = response.choices[0]
        content_logprobs = choice.logprobs.content if choice.logprobs is not None else None
        if span is not None and content_logprobs:
            intent = name_confidence(
                content_logprobs, choice.message.content or "", *span, [*names, NONE]
            )
        if intent is None:
            intent = float(
                prompt.params.get("intent_without_logprobs", DEFAULT_INTENT_WITHOUT_LOGPROBS)
            )
        fit = schema_fit(tool.input_validator, arguments) if isinstance(arguments, dict) else 0.0
        health = min(1.0, max(0.0, self._health(tool.spec.name, tool.spec.version)))
        threshold = self._threshold
        score = confidence(self._weights, intent, fit, health)
        parts = f"intent {intent:.2f}, schema fit {fit:.2f}, health {health:.2f}"
        arguments = arguments if isinstance(arguments, dict) else {}
        scored = Proposal(False, "", usage, tool, arguments, intent, fit, health, score)
        if fit < 1.0:
            problem = _first_error(tool, arguments)
            reason = (
                f"the model proposed {tool.spec.name} with arguments that do not fit its input "
                f"schema ({problem}); nothing runs"
            )
            return replace(scored, reason=reason)
        if score < threshold:
            reason = (
                f"the model proposed {tool.spec.name}, which scored {score:.2f} < threshold "
                f"{threshold:.2f} ({parts})"
            )
            return replace(scored, reason=reason)
        reason = (
            f"the model chose {tool.spec.name}, which scored {score:.2f} >= threshold "
            f"{threshold:.2f} ({parts})"
        )
        return replace(scored, matched=True, reason=reason)

    # -- answers ------------------------------------------------------------------------------

    def _answer_body(
        self, prompt: Prompt, text: str, tool_name: str, arguments_json: str, result: str
    ) -> dict[str, Any]:
        alias = _FUNCTION_NAME.sub("_", tool_name)[:64] or "tool"
        if len(arguments_json.encode()) > ANSWER_ARGUMENTS_BYTES:
            arguments_json = "{}"
        return {
            "messages": [
                {"role": "system", "content": prompt.render(tool_name=tool_name)},
                {"role": "user", "content": text},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "id": "call_0",
                            "type": "function",
                            "function": {"name": alias, "arguments": arguments_json or "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_0", "content": result},
            ],
            "max_tokens": self.settings.answer_max_tokens,
            "temperature": self.settings.temperature,
        }

    async def answer_plan(
        self, tenant: str, text: str, tool_name: str, *, session: str = ""
    ) -> Plan:
        """The bound of phrasing an answer to ``text`` from a result of at most
        ``max_result_bytes`` (a longer result is cut) and arguments of at most
        ANSWER_ARGUMENTS_BYTES."""
        prompt = await self._prompts.selected(tenant, ANSWER, session)
        placeholder_args = "x" * ANSWER_ARGUMENTS_BYTES
        # Before the tool is known (a model will pick it), a name as long as any can be.
        body = self._answer_body(prompt, text, tool_name or "x" * 128, placeholder_args, "")
        bound = tokens.request_bound(body["messages"]) + ANSWER_ARGUMENTS_BYTES
        return Plan(bound + self.settings.max_result_bytes, self.settings.answer_max_tokens, prompt)

    def tool_result(self, answer: str, result_json: str) -> str:
        """What the answer model sees of the tool's result: the structured result when it fits
        in ``max_result_bytes``, else the tool's own answer, cut to fit."""
        limit = self.settings.max_result_bytes
        if result_json and len(result_json.encode()) <= limit:
            return result_json
        return answer.encode()[:limit].decode("utf-8", "ignore")

    async def phrase(
        self,
        tenant: str,
        *,
        text: str,
        tool_name: str,
        arguments_json: str,
        answer: str,
        result_json: str,
        model: str,
        deadline: float,
        session: str = "",
    ) -> AsyncIterator[str | Usage]:
        """Pieces of the answer as they come, then its Usage; stopping early (the caller went
        away) closes the stream, which stops the server's generation."""
        plan = await self.answer_plan(tenant, text, tool_name, session=session)
        prompt = plan.prompt
        body = self._answer_body(
            prompt, text, tool_name, arguments_json, self.tool_result(answer, result_json)
        )
        started = self._clock()
        pieces = 0
        provider_name, model_name = "", model
        reported: tuple[int, int] | None = None
        async for provider, chunk in self.providers.stream(body, deadline, model):
            provider_name, model_name = provider.name, provider.model
            if chunk.usage is not None:
                reported = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
            for choice in chunk.choices:
                piece = choice.delta.content if choice.delta is not None else None
                if piece:
                    pieces += 1
                    yield piece
        if reported is None:
            # No usage in the stream (llama.cpp's server): the input at its bound, the output
            # as the pieces streamed (one token each on the servers that omit usage).
            reported_in, reported_out = tokens.request_bound(body["messages"]), pieces
        else:
            reported_in, reported_out = reported
        yield Usage(
            model=model_name,
            provider=provider_name,
            input_tokens=reported_in,
            output_tokens=reported_out,
            duration_ms=(self._clock() - started) * 1000,
            reported=reported is not None,
            prompt=prompt,
        )


def _value_span(content: str, name: str) -> tuple[int, int] | None:
    """Where the value of "tool" (``name``) is written in the JSON text."""
    match = re.search(r'"tool"\s*:\s*"', content)
    if match is None:
        return None
    start = match.end()
    end = start + len(name)
    return (start, end) if content[start:end] == name else None


def _first_error(tool: Tool, arguments: Mapping[str, Any]) -> str:
    errors = sorted(tool.input_validator.iter_errors(arguments), key=lambda e: e.json_path)
    if not errors:
        return "not an object"
    error = errors[0]
    where = error.json_path.removeprefix("$") or "arguments"
    return f"{where.lstrip('.') or 'arguments'}: {error.validator} failed"
