"""Running one tool under its contract: concurrency limit, circuit breaker, timeout, output
check, size cap, and a span.

Every run is an ``execute_tool <name>`` span with the OpenTelemetry GenAI attributes; telemetry
computes each tool's error rate from these spans. Like HTTP server spans for 4xx answers, a call
refused for its arguments (unknown zone, division by zero) or cut short by the caller's own
deadline sets ``error.type`` but leaves the span status unset: the caller erred, not the tool.
Contract timeouts, crashes, broken output contracts and oversized results set the status to
ERROR and count against the tool.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.kit.breaker import BreakerOpen, BreakerRegistry
from services.router.registry import (
    Tool,
    ToolConflictError,
    ToolContext,
    ToolInputError,
    ToolOutput,
)

log = logging.getLogger("toolmesh.router.invoke")


@dataclass
class ToolRunError(Exception):
    """Why a run failed, as the gRPC status to answer with and a message safe to show."""

    code: grpc.StatusCode
    message: str
    # False when the caller erred (bad arguments, too short a deadline): the span is marked
    # with error.type but not as an error, and the tool's circuit breaker does not count it
    # as a failure.
    tool_fault: bool = True
    # When set, the caller may retry after this many seconds (sent as google.rpc.RetryInfo).
    retry_after_s: float | None = None


@dataclass(frozen=True)
class RunResult:
    output: ToolOutput
    result_json: str


class Executor:
    def __init__(
        self, *, max_result_bytes: int, tracer: trace.Tracer, breakers: BreakerRegistry
    ) -> None:
        self._max_result_bytes = max_result_bytes
        self._tracer = tracer
        self._breakers = breakers
        self._slots: dict[str, asyncio.Semaphore] = {}

    def _slot(self, tool: Tool) -> asyncio.Semaphore:
        slot = self._slots.get(tool.key)
        if slot is None:
            slot = self._slots[tool.key] = asyncio.Semaphore(tool.spec.max_concurrency)
        return slot

    async def run(
        self, tool: Tool, arguments: dict[str, Any], ctx: ToolContext, budget_s: float
    ) -> RunResult:
        """Run ``tool`` within ``budget_s`` seconds, or raise ToolRunError."""
        spec = tool.spec
        slot = self._slot(tool)
        if slot.locked():
            # Refuse at once rather than queue: a queued call would only eat its deadline.
            raise ToolRunError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"tool {spec.name} is at its concurrency limit ({spec.max_concurrency}); "
                "retry later",
            )
        breaker = self._breakers.get(f"tool:{tool.key}")
        try:
            permit = breaker.acquire()
        except BreakerOpen as error:
            raise ToolRunError(
                grpc.StatusCode.UNAVAILABLE,
                f"tool {spec.name} is failing and refused for now (circuit open)",
                retry_after_s=error.retry_after_s,
            ) from None
        started = time.perf_counter()
        try:
            async with slot:
                result = await self._traced(tool, arguments, ctx, budget_s)
        except ToolRunError as error:
            if error.tool_fault:
                breaker.record(False, time.perf_counter() - started, permit)
            else:
                # The caller's own error says nothing of the tool's health.
                breaker.release(permit)
            raise
        except BaseException:
            breaker.release(permit)
            raise
        breaker.record(True, time.perf_counter() - started, permit)
        return result

    async def _traced(
        self, tool: Tool, arguments: dict[str, Any], ctx: ToolContext, budget_s: float
    ) -> RunResult:
        spec = tool.spec
        attributes = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": spec.name,
            "gen_ai.tool.type": "function",
            "gen_ai.tool.description": spec.description,
            "gen_ai.tool.call.id": ctx.request_id,
            "toolmesh.tool.version": spec.version,
            "toolmesh.tool.side_effect": spec.side_effect.value,
            "toolmesh.tenant": ctx.tenant,
        }
        with self._tracer.start_as_current_span(
            f"execute_tool {spec.name}",
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                result = await self._guarded(tool, arguments, ctx, budget_s)
            except ToolRunError as error:
                span.set_attribute("error.type", error.code.name.lower())
                if error.tool_fault:
                    span.set_status(Status(StatusCode.ERROR, error.code.name))
                raise
            except asyncio.CancelledError:
                # The caller gave up (its deadline or cancellation): not the tool's fault.
                span.set_attribute("error.type", "cancelled")
                raise
            if result.output.replayed:
                span.set_attribute("toolmesh.tool.replayed", True)
            return result

    async def _guarded(
        self, tool: Tool, arguments: dict[str, Any], ctx: ToolContext, budget_s: float
    ) -> RunResult:
        name = tool.spec.name
        try:
            output = await asyncio.wait_for(tool.run(arguments, ctx), timeout=budget_s)
        except TimeoutError:
            raise ToolRunError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"tool {name} did not finish within {budget_s * 1000:.0f} ms",
                # Cut short by the caller's deadline, the tool did not break its own timeout.
                tool_fault=budget_s * 1000 >= tool.spec.timeout_ms,
            ) from None
        except ToolInputError as error:
            raise ToolRunError(
                grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {error}", tool_fault=False
            ) from None
        except ToolConflictError as error:
            raise ToolRunError(
                grpc.StatusCode.FAILED_PRECONDITION, f"{name}: {error}", tool_fault=False
            ) from None
        except Exception:
            incident = uuid.uuid4().hex[:12]
            log.exception("tool failed", extra={"tool": tool.key, "incident": incident})
            raise ToolRunError(
                grpc.StatusCode.INTERNAL, f"tool {name} failed (incident {incident})"
            ) from None
        errors = sorted(tool.output_validator.iter_errors(output.result), key=str)
        if errors:
            log.error(
                "tool broke its output contract",
                extra={"tool": tool.key, "path": errors[0].json_path, "rule": errors[0].validator},
            )
            raise ToolRunError(
                grpc.StatusCode.INTERNAL, f"tool {name} returned a result outside its contract"
            )
        result_json = json.dumps(output.result, ensure_ascii=False, separators=(",", ":"))
        size = len(result_json.encode()) + len(output.answer.encode())
        if size > self._max_result_bytes:
            raise ToolRunError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"tool {name} returned {size} bytes, over the {self._max_result_bytes}-byte cap",
            )
        return RunResult(output=output, result_json=result_json)
