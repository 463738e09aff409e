"""Run through the model path beside the rules path and the raw echo, in the same run.

A mesh of the five real processes whose router consults a real model server (llama.cpp's, from
.venv-model, `make model-server`) when its rules find no tool. Measured one request at a time,
since the model server answers one request at a time: the raw echo, a rules-routed Run, the
model server's own answer to the routing call (straight to it, same messages), and a Run the
model routes. The difference between the last two is what toolmesh adds around the model hop;
between a model-routed and a rules-routed Run, what the model hop costs.
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
from tests.e2e.mesh import REPO, Mesh, free_port
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from toolmesh.router.v1 import router_pb2

MODEL_PYTHON = REPO / ".venv-model" / "bin" / "python"
GGUF = REPO / ".venv-model" / "gemma-3-270m-q4_k_m.gguf"
MODEL = "gemma-3-270m"
REQUESTS = int(os.environ.get("BENCH_MODEL_REQUESTS", "5"))
RULES_PROMPT = "what is 17 * 23"
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


async def _measure(echo_target: str, mesh: Mesh, token: str, model_url: str) -> list[str]:
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
        # The same routing call straight to the model server (the router's request body).
        async with httpx2.AsyncClient(timeout=120) as http:
            body = {
                "model": MODEL,
                "messages": [
                    {"role": "system", "content": "Route to a tool.\n- list_notes: notes"},
                    {"role": "user", "content": MODEL_PROMPT},
                ],
                "max_tokens": ROUTE_MAX_TOKENS,
                "temperature": 0,
                "response_format": {
                    "type": "json_object",
                    "schema": {
                        "anyOf": [
                            {
                                "type": "object",
                                "properties": {
                                    "tool": {"const": "list_notes"},
                                    "arguments": {"type": "object", "properties": {}},
                                },
                                "required": ["tool", "arguments"],
                            },
                            {
                                "type": "object",
                                "properties": {"tool": {"const": "none"}},
                                "required": ["tool"],
                            },
                        ]
                    },
                },
                "logprobs": True,
                "top_logprobs": 5,
            }
            direct_ms = await _timed(
                lambda: http.post(f"{model_url}/chat/completions", json=body), REQUESTS
            )
    methods = router_pb2.RouteMethod
    rows = [
        ("echo (raw gRPC)", echo_ms, "-", "-"),
        (
            f"Run, rules path ({methods.Name(rules.route_method)})",
            rules_ms,
            f"{rules.usage.tokens_in}/{rules.usage.tokens_out}",
            gateway_pb2.Outcome.Name(rules.outcome),
        ),
        ("model server alone (routing call)", direct_ms, "-", "-"),
        (
            f"Run, model path ({methods.Name(routed.route_method)})",
            model_ms,
            f"{routed.usage.tokens_in}/{routed.usage.tokens_out}",
            gateway_pb2.Outcome.Name(routed.outcome),
        ),
    ]
    lines = [
        "## Run through the model path",
        "",
        f"Same run, one request at a time, {REQUESTS} requests per row after one warm-up: the "
        "raw echo, a rules-routed Run, the model server alone answering the routing call "
        "(JSON-schema-constrained, as the router asks it), and a Run the model routes "
        f"(`{MODEL_PROMPT}`: no rule matches, so the router asks {MODEL} on llama.cpp's "
        f"server through the OpenAI-compatible API, `max_tokens` {ROUTE_MAX_TOKENS}, one "
        "tool offered). The model is a 270M base model on 2 shared CPU cores; grammar-"
        "constrained decoding dominates. Tokens are the provider's own counts (in/out).",
        "",
        "| call | p50 ms | max ms | tokens in/out | outcome |",
        "|---|---|---|---|---|",
    ]
    for name, samples, tokens, outcome in rows:
        p50, worst = _ms(samples)
        lines.append(f"| {name} | {p50:.1f} | {worst:.1f} | {tokens} | {outcome} |")
    model_p50, rules_p50 = _ms(model_ms)[0], _ms(rules_ms)[0]
    direct_p50 = _ms(direct_ms)[0]
    lines += [
        "",
        f"The model hop costs {model_p50 - rules_p50:,.0f} ms at p50 over the rules path; "
        f"toolmesh around it (the rules, the plan, the history read and the budget top-up, "
        f"the second Route, scoring) adds {model_p50 - direct_p50:,.0f} ms to the model "
        "server's own answer.",
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
        model_url = f"http://127.0.0.1:{port}/v1"
        env = {
            "TOOLMESH_LOG_LEVEL": "WARNING",
            "TOOLMESH_ROUTER_MODEL_BASE_URL": model_url,
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
            lines = asyncio.run(_measure(echo_target, mesh, token, model_url))
        finally:
            mesh.stop_all()
            server.terminate()
            server.wait()
    return "\n".join(lines)


def _policy(directory: Path) -> Path:
    """auth's policy file with the dev tenant's allowlist narrowed to list_notes and the
    calculator (the rules path's tool)."""
    source = (REPO / "services" / "auth" / "policy.toml").read_text()
    narrowed = source.replace(
        '[tenants.dev]\nallowed_tools = ["*"]',
        '[tenants.dev]\nallowed_tools = ["calculator", "list_notes"]',
    )
    if narrowed == source:
        raise RuntimeError("the dev tenant's allowlist in policy.toml is not where it was")
    path = directory / "policy.toml"
    path.write_text(narrowed)
    return path
