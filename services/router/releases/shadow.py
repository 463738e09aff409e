"""Shadow traffic: while a release shadows, a share of live calls is also sent to the candidate,
off the caller's path, and the two results are compared.

Only read-only units are ever shadowed: a release that would shadow a write tool (or a prompt,
whose copy would spend model tokens) is refused when it starts, and a shadow is only started
for a call whose tool is read-only, so a write can never run twice because of a shadow.

The copy starts after the stable call has answered, as a task of its own: the caller's answer
never waits for it. At most ``max_inflight`` copies run at once on a replica; beyond that the
copy is skipped (counted), so shadowing costs the request path at most the CPU those copies
take. A copy runs through the same Executor (the candidate version's own concurrency limit and
circuit breaker, its contract's timeout), under a span marked ``toolmesh.release.shadow``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

from services.kit.metrics import meter
from services.router.invoke import Executor, ToolRunError
from services.router.registry import SideEffect, Tool, ToolContext
from services.router.releases.model import Release
from services.router.releases.view import ReleaseView
from services.router.routing import Decision, RoutePool, RoutingBusyError, ToolLookup, ToolRouter

_SHADOW_CALLS = meter().create_counter(
    "toolmesh.router.release.shadow_calls",
    unit="{call}",
    description="Calls copied to a release's candidate, by result: agreed, disagreed, skipped "
    "(too many copies in flight)",
)


@dataclass(frozen=True)
class Outcome:
    """What a call came to, in a form two versions' calls can be compared in: the result (or
    the refusal or error kind), whether it failed through the tool's fault, and its latency."""

    key: str
    failed: bool
    ms: float


@dataclass(frozen=True)
class RouteCall:
    """A Route call as the stable rules saw it, to score again with the candidate's."""

    prompt: str
    allowed: list[str]
    tenant: str
    lookup: ToolLookup


def tool_outcome(result_json: str, answer: str, tool_error: bool, ms: float) -> Outcome:
    if tool_error:
        return Outcome("declined", False, ms)
    return Outcome(f"ok:{result_json or answer}", False, ms)


def error_outcome(error: ToolRunError, ms: float) -> Outcome:
    return Outcome(f"error:{error.code.name}", error.tool_fault, ms)


def decision_outcome(decision: Decision, ms: float) -> Outcome:
    best = decision.best
    if not decision.matched or best is None:
        return Outcome("no_match", False, ms)
    return Outcome(f"{best.tool.spec.name}:{decision.arguments_json}", False, ms)


class ShadowRunner:
    def __init__(
        self,
        executor: Executor,
        view: ReleaseView,
        pool: RoutePool,
        tracer: trace.Tracer,
        *,
        max_inflight: int,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self._executor = executor
        self._view = view
        self._pool = pool
        self._tracer = tracer
        self._slots = max_inflight
        self._tasks: set[asyncio.Task[None]] = set()
        self._draw = draw

    def wanted(self, release: Release) -> bool:
        """True for the share of calls the release copies."""
        return self._draw() < release.plan.shadow_share

    def _start(self, release: Release, work: Any) -> None:
        if len(self._tasks) >= self._slots:
            work.close()
            _SHADOW_CALLS.add(1, {"unit": release.unit.label, "result": "skipped"})
            return
        task = asyncio.get_running_loop().create_task(work, name=f"shadow-{release.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _record(self, release: Release, stable: Outcome, candidate: Outcome) -> None:
        agreed = stable.key == candidate.key
        self._view.tally(release.id).add(
            agreed=agreed,
            stable_error=stable.failed,
            candidate_error=candidate.failed,
            stable_ms=stable.ms,
            candidate_ms=candidate.ms,
        )
        result = "agreed" if agreed else "disagreed"
        _SHADOW_CALLS.add(1, {"unit": release.unit.label, "result": result})

    def tool(
        self,
        release: Release,
        candidate: Tool,
        arguments: dict[str, Any],
        ctx: ToolContext,
        stable: Outcome,
    ) -> None:
        """Copy a read-only call to the candidate, after its answer."""
        if candidate.spec.side_effect is not SideEffect.READ_ONLY:
            return  # never: a write is never run twice
        self._start(release, self._tool(release, candidate, arguments, ctx, stable))

    async def _tool(
        self,
        release: Release,
        candidate: Tool,
        arguments: dict[str, Any],
        ctx: ToolContext,
        stable: Outcome,
    ) -> None:
        copy = ToolContext(
            tenant=ctx.tenant,
            session_id=ctx.session_id,
            request_id=f"{ctx.request_id}:shadow",
            idempotency_key="",
            notes=ctx.notes,
            now=ctx.now,
        )
        started = time.perf_counter()
        with self._tracer.start_as_current_span(
            f"shadow {candidate.key}",
            attributes={
                "toolmesh.release.id": release.id,
                "toolmesh.release.shadow": True,
                "toolmesh.tool.version": candidate.spec.version,
            },
        ):
            try:
                run = await self._executor.run(
                    candidate, arguments, copy, candidate.spec.timeout_ms / 1000, shadow=True
                )
            except ToolRunError as error:
                outcome = error_outcome(error, (time.perf_counter() - started) * 1000)
            else:
                output = run.output
                outcome = tool_outcome(
                    run.result_json,
                    output.answer,
                    output.tool_error,
                    (time.perf_counter() - started) * 1000,
                )
        self._record(release, stable, outcome)

    def route(
        self, release: Release, candidate: ToolRouter, asked: RouteCall, stable: Outcome
    ) -> None:
        """Score the prompt with the candidate rules too, after the answer."""
        self._start(release, self._route(release, candidate, asked, stable))

    async def _route(
        self, release: Release, candidate: ToolRouter, asked: RouteCall, stable: Outcome
    ) -> None:
        started = time.perf_counter()
        try:
            decision = await self._pool.route(
                asked.prompt, asked.allowed, asked.tenant, router=candidate, lookup=asked.lookup
            )
        except RoutingBusyError:
            # Long prompts are queued for the real callers' scoring: no copy then.
            _SHADOW_CALLS.add(1, {"unit": release.unit.label, "result": "skipped"})
            return
        outcome = decision_outcome(decision, (time.perf_counter() - started) * 1000)
        self._record(release, stable, outcome)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
