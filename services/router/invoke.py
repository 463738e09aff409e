"""Running one tool under its contract: concurrency limit, circuit breakers (the tool's and,
for a backend tool, its backend's), timeout, output check, size cap, and a span.

The same controls apply to built-in and backend tools. A call that finds the tool at its
concurrency limit waits briefly for a slot (``concurrency_wait_s``, never past its own
budget), then is refused with RESOURCE_EXHAUSTED and a retry hint.

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

from services.kit.breaker import BreakerOpen, BreakerRegistry, CircuitBreaker
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


# Suggested wait after a call found its tool at the concurrency limit.
BUSY_RETRY_AFTER_S = 0.2


class Executor:
    def __init__(
        self,
        *,
        max_result_bytes: int,
        tracer: trace.Tracer,
        breakers: BreakerRegistry,
        concurrency_wait_s: float = 0.25,
    ) -> None:
        self._max_result_bytes = max_result_bytes
        self._tracer = tracer
        self._breakers = breakers
        self._concurrency_wait_s = concurrency_wait_s
        self._slots: dict[str, asyncio.Semaphore] = {}

    def _slot(self, tool: Tool) -> asyncio.Semaphore:
        slot = self._slots.get(tool.limit_key)
        if slot is None:
            slot = self._slots[tool.limit_key] = asyncio.Semaphore(tool.spec.max_concurrency)
        return slot

    async def _take_slot(self, tool: Tool, slot: asyncio.Semaphore, budget_s: float) -> None:
        """A slot, waiting at most concurrency_wait_s (and less than the budget) for one."""
        wait_s = min(self._concurrency_wait_s, budget_s / 2)
        try:
            async with asyncio.timeout(wait_s):
                await slot.acquire()
        except TimeoutError:
            raise ToolRunError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"tool {tool.spec.name} is at its concurrency limit "
                f"({tool.spec.max_concurrency}); retry later",
                tool_fault=False,
                retry_after_s=BUSY_RETRY_AFTER_S,
            ) from None

    def _acquire(self, name: str, what: str) -> tuple[CircuitBreaker, int]:
        breaker = self._breakers.get(name)
        try:
            return breaker, breaker.acquire()
        except BreakerOpen as error:
            raise ToolRunError(
                grpc.StatusCode.UNAVAILABLE,
                f"{what} is failing and refused for now (circuit open)",
                retry_after_s=error.retry_after_s,
            ) from None

    async def run(
        self,
        tool: Tool,
        arguments: dict[str, Any],
        ctx: ToolContext,
        budget_s: float,
        *,
        shadow: bool = False,
    ) -> RunResult:
        """Run ``tool`` within ``budget_s`` seconds, or raise ToolRunError.

        A ``shadow`` copy (services.router.releases.shadow) leaves the backend's breaker alone:
        live calls of the stable version share it, and a copy must never refuse them. The
        tool's own breaker and concurrency limit are per version, so they stay in force."""
        spec = tool.spec
        started = time.perf_counter()
        # Cut short by the caller's deadline, a timeout is not the tool's fault.
        caller_bound = budget_s * 1000 < spec.timeout_ms
        slot = self._slot(tool)
        await self._take_slot(tool, slot, budget_s)
        permits: list[tuple[CircuitBreaker, int]] = []
        try:
            if tool.backend_key is not None and not shadow:
                assert tool.origin is not None
                permits.append(
                    self._acquire(f"backend:{tool.backend_key}", f"backend {tool.origin.backend}")
                )
            permits.append(self._acquire(f"tool:{tool.limit_key}", f"tool {spec.name}"))
            budget_s -= time.perf_counter() - started
            result = await self._traced(tool, arguments, ctx, budget_s, caller_bound)
        except ToolRunError as error:
            for breaker, permit in permits:
                if error.tool_fault:
                    breaker.record(False, time.perf_counter() - started, permit)
                else:
                    # The caller's own error says nothing of the tool's health.
                    breaker.release(permit)
            raise
        except BaseException:
            for breaker, permit in permits:
                breaker.release(permit)
            raise
        finally:
            slot.release()
        for breaker, permit in permits:
            breaker.record(True, time.perf_counter() - started, permit)
        return result

    async def _traced(
        self,
        tool: Tool,
        arguments: dict[str, Any],
        ctx: ToolContext,
        budget_s: float,
        caller_bound: bool,
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
            "toolmesh.backend.kind": tool.origin.kind if tool.origin else "builtin",
        }
        if tool.origin is not None:
            attributes["toolmesh.backend"] = tool.origin.backend
        with self._tracer.start_as_current_span(
            f"execute_tool {spec.name}",
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                result = await self._guarded(tool, arguments, ctx, budget_s, caller_bound)
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
            if result.output.tool_error:
                # The tool declined this input: an answer, not a failure of the tool.
                span.set_attribute("toolmesh.tool.error", True)
            return result

    async def _guarded(
        self,
        tool: Tool,
        arguments: dict[str, Any],
        ctx: ToolContext,
        budget_s: float,
        caller_bound: bool,
    ) -> RunResult:
        name = tool.spec.name
        try:
            output = await asyncio.wait_for(tool.run(arguments, ctx), timeout=budget_s)
        except TimeoutError:
            raise ToolRunError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"tool {name} did not finish within {budget_s * 1000:.0f} ms",
                tool_fault=not caller_bound,
            ) from None
        except ToolInputError as error:
            raise ToolRunError(
                grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {error}", tool_fault=False
            ) from None
        except ToolConflictError as error:
            raise ToolRunError(
                grpc.StatusCode.FAILED_PRECONDITION, f"{name}: {error}", tool_fault=False
            ) from None
        except ToolRunError:
            raise
        except Exception:
            incident = uuid.uuid4().hex[:12]
            log.exception("tool failed", extra={"tool": tool.key, "incident": incident})
            raise ToolRunError(
                grpc.StatusCode.INTERNAL, f"tool {name} failed (incident {incident})"
            ) from None
        violation = self._violation(tool, output)
        if violation is not None:
            path, rule = violation
            log.error(
                "tool broke its output contract",
                extra={"tool": tool.key, "path": path, "rule": rule},
            )
            raise ToolRunError(
                grpc.StatusCode.INTERNAL, f"tool {name} returned a result outside its contract"
            )
        result_json = (
            ""
            if output.result is None
            else json.dumps(output.result, ensure_ascii=False, separators=(",", ":"))
        )
        size = len(result_json.encode()) + len(output.answer.encode())
        if size > self._max_result_bytes:
            raise ToolRunError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"tool {name} returned {size} bytes, over the {self._max_result_bytes}-byte cap",
            )
        return RunResult(output=output, result_json=result_json)

    @staticmethod
    def _violation(tool: Tool, output: ToolOutput) -> tuple[str, str] | None:
        """Where and how the result breaks the output schema, or None. A tool error carries
        no result; a tool that declared a result owes one otherwise."""
        if output.result is None:
            if tool.spec.output_schema and not output.tool_error:
                return "$", "required"
            return None
        errors = sorted(tool.output_validator.iter_errors(output.result), key=str)
        if not errors:
            return None
        return errors[0].json_path, str(errors[0].validator)
