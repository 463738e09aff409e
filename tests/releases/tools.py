"""Router plugin for the release tests and the release drill: versions of one tool, good and
bad, and a write tool that records every execution.

Loaded into a real router with TOOLMESH_ROUTER_PLUGIN_MODULES=tests.releases.tools (or through
the build hook in-process) and routed by the rules ``rules_with_release_tools`` writes:
"echo WORD" runs echo_word, "mark WORD" runs release_mark.

echo_word:
- 1.0.0 the first (stable on first boot when it is the only version);
- 1.1.0 a good candidate: the same answers;
- 1.2.0 bad: one call in five fails (the tool's fault);
- 1.3.0 bad: 200 ms slower;
- 1.4.0 declares an example it does not pass;
- 2.0.0 breaking: a new required input.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from pathlib import Path
from typing import Any

from services.router.registry import Example, SideEffect, ToolContext, ToolOutput, ToolSpec
from services.router.settings import DEFAULT_RULES_FILE

# Where release_mark appends one line per execution (the router's env); unset: CALLS.
LOG_ENV = "TOOLMESH_RELEASE_TEST_LOG"
CALLS: list[str] = []
SLOW_S = 0.2
FAIL_EVERY = 5

_WORD = {"type": "string", "minLength": 1, "maxLength": 64}
_IN = {
    "type": "object",
    "properties": {"word": _WORD},
    "required": ["word"],
    "additionalProperties": False,
}
_OUT = {
    "type": "object",
    "properties": {"word": {"type": "string"}},
    "required": ["word"],
    "additionalProperties": False,
}
_EXAMPLES = (
    Example({"word": "apple"}, result={"word": "apple"}),
    Example({"word": "pear"}, answer_contains="pear"),
)


def _echo(version: str, **changes: Any) -> ToolSpec:
    fields: dict[str, Any] = {
        "name": "echo_word",
        "version": version,
        "description": "Say a word back.",
        "input_schema": _IN,
        "output_schema": _OUT,
        "side_effect": SideEffect.READ_ONLY,
        "cost_units": 1,
        "timeout_ms": 2000,
        "fallback_answer": "echo_word is not available right now.",
        "examples": _EXAMPLES,
        "max_concurrency": 64,
    }
    return ToolSpec(**{**fields, **changes})


async def echo(arguments: dict[str, Any], _ctx: ToolContext) -> ToolOutput:
    word = arguments["word"]
    return ToolOutput(answer=f"echo {word}", result={"word": word})


_calls = itertools.count()


async def echo_flaky(arguments: dict[str, Any], ctx: ToolContext) -> ToolOutput:
    """Fails one call in five (after four good ones, so its examples pass)."""
    if next(_calls) % FAIL_EVERY == FAIL_EVERY - 1:
        raise RuntimeError("release test: this version fails one call in five")
    return await echo(arguments, ctx)


async def echo_slow(arguments: dict[str, Any], ctx: ToolContext) -> ToolOutput:
    await asyncio.sleep(SLOW_S)
    return await echo(arguments, ctx)


async def echo_shouting(arguments: dict[str, Any], _ctx: ToolContext) -> ToolOutput:
    word = arguments["word"].upper()
    return ToolOutput(answer=f"echo {word}", result={"word": word})


async def mark(arguments: dict[str, Any], ctx: ToolContext) -> ToolOutput:
    """A write tool: one line per execution, so a test sees any call run twice."""
    line = f"{ctx.idempotency_key} {arguments['word']}"
    path = os.environ.get(LOG_ENV)
    if path:
        with Path(path).open("a", encoding="utf-8") as log:
            log.write(line + "\n")
    else:
        CALLS.append(line)
    return ToolOutput(answer=f"marked {arguments['word']}", result={"word": arguments["word"]})


def _mark(version: str) -> ToolSpec:
    return ToolSpec(
        name="release_mark",
        version=version,
        description="Record a word (a write).",
        input_schema=_IN,
        output_schema=_OUT,
        side_effect=SideEffect.WRITE,
        cost_units=1,
        timeout_ms=2000,
        fallback_answer="release_mark is not available right now.",
    )


STABLE_ONLY = [(_echo("1.0.0"), echo), (_mark("1.0.0"), mark)]

TOOLS = [
    *STABLE_ONLY,
    (_echo("1.1.0"), echo),
    (_echo("1.2.0"), echo_flaky),
    (_echo("1.3.0"), echo_slow),
    (
        _echo("1.4.0", examples=(Example({"word": "apple"}, result={"word": "apple"}),)),
        echo_shouting,
    ),
    (
        _echo(
            "2.0.0",
            input_schema={
                "type": "object",
                "properties": {"word": _WORD, "lang": {"type": "string"}},
                "required": ["word", "lang"],
                "additionalProperties": False,
            },
            examples=(),
        ),
        echo,
    ),
    (_mark("1.1.0"), mark),
]

_RULES = r"""
[tools.echo_word]
intents = [ { pattern = '^echo \w+$', score = 1.0 } ]
extract = [ '^echo (?P<word>\w+)$' ]

[tools.release_mark]
intents = [ { pattern = '^mark \w+$', score = 1.0 } ]
extract = [ '^mark (?P<word>\w+)$' ]
"""


def rules_with_release_tools(directory: Path) -> Path:
    """The published routing rules plus rules for these tools, as a new file."""
    path = directory / "routing-releases.toml"
    path.write_text(DEFAULT_RULES_FILE.read_text() + _RULES)
    return path
