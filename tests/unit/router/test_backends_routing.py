"""routing.toml rules may name backend tools: a rule for a tool no backend serves yet does not
stop start-up, and applies (for the tenants that see the tool) once a backend serves it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from services.router.settings import DEFAULT_RULES_FILE
from tests.unit.router.backend_helpers import ADMIN, OTHER, SCRIPTS, register, stdio_backend
from tests.unit.router.harness import router_settings, start_router
from toolmesh.router.v1 import router_pb2

RULE = """
[tools."dict.lookup"]
intents = [{ pattern = '^\\s*look\\s+up\\s+\\w+\\s*$', score = 1.0 }]
extract = ['^\\s*look\\s+up\\s+(?P<word>\\w+)']
"""


async def route(stub: object, prompt: str, caller: object = ADMIN) -> router_pb2.RouteResponse:
    return await stub.Route(  # type: ignore[attr-defined]
        router_pb2.RouteRequest(caller=caller, prompt=prompt, allowed_tools=["*"]), timeout=5
    )


async def test_a_rule_for_a_backend_tool_waits_for_it_then_routes(tmp_path: Path) -> None:
    rules = tmp_path / "routing.toml"
    rules.write_text(DEFAULT_RULES_FILE.read_text() + RULE)
    async for router in start_router(router_settings(tmp_path / "data", rules_file=rules)):
        before = await route(router.stub, "look up apple")
        assert not before.matched
        state = tmp_path / "dict.json"
        state.write_text("{}")
        await register(
            router.stub,
            stdio_backend("dict", [sys.executable, str(SCRIPTS / "scripted.py"), str(state)]),
        )
        after = await route(router.stub, "look up apple")
        assert after.matched, after.reason
        assert after.tool.name == "dict.lookup" and after.tool.backend == "dict"
        assert json.loads(after.arguments_json) == {"word": "apple"}
        # Another tenant does not see the backend: the rule does not apply for it.
        assert not (await route(router.stub, "look up apple", OTHER)).matched
