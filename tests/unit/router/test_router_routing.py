"""Scoring, the rules file and routing of sample prompts, with the caller's allowlist."""

from __future__ import annotations

import asyncio
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from services.router.catalog import default_registry
from services.router.registry import Registry
from services.router.routing import (
    RoutePool,
    RoutingBusyError,
    ToolRouter,
    confidence,
    schema_fit,
)
from services.router.rules import RulesError, Weights, load_rules, parse_rules
from services.router.settings import DEFAULT_RULES_FILE


def packaged_rules() -> dict[str, Any]:
    return tomllib.loads(DEFAULT_RULES_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def router() -> ToolRouter:
    return ToolRouter(load_rules(DEFAULT_RULES_FILE), default_registry(), lambda _n, _v: 1.0)


def test_confidence_worked_example() -> None:
    weights = Weights(intent=0.5, schema=0.3, health=0.2)
    assert confidence(weights, intent=0.9, schema_fit=0.8, health=0.7) == pytest.approx(0.83)


def test_weights_not_summing_to_one_are_refused() -> None:
    data = packaged_rules()
    data["weights"] = {"intent": 0.5, "schema": 0.3, "health": 0.3}
    with pytest.raises(RulesError, match=r"weights must sum to 1, got 1\.1"):
        parse_rules(data)


def test_rules_file_with_bad_weights_is_refused_at_load(tmp_path: Path) -> None:
    text = DEFAULT_RULES_FILE.read_text(encoding="utf-8").replace("intent = 0.6", "intent = 0.7")
    path = tmp_path / "routing.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RulesError, match="must sum to 1"):
        load_rules(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"threshold": 0.4}, "must exceed schema \\+ health weights"),
        ({"threshold": 1.5}, "threshold"),
        ({"version": ""}, "version"),
        ({"surprise": 1}, "surprise"),
        (
            {"tools": {"calculator": {"intents": [{"pattern": "(", "score": 1}]}}},
            "calculator intent: pattern '\\(' is not valid RE2",
        ),
        (
            {"tools": {"calculator": {"intents": [{"pattern": "{nope}", "score": 1}]}}},
            "unknown set \\{nope\\}",
        ),
        (
            {
                "tools": {
                    "calculator": {
                        "intents": [{"pattern": "x", "score": 1}],
                        "rewrites": [{"pattern": "(a)b", "replace": "\\2"}],
                    }
                }
            },
            "refers to missing group 2",
        ),
        (
            {"tools": {"calculator": {"intents": [{"pattern": "x", "score": 0}]}}},
            "greater than 0",
        ),
        (
            {
                "tools": {
                    "calculator": {"intents": [{"pattern": "x", "score": 1}], "extract": ["\\d+"]}
                }
            },
            "no named group",
        ),
    ],
)
def test_inconsistent_rules_are_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(RulesError, match=message):
        parse_rules({**packaged_rules(), **change})


def test_missing_rules_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="cannot read routing rules"):
        load_rules(tmp_path / "absent.toml")


def test_rules_must_match_the_registry() -> None:
    data = packaged_rules()
    data["tools"]["weather"] = {"intents": [{"pattern": "weather", "score": 1}]}
    with pytest.raises(RulesError, match="'weather', which has no released version"):
        parse_rules(data).check_against(default_registry())
    data = packaged_rules()
    data["tools"]["calculator"]["extract"] = ["(?P<formula>\\d+)"]
    with pytest.raises(RulesError, match="'formula'"):
        parse_rules(data).check_against(default_registry())


@pytest.mark.parametrize(
    ("prompt", "tool", "arguments"),
    [
        ("what is 17 * 23", "calculator", {"expression": "17 * 23"}),
        ("What is 17 times 23?", "calculator", {"expression": "17 * 23"}),
        ("calculate (2 + 3) ** 2", "calculator", {"expression": "(2 + 3) ** 2"}),
        ("save a note: order more coffee", "save_note", {"text": "order more coffee"}),
        (
            "convert 5 miles to km",
            "unit_convert",
            {"value": "5", "from_unit": "miles", "to_unit": "km"},
        ),
        (
            "convert 10 km to miles",
            "unit_convert",
            {"value": "10", "from_unit": "km", "to_unit": "miles"},
        ),
        ("100 f in c", "unit_convert", {"value": "100", "from_unit": "f", "to_unit": "c"}),
        (
            "how many feet in 2.5 meters",
            "unit_convert",
            {"value": "2.5", "from_unit": "meters", "to_unit": "feet"},
        ),
        (
            "convert 1e308 km to miles",
            "unit_convert",
            {"value": "1e308", "from_unit": "km", "to_unit": "miles"},
        ),
        ("what is 1e400 * 2", "calculator", {"expression": "1e400 * 2"}),
        ("what is 2x3x4", "calculator", {"expression": "2 * 3 * 4"}),
        ("what time is it in Asia/Tokyo", "current_time", {"zone": "Asia/Tokyo"}),
        ("what time is it in Europe/Paris?", "current_time", {"zone": "Europe/Paris"}),
        ("time in Tokyo", "current_time", {"zone": "Tokyo"}),
        ("what time is it in new york?", "current_time", {"zone": "new york"}),
        ("show my notes", "list_notes", {}),
    ],
)
def test_sample_prompts_route_to_the_right_tool(
    router: ToolRouter, prompt: str, tool: str, arguments: dict[str, Any]
) -> None:
    decision = router.route(prompt, ["*"])
    assert decision.matched, decision.reason
    assert decision.best is not None
    assert decision.best.tool.spec.name == tool
    assert json.loads(decision.arguments_json) == arguments
    assert decision.best.confidence >= decision.threshold
    assert decision.rules_version == packaged_rules()["version"]
    scores = [c.confidence for c in decision.candidates]
    assert scores == sorted(scores, reverse=True)
    assert len(decision.candidates) == 5


@pytest.mark.parametrize("prompt", ["asdf qwerty zxcv", "I have 3 cats", "", "hello there"])
def test_prompts_without_intent_match_no_tool(router: ToolRouter, prompt: str) -> None:
    decision = router.route(prompt, ["*"])
    assert not decision.matched
    assert decision.arguments_json == ""
    assert decision.reason.startswith("no tool is confident enough")


def test_only_allowed_tools_are_scored(router: ToolRouter) -> None:
    decision = router.route("what is 17 * 23", ["unit_convert", "current_time"])
    assert {c.tool.spec.name for c in decision.candidates} == {"unit_convert", "current_time"}
    assert not decision.matched
    assert router.route("what is 17 * 23", ["calculator"]).matched


def test_an_empty_allowlist_allows_nothing(router: ToolRouter) -> None:
    decision = router.route("what is 17 * 23", [])
    assert not decision.matched
    assert decision.candidates == []
    assert decision.reason == "no tool is allowed for this caller"


def test_poor_health_lowers_confidence_below_the_threshold() -> None:
    registry = default_registry()
    rules = load_rules(DEFAULT_RULES_FILE)
    healthy = ToolRouter(rules, registry, lambda _n, _v: 1.0).route("time in Tokyo", ["*"])
    sick = ToolRouter(rules, registry, lambda _n, _v: 0.0).route("time in Tokyo", ["*"])
    assert healthy.best is not None and sick.best is not None
    assert healthy.best.confidence - sick.best.confidence == pytest.approx(0.15)
    assert sick.best.health == 0.0


def test_schema_fit_counts_the_share_of_required_properties_satisfied() -> None:
    validator = Draft202012Validator(
        {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "string"}},
            "required": ["a", "b"],
        }
    )
    assert schema_fit(validator, {"a": 1, "b": "x"}) == 1.0
    assert schema_fit(validator, {"a": 1}) == 0.5
    assert schema_fit(validator, {"a": "one", "b": "x"}) == 0.5
    assert schema_fit(validator, {}) == 0.0


def test_a_tool_without_rules_is_never_routed() -> None:
    registry: Registry = default_registry()
    data = packaged_rules()
    del data["tools"]["list_notes"]
    router = ToolRouter(parse_rules(data), registry, lambda _n, _v: 1.0)
    candidates = router.route("show my notes", ["*"]).candidates
    assert all(c.tool.spec.name != "list_notes" for c in candidates)


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("(?<=\\d)\\s*x\\s*(?=\\d)", "invalid perl operator: \\(\\?<"),
        ("(a)\\1", "invalid escape sequence: \\\\1"),
        ("(?P<n>a)(?P=n)", "invalid named capture group|invalid perl operator"),
    ],
)
def test_rules_refuse_patterns_re2_cannot_run_in_linear_time(
    tmp_path: Path, pattern: str, reason: str
) -> None:
    """Look-around and backreferences need a backtracking engine: refused at start-up."""
    text = DEFAULT_RULES_FILE.read_text(encoding="utf-8")
    rule = f"{{ pattern = '{pattern}', replace = ' * ' }},\n"
    path = tmp_path / "routing.toml"
    path.write_text(text.replace("rewrites = [\n", "rewrites = [\n  " + rule, 1), encoding="utf-8")
    with pytest.raises(RulesError) as caught:
        load_rules(path)
    message = str(caught.value)
    assert f"calculator rewrite: pattern {pattern!r} is not valid RE2" in message
    assert re.search(reason, message), message


def test_a_capture_that_would_cut_a_number_vetoes_the_tool() -> None:
    """Rules written the old way (a bare \\d+) must not turn 1e308 into 308."""
    data = packaged_rules()
    data["tools"]["unit_convert"] = {
        "intents": [{"pattern": "\\bconvert\\b", "score": 1.0}],
        "extract": ["(?P<value>\\d+)\\s*(?P<from_unit>[a-z]+) to (?P<to_unit>[a-z]+)"],
    }
    router = ToolRouter(parse_rules(data), default_registry(), lambda _n, _v: 1.0)
    decision = router.route("convert 1e308 km to miles", ["unit_convert"])
    assert not decision.matched
    assert decision.best is not None and decision.best.intent == 0.0
    assert "an argument would be cut out of '1e308'" in decision.reason
    whole = router.route("convert 5km to miles", ["unit_convert"])
    assert whole.matched, whole.reason
    assert json.loads(whole.arguments_json) == {"value": "5", "from_unit": "km", "to_unit": "miles"}


def test_a_prompt_two_tools_would_answer_is_declined() -> None:
    data = packaged_rules()
    data["tools"]["calculator"]["intents"].append({"pattern": "tokyo", "score": 1.0})
    router = ToolRouter(parse_rules(data), default_registry(), lambda _n, _v: 1.0)
    decision = router.route("what time is it in Tokyo", ["*"])
    assert not decision.matched and decision.arguments_json == ""
    assert decision.reason.startswith("the prompt asks for more than one tool (current_time 1.00")
    assert "calculator 0.75" in decision.reason


@pytest.mark.parametrize(
    ("prompt", "reason"),
    [
        ("don't convert 5 km to miles", "the prompt asks not to do something"),
        ("what is 2+2 and what time is it in Tokyo", "asks more than one thing"),
        ("what is 2026-11-29", "look like a date"),
        ("192.168.1.1/24", "look like an IP address"),
    ],
)
def test_vetoes_say_why_no_tool_was_picked(router: ToolRouter, prompt: str, reason: str) -> None:
    decision = router.route(prompt, ["*"])
    assert not decision.matched
    assert reason in decision.reason


def test_matching_is_case_insensitive_and_offsets_count_characters(router: ToolRouter) -> None:
    decision = router.route("SAVE A NOTE: café 東京 ✓ done", ["*"])
    assert json.loads(decision.arguments_json) == {"text": "café 東京 ✓ done"}
    # Spaces of any kind are spaces (RE2's \s alone is ASCII).
    spaced = router.route("convert\u00a05\u2009km to\u3000miles", ["*"])
    assert json.loads(spaced.arguments_json) == {
        "value": "5",
        "from_unit": "km",
        "to_unit": "miles",
    }
    # Digits of other scripts and letters glued to a number are not numbers.
    assert not router.route("what is ٣ + ٤", ["*"]).matched
    assert not router.route("what is 5 + 3é", ["*"]).matched


async def test_long_prompts_beyond_the_waiting_limit_are_refused_not_queued(
    router: ToolRouter,
) -> None:
    pool = RoutePool(router, inline_chars=10, threads=1, max_waiting=1)
    try:
        first = asyncio.create_task(pool.route("x" * 8000, ["*"]))
        await asyncio.sleep(0)
        with pytest.raises(RoutingBusyError, match="1 long prompts are already being routed"):
            await pool.route("y" * 8000, ["*"])
        assert not (await first).matched
        # Short prompts never wait for the pool.
        assert (await pool.route("2+2", ["*"])).matched
    finally:
        await pool.close()
