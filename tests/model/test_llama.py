"""The model path against a real model server (llama.cpp with a 270M base model) on loopback.

The model is a base model: these tests judge plumbing, not wisdom. Its JSON-schema-constrained
output keeps every routing answer structurally valid; what is asserted is the mechanics: the
proposal is scored (I from the real token log-probabilities, S from the schema), the provider's
own token counts reach the response, the usage record and the price, the token bound reserved
before the call holds against the real tokenizer, a token budget holds under concurrent Runs,
and cancelling a streamed answer stops the server's generation. Kept to three model calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from services.kit.pricing import PriceTable, cost_micros
from services.telemetry.settings import TelemetrySettings
from tests.model.conftest import MODEL, LlamaServer
from tests.model.mesh import ModelMesh, model_mesh
from toolmesh.common.v1 import common_pb2
from toolmesh.gateway.v1 import gateway_pb2
from toolmesh.router.v1 import router_pb2
from toolmesh.telemetry.v1 import telemetry_pb2

PROMPT = "could you show me what I wrote down"  # no rule matches it
# One tool with no required argument: the model chooses it or "none", and the tool can answer.
TOOLS = ["list_notes"]
PRICES = PriceTable.load(TelemetrySettings().prices_file)
# How long one model call may take here. llama-cpp-python builds each token's log-probabilities
# by sorting the whole vocabulary (262k entries for Gemma 3) in Python: 0.3-0.8 s per token on
# this machine kind, so a routing answer of 10-20 tokens takes 5-20 s, and the two concurrent
# Runs of the budget test queue behind each other. The product's defaults (20 s for the router's
# model call, 30 s for the gateway's Route with the model) are for real model servers.
MODEL_CALL_S = 120


@pytest.fixture(scope="module")
async def mesh(
    llama: LlamaServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ModelMesh]:
    data_dir: Path = tmp_path_factory.mktemp("llama-mesh")
    async with model_mesh(
        data_dir,
        model_base_url=llama.base_url,
        model_name=MODEL,
        model_tool_choice="json_object",
        model_route_max_tokens=32,
        model_answer_max_tokens=400,
        model_answer_tenants="answers",
        model_timeout_s=MODEL_CALL_S,
        # The model server takes both cores while it decodes: the budget ledger's calls, made
        # meanwhile, get as long as a model call.
        gateway_settings={
            "model_route_timeout_ms": MODEL_CALL_S * 1000,
            "budget_call_timeout_ms": MODEL_CALL_S * 1000,
        },
        tenants={"llm": TOOLS, "llm2": TOOLS, "answers": ["*"]},
    ) as running:
        yield running


async def _plan(mesh: ModelMesh, tenant: str) -> router_pb2.ModelPlan:
    reply = await mesh.router.Route(
        router_pb2.RouteRequest(
            caller=common_pb2.Caller(tenant=tenant, subject="client-1"),
            prompt=PROMPT,
            allowed_tools=TOOLS,
        ),
        timeout=10,
    )
    return reply.model_plan


async def test_the_real_model_routes_with_its_own_token_counts(mesh: ModelMesh) -> None:
    plan = await _plan(mesh, "llm")
    reply = await mesh.run(PROMPT, tenant="llm", timeout=MODEL_CALL_S + 30)
    assert reply.route_method == router_pb2.ROUTE_METHOD_MODEL
    assert "model" not in reply.degraded
    usage = reply.usage
    assert usage.model == MODEL and 0 < usage.tokens_out <= 32
    # The bound reserved before the call holds against the real tokenizer.
    assert 0 < usage.tokens_in <= plan.max_input_tokens
    parts = reply.confidence_parts
    if reply.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED:
        # Constrained decoding: a valid structure naming an allowed tool with fitting arguments.
        assert reply.tool_name in TOOLS and parts.schema_fit == 1.0
        assert 0.0 < parts.intent <= 1.0 and reply.confidence >= 0.6
    else:
        assert reply.outcome == gateway_pb2.OUTCOME_NO_MATCH and "model" in reply.answer
    assert reply.cost_micros == cost_micros(
        PRICES, usage.tokens_in, usage.tokens_out, usage.tool_calls, usage.cost_units, model=MODEL
    )
    for _ in range(100):
        cost = await mesh.telemetry.GetCost(
            telemetry_pb2.GetCostRequest(
                caller=common_pb2.Caller(tenant="llm"),
                group_by=[telemetry_pb2.COST_GROUP_BY_MODEL],
            ),
            timeout=5,
        )
        if cost.rows:
            break
        await asyncio.sleep(0.05)
    (row,) = cost.rows
    assert (row.model, row.tokens_in, row.tokens_out, row.cost_micros) == (
        MODEL,
        usage.tokens_in,
        usage.tokens_out,
        reply.cost_micros,
    )


async def test_a_token_budget_holds_for_concurrent_runs_on_the_real_server(
    mesh: ModelMesh,
) -> None:
    plan = await _plan(mesh, "llm2")
    bound = plan.max_input_tokens + plan.max_output_tokens
    # Room for one model call's bound, not for two (nor for one plus what it used).
    await mesh.set_token_budget(bound + 10, tenant="llm2")

    async def one(session: str) -> gateway_pb2.RunResponse | grpc.StatusCode:
        try:
            return await mesh.run(PROMPT, session=session, tenant="llm2", timeout=MODEL_CALL_S + 30)
        except aio.AioRpcError as error:
            return error.code()

    results = await asyncio.gather(one("c1"), one("c2"))
    served = [r for r in results if isinstance(r, gateway_pb2.RunResponse)]
    assert len(served) == 1 and grpc.StatusCode.RESOURCE_EXHAUSTED in results
    used = served[0].usage.tokens_in + served[0].usage.tokens_out
    for _ in range(100):
        budget = await mesh.budget("llm2")
        if budget.used.tokens and not budget.reserved.tokens:
            break
        await asyncio.sleep(0.05)
    assert budget.used.tokens == used <= bound + 10


async def test_cancelling_a_streamed_answer_stops_the_real_models_generation(
    mesh: ModelMesh, llama: LlamaServer
) -> None:
    before = llama.log_text().count("Disconnected from client")
    call = mesh.gateway.stub.RunStream(
        gateway_pb2.RunStreamRequest(session_id="stream", prompt="what is 17 * 23"),
        metadata=mesh.metadata(tenant="answers"),
        timeout=MODEL_CALL_S + 30,
    )
    chunks = 0
    async for event in call:
        if event.WhichOneof("event") == "answer_chunk":
            chunks += 1
            call.cancel()
            break
    assert chunks == 1
    for _ in range(200):
        if llama.log_text().count("Disconnected from client") > before:
            break
        await asyncio.sleep(0.05)
    # The server saw its client go and stopped generating (up to 400 tokens were asked for).
    assert llama.log_text().count("Disconnected from client") == before + 1
