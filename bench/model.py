"""Run through the model path beside the rules path and the raw echo, in the same run.

A mesh of the five real processes whose router consults a real model server (llama.cpp's, from
.venv-model, `make model-server`) when its rules find no tool. Measured one request at a time,
since the model server answers one request at a time: the raw echo, a rules-routed Run and a
model-routed Run to the same tool, the latter split into the model call (its span) and the
rest. The difference between the two Runs is what the model hop costs.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx2
from grpc import aio

from bench.echo_server import METHOD
from testing.mesh import REPO, Mesh, free_port
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from toolmesh.router.v1 import router_pb2

MODEL_PYTHON = REPO / ".venv-model" / "bin" / "python"
GGUF = REPO / ".venv-model" / "gemma-3-270m-q4_k_m.gguf"
MODEL = "gemma-3-270m"
REQUESTS = int(os.environ.get("BENCH_MODEL_REQUESTS", "5"))
RULES_PROMPT = "list my notes"
MODEL_PROMPT = "could you show me what I wrote down"
# The tenant's allowlist offers the model one tool, so every constrained answer is short.
ROUTE_MAX_TOKENS = 32


def _ms(samples: list[float]) -> tuple[float, float]:
    return statistics.median(samples), max(samples)


async def _timed(call: object, n: int) -> list[float]:
    samples = []
    for _ in range(n + 1):  # the first is a warm-up
        started = time.perf_counter()
        await call()  # type: ignore[operator]
        samples.append((time.perf_counter() - started) * 1000)
    return samples[1:]


def _start_model_server(port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(MODEL_PYTHON),
                "-m",
                "llama_cpp.server",
                "--model",
                str(GGUF),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                "2048",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the model server exited: {log.read_text()[-1000:]}")
        try:
            if httpx2.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return process
        except httpx2.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise TimeoutError("the model server did not come up")


async def _chat_ms(stub: gateway_pb2_grpc.GatewayStub, metadata: object, trace_id: str) -> float:
    """The duration of the Run's model call, from its `chat <model>` span in telemetry."""
    for _ in range(60):
        trace = await stub.GetTrace(
            gateway_pb2.GetTraceRequest(trace_id=trace_id), metadata=metadata, timeout=5
        )
        chats = [span.duration_ms for span in trace.spans if span.name.startswith("chat ")]
        if chats:
            return float(sum(chats))
        await asyncio.sleep(0.5)  # spans are exported in batches
    raise RuntimeError(f"no model span in trace {trace_id}")


async def _measure(echo_target: str, mesh: Mesh, token: str) -> list[str]:
    metadata = (("authorization", f"Bearer {token}"),)
    async with (
        aio.insecure_channel(echo_target) as echo_channel,
        aio.insecure_channel(mesh.gateway) as channel,
    ):
        echo = echo_channel.unary_unary(METHOD)
        stub = gateway_pb2_grpc.GatewayStub(channel)
        replies: list[gateway_pb2.RunResponse] = []

        async def run(prompt: str) -> None:
            reply = await stub.Run(
                gateway_pb2.RunRequest(session_id="bench-model", prompt=prompt),
                metadata=metadata,
                timeout=120,
            )
            replies.append(reply)

        echo_ms = await _timed(lambda: echo(b"x", timeout=5), REQUESTS)
        rules_ms = await _timed(lambda: run(RULES_PROMPT), REQUESTS)
        rules = replies[-1]
        replies.clear()
        model_ms = await _timed(lambda: run(MODEL_PROMPT), REQUESTS)
        routed = replies[-1]
        chat_ms = [await _chat_ms(stub, metadata, r.trace_id) for r in replies[1:]]
    around = [run_ms - chat for run_ms, chat in zip(model_ms, chat_ms, strict=True)]
    methods = router_pb2.RouteMethod
    rows = [
        ("echo (raw gRPC)", echo_ms, "-", "-"),
        (
            f"Run, rules path ({methods.Name(rules.route_method)}, `{RULES_PROMPT}`)",
            rules_ms,
            f"{rules.usage.tokens_in}/{rules.usage.tokens_out}",
            gateway_pb2.Outcome.Name(rules.outcome),
        ),
        (
            f"Run, model path ({methods.Name(routed.route_method)}, `{MODEL_PROMPT}`)",
            model_ms,
            f"{routed.usage.tokens_in}/{routed.usage.tokens_out}",
            gateway_pb2.Outcome.Name(routed.outcome),
        ),
        ("  of which the model call (its `chat` span)", chat_ms, "-", "-"),
        ("  of which toolmesh around it", around, "-", "-"),
    ]
    lines = [
        "## Run through the model path",
        "",
        f"Same run, one request at a time, {REQUESTS} requests per row after one warm-up: the "
        "raw echo, a Run the rules route, and a Run the rules cannot place, which the router "
        f"sends to {MODEL} on llama.cpp's server (OpenAI-compatible API, JSON-schema-"
        f"constrained choice, `max_tokens` {ROUTE_MAX_TOKENS}), offered `list_notes`, the one "
        "tool the tenant may use (the base model may decline it: see the outcome). The model "
        "call's own time is its `chat` span; "
        "the rest is toolmesh around it (the rules, the plan, the history read and the budget "
        "top-up, the second Route, scoring, the tool). The model is a 270M base model on 2 "
        "shared CPU cores, where llama.cpp's grammar-constrained decoding dominates. Tokens are "
        "the provider's own counts (in/out).",
        "",
        "| call | p50 ms | max ms | tokens in/out | outcome |",
        "|---|---|---|---|---|",
    ]
    for name, samples, tokens, outcome in rows:
        p50, worst = _ms(samples)
        lines.append(f"| {name} | {p50:.1f} | {worst:.1f} | {tokens} | {outcome} |")
    lines += [
        "",
        f"The model hop costs {_ms(model_ms)[0] - _ms(rules_ms)[0]:,.0f} ms at p50 over the "
        f"rules path; toolmesh's own share of a model-routed Run is {_ms(around)[0]:,.1f} ms.",
        "",
    ]
    return lines


def section(echo_target: str) -> str:
    """The report's section; a mesh and a model server of its own, stopped afterwards."""
    if not MODEL_PYTHON.exists() or not GGUF.exists():
        raise RuntimeError("the model server is not installed: run `make model-server`")
    with tempfile.TemporaryDirectory(prefix="toolmesh-bench-model-") as tmp:
        port = free_port()
        server = _start_model_server(port, Path(tmp) / "model.log")
        env = {
            "TOOLMESH_LOG_LEVEL": "WARNING",
            "TOOLMESH_ROUTER_MODEL_BASE_URL": f"http://127.0.0.1:{port}/v1",
            "TOOLMESH_ROUTER_MODEL_NAME": MODEL,
            "TOOLMESH_ROUTER_MODEL_TOOL_CHOICE": "json_object",
            "TOOLMESH_ROUTER_MODEL_ROUTE_MAX_TOKENS": str(ROUTE_MAX_TOKENS),
            "TOOLMESH_GATEWAY_MAX_DEADLINE_S": "120",
            "TOOLMESH_GATEWAY_DEFAULT_DEADLINE_S": "120",
            "TOOLMESH_GATEWAY_MODEL_ROUTE_TIMEOUT_MS": "120000",
            "TOOLMESH_ROUTER_MODEL_TIMEOUT_S": "120",
            # The dev tenant may use every tool; this bench offers the model one.
            "TOOLMESH_AUTH_POLICY_FILE": str(_policy(Path(tmp))),
        }
        mesh = Mesh(data_dir=Path(tmp) / "mesh", extra_env=env)
        try:
            mesh.start_all()
            token = mesh.token()
            lines = asyncio.run(_measure(echo_target, mesh, token))
        finally:
            mesh.stop_all()
            server.terminate()
            server.wait()
    return "\n".join(lines)


def _policy(directory: Path) -> Path:
    """auth's policy file with the dev tenant's allowlist narrowed to list_notes."""
    source = (REPO / "services" / "auth" / "policy.toml").read_text()
    narrowed = source.replace(
        '[tenants.dev]\nallowed_tools = ["*"]',
        '[tenants.dev]\nallowed_tools = ["list_notes"]',
    )
    if narrowed == source:
        raise RuntimeError("the dev tenant's allowlist in policy.toml is not where it was")
    path = directory / "policy.toml"
    path.write_text(narrowed)
    return path
