"""The router's model path against the suite's scripted OpenAI-compatible server: the plan before
the call, proposals scored C = a*I + b*S + c*H and refused when they must be, the provider's
failure modes (down, 429 with Retry-After, slow, breaker, fallback), the API key's hygiene,
phrased answers, and prompt versions."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from tests.modelfake import FakeModel, Reply, choice_json, closed_port
from tests.unit.router.harness import CALLER, RouterServer, router_settings, start_router
from toolmesh.common.v1 import common_pb2
from toolmesh.router.v1 import router_pb2

NO_RULE = "could you tally my groceries"  # no rule matches it
ALLOWED = ["calculator", "save_note", "list_notes"]


@pytest.fixture
async def model() -> AsyncIterator[FakeModel]:
    fake = await FakeModel().start()
    yield fake
    await fake.stop()


async def _router(tmp_path: Path, fake: FakeModel, **overrides: Any) -> AsyncIterator[RouterServer]:
    values: dict[str, Any] = {
        "model_base_url": fake.base_url,
        "model_name": "test-model",
        "model_tool_choice": "json_object",
        **overrides,
    }
    async for server in start_router(router_settings(tmp_path, **values)):
        yield server


@pytest.fixture
async def router(tmp_path: Path, model: FakeModel) -> AsyncIterator[RouterServer]:
    async for server in _router(tmp_path, model):
        yield server


def _ask(prompt: str = NO_RULE, allow_model: bool = True, **fields: Any) -> router_pb2.RouteRequest:
    return router_pb2.RouteRequest(
        caller=CALLER,
        request_id="r1",
        prompt=prompt,
        allowed_tools=fields.pop("allowed_tools", ALLOWED),
        allow_model=allow_model,
        **fields,
    )


async def test_rules_miss_answers_the_plan_of_a_model_call_without_calling_it(
    router: RouterServer, model: FakeModel
) -> None:
    reply = await router.stub.Route(_ask(allow_model=False), timeout=5)
    assert not reply.matched and reply.method == router_pb2.ROUTE_METHOD_RULES
    plan = reply.model_plan
    assert plan.model == "test-model" and plan.max_output_tokens == 128
    # The bound covers the system prompt, the tools and the prompt, plus the history allowance.
    assert plan.max_input_tokens > 1024 + len(NO_RULE)
    assert (plan.prompt.name, plan.prompt.version) == ("route-system", 1)
    assert len(plan.prompt.digest) == 64
    assert model.requests == []


async def test_a_rules_match_never_asks_the_model(router: RouterServer, model: FakeModel) -> None:
    reply = await router.stub.Route(_ask("what is 17 * 23", allow_model=False), timeout=5)
    assert reply.matched and reply.method == router_pb2.ROUTE_METHOD_RULES
    assert not reply.HasField("model_plan") and model.requests == []


async def test_the_model_picks_an_allowed_tool_scored_from_its_log_probabilities(
    router: RouterServer, model: FakeModel
) -> None:
    content = choice_json("calculator", {"expression": "12*3"})
    start = content.index("calculator")
    # The name's token: 0.6 against "save_note" at 0.2 and "sure" (not a tool name) at 0.2.
    logprobs = [
        (content[:start], 0.0, []),
        ("calculator", math.log(0.6), [("save_note", math.log(0.2)), ("sure", math.log(0.2))]),
        (content[start + len("calculator") :], 0.0, []),
    ]
    model.then(Reply(content=content, logprobs=logprobs, usage=(321, 17)))
    history = [
        common_pb2.Turn(role=common_pb2.TURN_ROLE_USER, content="earlier question"),
        common_pb2.Turn(role=common_pb2.TURN_ROLE_ASSISTANT, content="earlier answer"),
    ]
    reply = await router.stub.Route(_ask(history=history), timeout=5)
    assert reply.matched and reply.method == router_pb2.ROUTE_METHOD_MODEL
    assert reply.tool.name == "calculator" and json.loads(reply.arguments_json) == {
        "expression": "12*3"
    }
    # I = 0.6 / (0.6 + 0.2): "sure" could not spell an offered name.
    assert reply.parts.intent == pytest.approx(0.75)
    assert (reply.parts.schema_fit, reply.parts.health) == (1.0, 1.0)
    assert reply.confidence == pytest.approx(0.6 * 0.75 + 0.25 + 0.15)
    usage = reply.model_usage
    assert (usage.input_tokens, usage.output_tokens, usage.reported) == (321, 17, True)
    assert (usage.model, usage.provider, usage.prompt.name) == (
        "test-model",
        "primary",
        "route-system",
    )
    sent = model.requests[-1]
    # History is data in its own roles; the system prompt lists only the allowed tools.
    roles = [m["role"] for m in sent["messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    system = sent["messages"][0]["content"]
    assert "- calculator:" in system and "current_time" not in system
    assert "earlier answer" not in system
    offered = [c["properties"]["tool"]["const"] for c in sent["response_format"]["schema"]["anyOf"]]
    assert offered == [*ALLOWED[:1], "list_notes", "save_note", "none"]
    assert sent["logprobs"] is True and sent["max_tokens"] == 128


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (Reply(content=choice_json("delete_everything", {})), "not among the caller's allowed"),
        (Reply(content=choice_json("current_time", {})), "not among the caller's allowed"),
        (Reply(content=choice_json("calculator", {"expr": 1})), "do not fit its input schema"),
        (Reply(content='{"tool": "calcul', finish_reason="length"), "cut off at max_tokens"),
        (Reply(content='["calculator"]'), 'no "tool" name'),
        (Reply(content=choice_json("none", {})), "the model chose no tool"),
    ],
    ids=["unknown-tool", "disallowed-tool", "schema-invalid", "malformed", "no-name", "none"],
)
async def test_what_must_never_run_does_not(
    router: RouterServer, model: FakeModel, reply: Reply, reason: str
) -> None:
    model.then(reply)
    routed = await router.stub.Route(_ask(), timeout=5)
    assert not routed.matched and not routed.HasField("tool") and routed.arguments_json == ""
    assert reason in routed.reason
    # The model's tokens are still reported: they were spent.
    assert routed.model_usage.input_tokens == 40


async def test_the_threshold_still_refuses_an_unsure_model(
    router: RouterServer, model: FakeModel
) -> None:
    content = choice_json("calculator", {"expression": "1+1"})
    start = content.index("calculator")
    logprobs = [
        (content[:start], 0.0, []),
        ("calculator", math.log(0.1), [("list_notes", math.log(0.9))]),
        (content[start + len("calculator") :], 0.0, []),
    ]
    model.then(Reply(content=content, logprobs=logprobs))
    routed = await router.stub.Route(_ask(), timeout=5)
    assert routed.parts.intent == pytest.approx(0.1)
    assert routed.confidence == pytest.approx(0.6 * 0.1 + 0.4)
    assert not routed.matched and "< threshold 0.60" in routed.reason


async def test_without_log_probabilities_intent_is_the_prompt_versions_constant(
    tmp_path: Path, model: FakeModel
) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "list_notes", "arguments": '{"limit": 3}'},
    }
    model.then(Reply(content="", tool_calls=[call]))
    async for router in _router(tmp_path, model, model_tool_choice="tools"):
        routed = await router.stub.Route(_ask(), timeout=5)
    assert routed.matched and routed.tool.name == "list_notes"
    assert routed.parts.intent == pytest.approx(0.7)  # route-system@1's intent_without_logprobs
    sent = model.requests[-1]
    assert [t["function"]["name"] for t in sent["tools"]] == [
        "calculator",
        "list_notes",
        "save_note",
    ]
    assert "response_format" not in sent and "logprobs" not in sent


async def test_429_with_retry_after_is_retried_when_it_fits_in_the_deadline(
    router: RouterServer, model: FakeModel
) -> None:
    model.then(
        Reply(status=429, headers={"Retry-After": "1"}),
        Reply(content=choice_json("list_notes", {})),
    )
    routed = await router.stub.Route(_ask(), timeout=10)
    assert routed.matched and routed.tool.name == "list_notes"
    assert len(model.requests) == 2
    assert model.request_times[1] - model.request_times[0] >= 1.0


async def test_429_whose_retry_after_outlasts_the_deadline_answers_at_once(
    router: RouterServer, model: FakeModel
) -> None:
    model.then(Reply(status=429, headers={"Retry-After": "30"}))
    routed = await router.stub.Route(_ask(), timeout=3)
    assert not routed.matched and list(routed.degraded) == ["model"]
    assert "HTTP 429" in routed.reason and len(model.requests) == 1


async def test_a_slow_model_is_cut_at_the_deadline_and_the_rules_answer_stands(
    router: RouterServer, model: FakeModel
) -> None:
    model.then(Reply(content=choice_json("list_notes", {}), delay_s=5))
    # A reply at all is one before the caller's deadline (the call fails otherwise).
    routed = await router.stub.Route(_ask(), timeout=1.0)
    assert not routed.matched and list(routed.degraded) == ["model"]
    assert "no answer in time" in routed.reason


async def test_provider_down_then_the_fallback_answers(tmp_path: Path, model: FakeModel) -> None:
    down = f"http://127.0.0.1:{closed_port()}/v1"
    model.then(Reply(content=choice_json("list_notes", {})))
    async for router in _router(
        tmp_path,
        model,
        model_base_url=down,
        model_fallback_base_url=model.base_url,
        model_fallback_name="spare-model",
    ):
        routed = await router.stub.Route(_ask(), timeout=5)
        info = await router.stub.GetServiceInfo(router_pb2.GetServiceInfoRequest(), timeout=5)
    assert routed.matched and routed.model_usage.provider == "fallback"
    assert routed.model_usage.model == "spare-model"
    assert model.requests[-1]["model"] == "spare-model"
    attributes = _model_attributes(info.info.attributes)
    assert attributes == {
        "routing_mode": "rules+model",
        "model": "test-model",
        "model_tool_choice": "json_object",
        "fallback_model": "spare-model",
    }


async def test_provider_down_without_fallback_opens_its_breaker(tmp_path: Path) -> None:
    fake = FakeModel()  # never started: nothing listens
    fake.port = closed_port()
    settings = {"breaker_min_calls": 2, "breaker_window": 2, "model_max_attempts": 1}
    async for router in _router(tmp_path, fake, **settings):
        reasons = [(await router.stub.Route(_ask(), timeout=5)).reason for _ in range(3)]
    assert all("could not be consulted" in r for r in reasons)
    assert "cannot connect" in reasons[0] and "cannot connect" in reasons[1]
    assert "circuit breaker open" in reasons[2]


async def test_the_api_key_comes_from_its_file_and_is_never_logged(
    tmp_path: Path, model: FakeModel, caplog: pytest.LogCaptureFixture
) -> None:
    key = tmp_path / "model.key"
    key.write_text("sk-test-0123456789abcdef\n")
    caplog.set_level(logging.DEBUG)
    model.then(Reply(status=503, headers={"Retry-After": "0"}), Reply(status=500))
    async for router in _router(tmp_path, model, model_api_key_file=key, model_max_attempts=2):
        await router.stub.Route(_ask(), timeout=5)
    assert model.headers[0]["authorization"] == "Bearer sk-test-0123456789abcdef"
    assert "sk-test-0123456789abcdef" not in caplog.text


async def test_model_first_tenants_ask_the_model_before_the_rules(
    tmp_path: Path, model: FakeModel
) -> None:
    model.then(Reply(content=choice_json("list_notes", {})), Reply(content=choice_json("none", {})))
    async for router in _router(tmp_path, model, model_first_tenants="acme"):
        planned = await router.stub.Route(_ask("what is 17 * 23", allow_model=False), timeout=5)
        picked = await router.stub.Route(_ask("what is 17 * 23"), timeout=5)
        # The model finding nothing leaves the rules' answer.
        fallback = await router.stub.Route(_ask("what is 17 * 23"), timeout=5)
    assert not planned.matched and planned.HasField("model_plan")
    assert picked.method == router_pb2.ROUTE_METHOD_MODEL and picked.tool.name == "list_notes"
    assert fallback.method == router_pb2.ROUTE_METHOD_RULES and fallback.tool.name == "calculator"
    assert "the model chose no tool" in fallback.reason


async def test_the_answer_is_streamed_and_its_usage_comes_last(
    tmp_path: Path, model: FakeModel
) -> None:
    model.then(Reply(pieces=["Twelve ", "times three ", "is 36."], usage=(55, 6)))
    async for router in _router(tmp_path, model, model_answer_tenants="*"):
        planned = await router.stub.Route(_ask("what is 12 * 3", allow_model=False), timeout=5)
        replies = [
            r
            async for r in router.stub.PhraseAnswer(
                router_pb2.PhraseAnswerRequest(
                    caller=CALLER,
                    request_id="r1",
                    prompt="what is 12 * 3",
                    tool_name="calculator",
                    tool_answer="36",
                    result_json='{"value": 36}',
                    arguments_json='{"expression": "12 * 3"}',
                ),
                timeout=5,
            )
        ]
    assert planned.matched and planned.answer_plan.max_output_tokens == 256
    assert planned.answer_plan.prompt.name == "answer"
    assert "".join(r.text for r in replies) == "Twelve times three is 36."
    assert replies[-1].usage.input_tokens == 55 and replies[-1].usage.output_tokens == 6
    messages = model.requests[-1]["messages"]
    # The tool's result is a tool message (data), never part of the system prompt.
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[3]["content"] == '{"value": 36}' and "36" not in messages[0]["content"]


async def test_without_a_model_the_router_routes_by_rules_and_says_so(tmp_path: Path) -> None:
    async for router in start_router(router_settings(tmp_path)):
        planned = await router.stub.Route(_ask(allow_model=False), timeout=5)
        info = await router.stub.GetServiceInfo(router_pb2.GetServiceInfoRequest(), timeout=5)
        with pytest.raises(aio.AioRpcError) as refused:
            async for _ in router.stub.PhraseAnswer(
                router_pb2.PhraseAnswerRequest(caller=CALLER, prompt="x"), timeout=5
            ):
                pass
    assert not planned.matched and not planned.HasField("model_plan")
    assert _model_attributes(info.info.attributes) == {"routing_mode": "rules"}
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def _model_attributes(attributes: Mapping[str, str]) -> dict[str, str]:
    """GetServiceInfo's model attributes: without the replica's name (releases name replicas
    so) and the versions of the configuration files in use (tests/e2e/test_config_reload.py)."""
    found = dict(attributes)
    assert found.pop("replica")
    return {k: v for k, v in found.items() if not k.startswith(("config.", "routing_rules."))}
