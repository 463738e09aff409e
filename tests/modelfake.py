"""A small OpenAI-compatible Chat Completions server of the suite's own, on loopback.

The real model server (llama.cpp, tests/model) proves the plumbing against a real model; this
one answers exactly what a test scripts, so that the failure cases (429 with Retry-After,
malformed tool calls, disallowed tools, schema-invalid arguments, a slow or broken stream) and
the exact budget arithmetic under load are deterministic. It speaks plain HTTP/1.1 with JSON
and server-sent events, served by uvicorn (a dependency of the project already).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class Reply:
    """One scripted answer: a status (with headers), or a completion."""

    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    usage: tuple[int, int] | None = (40, 10)
    finish_reason: str = "stop"
    # Token log-probabilities: (token, logprob, [(alternative, logprob), ...]) per token.
    logprobs: list[tuple[str, float, list[tuple[str, float]]]] | None = None
    delay_s: float = 0.0
    # Streaming: the pieces sent, and a delay before each.
    pieces: list[str] = field(default_factory=list)
    piece_delay_s: float = 0.0


def choice_json(tool: str, arguments: dict[str, Any]) -> str:
    return json.dumps({"tool": tool, "arguments": arguments})


def tokens_of(text: str, size: int = 4) -> list[tuple[str, float, list[tuple[str, float]]]]:
    """``text`` cut into tokens of ``size`` characters, each certain (logprob 0)."""
    return [(text[i : i + size], 0.0, []) for i in range(0, len(text), size)]


class FakeModel:
    def __init__(self) -> None:
        self.script: list[Reply] = []
        # Answer given when the script is empty.
        self.default: Callable[[dict[str, Any]], Reply] = lambda _body: Reply(
            content=choice_json("none", {})
        )
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.request_times: list[float] = []
        # Streams whose client went away before the last piece.
        self.disconnected = 0
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def then(self, *replies: Reply) -> FakeModel:
        self.script.extend(replies)
        return self

    async def _completions(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        self.request_times.append(time.monotonic())
        reply = self.script.pop(0) if self.script else self.default(body)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.status != 200:
            return JSONResponse(
                {"error": {"message": f"scripted {reply.status}", "type": "scripted"}},
                status_code=reply.status,
                headers=reply.headers,
            )
        model = body.get("model", "")
        if body.get("stream"):
            return StreamingResponse(
                self._stream(request, reply, model), media_type="text/event-stream"
            )
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.tool_calls is not None:
            message["tool_calls"] = reply.tool_calls
        choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "finish_reason": reply.finish_reason,
        }
        if reply.logprobs is not None:
            choice["logprobs"] = {
                "content": [
                    {
                        "token": token,
                        "logprob": logprob,
                        "bytes": None,
                        "top_logprobs": [
                            {"token": t, "logprob": lp, "bytes": None} for t, lp in alternatives
                        ],
                    }
                    for token, logprob, alternatives in reply.logprobs
                ]
            }
        data: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
        }
        if reply.usage is not None:
            data["usage"] = {
                "prompt_tokens": reply.usage[0],
                "completion_tokens": reply.usage[1],
                "total_tokens": sum(reply.usage),
            }
        return JSONResponse(data)

    async def _stream(self, request: Request, reply: Reply, model: str) -> AsyncIterator[str]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            data = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(data)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            for piece in reply.pieces:
                if reply.piece_delay_s:
                    await asyncio.sleep(reply.piece_delay_s)
                yield chunk({"content": piece})
            yield chunk({}, reply.finish_reason)
            if reply.usage is not None:
                usage = {
                    "prompt_tokens": reply.usage[0],
                    "completion_tokens": reply.usage[1],
                    "total_tokens": sum(reply.usage),
                }
                data = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
                yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            self.disconnected += 1
            raise

    async def start(self) -> FakeModel:
        app = Starlette(routes=[Route("/v1/chat/completions", self._completions, methods=["POST"])])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._socket is not None:
            self._socket.close()


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
