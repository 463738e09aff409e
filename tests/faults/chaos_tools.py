"""Router plugin for the fault suite: tools that hang, fail half their calls, or are slow.

Loaded into the real router process with TOOLMESH_ROUTER_PLUGIN_MODULES=tests.faults.chaos_tools
and routed by the rules in ``rules_with_chaos`` below.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

from services.router.registry import SideEffect, ToolContext, ToolOutput, ToolSpec
from services.router.settings import DEFAULT_RULES_FILE

_SCHEMA_IN = {
    "type": "object",
    "properties": {"word": {"type": "string", "maxLength": 64}},
    "required": ["word"],
    "additionalProperties": False,
}
_SCHEMA_OUT = {
    "type": "object",
    "properties": {"word": {"type": "string"}},
    "required": ["word"],
    "additionalProperties": False,
}


def _spec(name: str, description: str, timeout_ms: int) -> ToolSpec:
    return ToolSpec(
        name=name,
        version="0.1.0",
        description=description,
        input_schema=_SCHEMA_IN,
        output_schema=_SCHEMA_OUT,
        side_effect=SideEffect.READ_ONLY,
        cost_units=1,
        timeout_ms=timeout_ms,
        fallback_answer=f"{name} is not available right now.",
    )


async def _hang(arguments: dict[str, Any], ctx: ToolContext) -> ToolOutput:
    await asyncio.sleep(3600)
    raise AssertionError("unreachable")


_calls = itertools.count()


async def _flaky(arguments: dict[str, Any], ctx: ToolContext) -> ToolOutput:
    if next(_calls) % 2:
        raise RuntimeError("chaos: this call fails")
    return ToolOutput(answer=f"flaky says {arguments['word']}", result=dict(arguments))


async def _slow(arguments: dict[str, Any], ctx: ToolContext) -> ToolOutput:
    await asyncio.sleep(0.3)
    return ToolOutput(answer=f"slow says {arguments['word']}", result=dict(arguments))


TOOLS = [
    (_spec("chaos_hang", "Never answers.", timeout_ms=30_000), _hang),
    (_spec("chaos_flaky", "Fails every other call.", timeout_ms=2_000), _flaky),
    (_spec("chaos_slow", "Answers after 300 ms.", timeout_ms=2_000), _slow),
]

_RULES = r"""
[tools.chaos_hang]
intents = [ { pattern = '\bchaos hang\b', score = 1.0 } ]
extract = [ 'chaos hang (?P<word>\w+)' ]

[tools.chaos_flaky]
intents = [ { pattern = '\bchaos flaky\b', score = 1.0 } ]
extract = [ 'chaos flaky (?P<word>\w+)' ]

[tools.chaos_slow]
intents = [ { pattern = '\bchaos slow\b', score = 1.0 } ]
extract = [ 'chaos slow (?P<word>\w+)' ]
"""


def rules_with_chaos(directory: Path) -> Path:
    """The published routing rules plus rules for the chaos tools, as a new file."""
    path = directory / "routing-chaos.toml"
    path.write_text(DEFAULT_RULES_FILE.read_text() + _RULES)
    return path
