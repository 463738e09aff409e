"""Upper bounds on the tokens a model call can use, known before the call.

Budgets reserve a request's tokens before its model call and commit what the provider reports
after it; a reservation that is an upper bound keeps concurrent requests from passing a token
limit together. The bound used: every token of a prompt covers at least one byte of its text
(true of byte-level BPE and of SentencePiece with byte fallback, the tokenizers of today's
models), plus at most ``MESSAGE_OVERHEAD`` tokens of chat template per message and
``REQUEST_OVERHEAD`` per request (role markers, BOS, the generation prompt). Output is bounded by
the ``max_tokens`` the router asks for.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

MESSAGE_OVERHEAD = 16
REQUEST_OVERHEAD = 32


def text_bound(text: str) -> int:
    return len(text.encode("utf-8"))


def message_bound(message: Mapping[str, Any]) -> int:
    """A message's content, its tool calls (as the JSON sent) and the template around it."""
    total = MESSAGE_OVERHEAD + text_bound(str(message.get("content") or ""))
    calls = message.get("tool_calls")
    if calls:
        total += text_bound(json.dumps(calls, separators=(",", ":")))
    return total


def request_bound(messages: Iterable[Mapping[str, Any]], tools: object = None) -> int:
    """Input tokens a request can use at most; ``tools`` (function definitions) count as the
    JSON sent, which servers render into the prompt."""
    total = REQUEST_OVERHEAD + sum(message_bound(m) for m in messages)
    if tools:
        total += text_bound(json.dumps(tools, separators=(",", ":")))
    return total
