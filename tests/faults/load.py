"""Steady closed-loop load on the gateway, recording every request's fate."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import grpc
from grpc import aio

from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

PROMPTS = ("what is {n} * 7", "save a note: fault note {n}", "convert {n} km to miles")


@dataclass
class Outcome:
    session: str
    prompt: str
    deadline_s: float
    latency_s: float
    code: str
    degraded: tuple[str, ...] = ()
    request_id: str = ""

    @property
    def acknowledged(self) -> bool:
        return self.code == "OK"

    @property
    def kind(self) -> str:
        if self.code == "OK":
            return "degraded" if self.degraded else "answered"
        if self.code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):
            return "refused"
        return "failed"


@dataclass
class LoadResult:
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for o in self.outcomes if o.kind == kind)

    def p99_ms(self) -> float:
        latencies = sorted(o.latency_s * 1000 for o in self.outcomes)
        if not latencies:
            return 0.0
        return latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]

    def overruns(self, slack_s: float = 0.05) -> list[Outcome]:
        return [o for o in self.outcomes if o.latency_s > o.deadline_s + slack_s]


async def run_load(
    channel: aio.Channel,
    token: str,
    *,
    workers: int,
    duration_s: float,
    deadline_s: float,
    prompts: tuple[str, ...] = PROMPTS,
    think_s: float = 0.01,
) -> LoadResult:
    """``workers`` sessions send Run calls back to back for ``duration_s`` seconds."""
    stub = gateway_pb2_grpc.GatewayStub(channel)
    metadata = (("authorization", f"Bearer {token}"),)
    result = LoadResult()
    stop_at = time.monotonic() + duration_s
    counter = itertools.count()

    async def worker(index: int) -> None:
        session = f"fault-{index}-{int(time.time() * 1000) % 100000}"
        while time.monotonic() < stop_at:
            n = next(counter)
            prompt = prompts[n % len(prompts)].format(n=n)
            started = time.perf_counter()
            try:
                reply = await stub.Run(
                    gateway_pb2.RunRequest(session_id=session, prompt=prompt),
                    metadata=metadata,
                    timeout=deadline_s,
                )
                outcome = Outcome(
                    session,
                    prompt,
                    deadline_s,
                    time.perf_counter() - started,
                    "OK",
                    tuple(reply.degraded),
                    reply.request_id,
                )
            except grpc.aio.AioRpcError as err:
                outcome = Outcome(
                    session, prompt, deadline_s, time.perf_counter() - started, err.code().name
                )
            result.outcomes.append(outcome)
            await asyncio.sleep(think_s)

    await asyncio.gather(*(worker(i) for i in range(workers)))
    return result
