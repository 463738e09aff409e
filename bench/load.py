"""A closed-loop grpc.aio load generator: C workers, each sending its next call on an answer."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol


class Window(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class Result:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p95_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def percentile(sorted_ms: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_ms:
        return 0.0
    rank = max(1, min(len(sorted_ms), round(q * len(sorted_ms) + 0.5)))
    return sorted_ms[rank - 1]


async def closed_loop(
    call: Callable[[int], Awaitable[object]],
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
    window: Window | None = None,
) -> Result:
    """Run ``call(worker)`` from ``concurrency`` workers; measure after a warm-up.
    ``window`` is started when measuring starts and stopped when it ends (CPU accounting)."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + warmup_s + duration_s
    measure_from = time.monotonic() + warmup_s

    async def worker(index: int) -> None:
        nonlocal errors
        while (now := time.monotonic()) < stop_at:
            started = time.perf_counter()
            try:
                await call(index)
            except Exception:
                if now >= measure_from:
                    errors += 1
                continue
            if now >= measure_from:
                latencies.append((time.perf_counter() - started) * 1000)

    async def mark() -> None:
        if window is not None:
            await asyncio.sleep(warmup_s)
            window.start()
            await asyncio.sleep(max(stop_at - time.monotonic(), 0))
            window.stop()

    await asyncio.gather(mark(), *(worker(i) for i in range(concurrency)))
    latencies.sort()
    return Result(
        concurrency=concurrency,
        requests=len(latencies),
        errors=errors,
        seconds=duration_s,
        p50_ms=statistics.median(latencies) if latencies else 0.0,
        p95_ms=percentile(latencies, 0.95),
        p99_ms=percentile(latencies, 0.99),
    )
