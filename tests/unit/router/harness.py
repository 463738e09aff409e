"""A real router in-process on port 0, with test-only tools added through the build hook."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.kit.channels import open_channel
from services.kit.server import Cleanup, Running, start
from services.router.app import build
from services.router.catalog import default_registry
from services.router.registry import Registry, SideEffect, ToolContext, ToolOutput, ToolSpec
from services.router.settings import RouterSettings
from toolmesh.common.v1 import common_pb2
from toolmesh.router.v1 import router_pb2_grpc

CALLER = common_pb2.Caller(subject="svc-test", tenant="acme", scopes=["tools:read", "tools:write"])

_OBJECT = {"type": "object", "properties": {}, "additionalProperties": False}
_ANSWER = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


def _spec(name: str, **overrides: Any) -> ToolSpec:
    base: dict[str, Any] = {
        "name": name,
        "version": "0.1.0",
        "description": f"test-only tool {name}",
        "input_schema": _OBJECT,
        "output_schema": _ANSWER,
        "side_effect": SideEffect.READ_ONLY,
        "cost_units": 1,
        "timeout_ms": 1000,
        "fallback_answer": "test tool failed",
    }
    return ToolSpec(**{**base, **overrides})


@dataclass
class MisbehavingTools:
    """Misbehaving tools that the published catalog must never contain."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    gated_calls: int = 0  # gated_tool calls that reached the tool

    async def slow(self, _args: dict[str, Any], _ctx: ToolContext) -> ToolOutput:
        await asyncio.sleep(30)
        return ToolOutput("late", {"ok": True})

    async def broken(self, _args: dict[str, Any], _ctx: ToolContext) -> ToolOutput:
        return ToolOutput("wrong shape", {"ok": "yes"})

    async def crash(self, _args: dict[str, Any], _ctx: ToolContext) -> ToolOutput:
        raise RuntimeError("db password hunter2 leaked")

    async def huge(self, _args: dict[str, Any], _ctx: ToolContext) -> ToolOutput:
        return ToolOutput("x" * 100_000, {"ok": True})

    async def gated(self, _args: dict[str, Any], _ctx: ToolContext) -> ToolOutput:
        self.gated_calls += 1
        await self.gate.wait()
        return ToolOutput("opened", {"ok": True})

    def registry(self) -> Registry:
        registry = default_registry()
        registry.register(_spec("slow_tool", timeout_ms=400), self.slow)
        registry.register(_spec("broken_tool"), self.broken)
        registry.register(_spec("crash_tool"), self.crash)
        registry.register(_spec("huge_tool"), self.huge)
        registry.register(_spec("gated_tool", max_concurrency=1), self.gated)
        return registry


@dataclass
class RouterServer:
    running: Running
    stub: router_pb2_grpc.RouterStub
    spans: InMemorySpanExporter
    tools: MisbehavingTools


async def start_router(settings: RouterSettings) -> AsyncIterator[RouterServer]:
    tools = MisbehavingTools()
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    cleanups: list[Cleanup] = []
    running = await start(
        settings, build(settings, cleanups, registry=tools.registry(), tracer_provider=provider)
    )
    running.cleanups.extend(cleanups)
    channel = open_channel(f"127.0.0.1:{running.port}")
    try:
        yield RouterServer(running, router_pb2_grpc.RouterStub(channel), spans, tools)
    finally:
        tools.gate.set()
        await channel.close()
        await running.stop(0)


def router_settings(data_dir: Path, **overrides: Any) -> RouterSettings:
    # Nothing listens on port 9: tool health stays at its default unless a test says otherwise.
    base: dict[str, Any] = {
        "port": 0,
        "data_dir": data_dir,
        "telemetry_target": "127.0.0.1:9",
        "otlp_endpoint": "",
    }
    return RouterSettings(**{**base, **overrides})
