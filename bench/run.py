"""`make bench`: Gateway.Run through the five real processes beside a raw gRPC echo (and, in
bench.model, through the model path beside the rules path).

Both are measured in the same run on the same machine, and every toolmesh figure is reported
as a ratio to the echo, because this machine is shared and noisy. Writes BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
from grpc import aio

from bench import calltool, corpus, footprint, model, storage
from bench.echo_server import METHOD
from bench.load import Result, closed_loop
from testing.mesh import REPO, Mesh, free_port
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

SECONDS = float(os.environ.get("BENCH_SECONDS", "10"))
# Sections other modules measure on the traced mesh, appended to BENCHMARKS.md.
SECTIONS: list[str] = []
CONCURRENCY = tuple(int(c) for c in os.environ.get("BENCH_CONCURRENCY", "1,32").split(","))
PROMPT = "what is 17 * 23"


async def _wait_ready(channel: aio.Channel) -> None:
    await asyncio.wait_for(channel.channel_ready(), timeout=15)


async def bench_echo(target: str, concurrency: int) -> Result:
    async with aio.insecure_channel(target) as channel:
        await _wait_ready(channel)
        echo = channel.unary_unary(METHOD)
        payload = PROMPT.encode()
        return await closed_loop(lambda _w: echo(payload, timeout=5), concurrency, SECONDS)


async def bench_run(target: str, token: str, concurrency: int) -> Result:
    metadata = (("authorization", f"Bearer {token}"),)
    async with aio.insecure_channel(target) as channel:
        await _wait_ready(channel)
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def call(worker: int) -> object:
            request = gateway_pb2.RunRequest(
                session_id=f"bench-{concurrency}-{worker}", prompt=PROMPT
            )
            reply = await stub.Run(request, metadata=metadata, timeout=10)
            if reply.outcome != gateway_pb2.OUTCOME_TOOL_ANSWERED:
                raise RuntimeError(f"degraded answer: {reply.degraded}")
            return reply

        return await closed_loop(call, concurrency, SECONDS)


def _row(name: str, result: Result, base: Result) -> str:
    return (
        f"| {name} | {result.concurrency} | {result.requests} | {result.errors} "
        f"| {result.rps:,.0f} | {result.p50_ms:.2f} | {result.p95_ms:.2f} | {result.p99_ms:.2f} "
        f"| {result.p50_ms / base.p50_ms:.1f}x | {result.rps / base.rps:.3f} |"
    )


def write_report(
    results: list[tuple[Result, Result]], untraced: list[tuple[Result, Result]], path: Path
) -> None:
    lines = [
        "# Benchmarks",
        "",
        "Produced by `make bench` (`python -m bench.run`); do not edit by hand.",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {SECONDS:.0f} s per row after a 1 s warm-up, "
        "closed-loop grpc.aio clients in one process, every server its own process on loopback.",
        "",
        "`echo` is a raw grpc.aio unary echo server measured in the same run: the baseline. "
        '`Run` is `Gateway.Run("what is 17 * 23")` through gateway, auth (JWT verified '
        "in the gateway), memory (history read + two turns appended, SQLite WAL with "
        "synchronous=FULL), router (route + invoke) and telemetry (spans exported in batches). "
        "Ratios: latency is Run p50 / echo p50; throughput is Run rps / echo rps. "
        '"degraded or failed" counts answers that were not a clean tool answer (for example '
        "a turn that went to the outbox because memory's direct write took longer than "
        "`memory_write_timeout_ms` under load) and errors; they are left out of the latencies.",
        "",
        "| call | concurrency | requests | degraded or failed | req/s | p50 ms | p95 ms | p99 ms "
        "| p50 vs echo | rps vs echo |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for echo, run in results:
        lines.append(_row("echo", echo, echo))
        lines.append(_row("Run", run, echo))
    for echo, run in untraced:
        lines.append(_row("echo", echo, echo))
        lines.append(_row("Run, tracing off", run, echo))
    lines += [
        "",
        "Every server is a single-threaded asyncio process; on 2 cores the five services, "
        "memory's SQLite writes (an fsync per group commit) and the load "
        "generator share the CPU, so Run's throughput here is bounded by CPU, not by waiting. "
        '"tracing off" (`TOOLMESH_TRACE_SAMPLE_RATIO=0`) shows the share of that CPU spent '
        "recording, exporting and ingesting a span for every hop (DESIGN.md: sample in "
        "production).",
        "",
    ]
    path.write_text("\n".join(lines))


async def measure(
    echo_target: str, mesh: Mesh, token: str, levels: tuple[int, ...]
) -> list[tuple[Result, Result]]:
    results = []
    for concurrency in levels:
        echo = await bench_echo(echo_target, concurrency)
        run = await bench_run(mesh.gateway, token, concurrency)
        print(
            f"c={concurrency}: echo {echo.rps:,.0f}/s p50 {echo.p50_ms:.2f} ms; "
            f"Run {run.rps:,.0f}/s p50 {run.p50_ms:.2f} ms, errors {run.errors}",
            flush=True,
        )
        results.append((echo, run))
    return results


def _mesh_results(
    echo_target: str, sample_ratio: str, concurrency: tuple[int, ...]
) -> list[tuple[Result, Result]]:
    with tempfile.TemporaryDirectory(prefix="toolmesh-bench-") as tmp:
        env = {"TOOLMESH_LOG_LEVEL": "WARNING", "TOOLMESH_TRACE_SAMPLE_RATIO": sample_ratio}
        mesh = Mesh(data_dir=Path(tmp), extra_env=env)
        try:
            mesh.start_all()
            token = mesh.token()
            time.sleep(0.5)
            results = asyncio.run(measure(echo_target, mesh, token, concurrency))
            if sample_ratio == "1.0":
                SECTIONS.append(
                    asyncio.run(
                        calltool.bench(echo_target, mesh.gateway, token, concurrency, SECONDS)
                    )
                )
            return results
        finally:
            mesh.stop_all()


def main() -> None:
    echo_port = free_port()
    echo = subprocess.Popen([sys.executable, "-m", "bench.echo_server", str(echo_port)], cwd=REPO)
    target = f"127.0.0.1:{echo_port}"
    try:
        traced = _mesh_results(target, "1.0", CONCURRENCY)
        # The same at the highest concurrency with tracing off: what recording every span costs.
        untraced = _mesh_results(target, "0", (max(CONCURRENCY),))
        # Run through the model path beside the rules path and this same echo.
        SECTIONS.append(model.section(target))
        # Start-up time and idle memory of every process (bench.footprint).
        SECTIONS.append(footprint.section())
    finally:
        echo.terminate()
        echo.wait()
    write_report(traced, untraced, REPO / "BENCHMARKS.md")
    with (REPO / "BENCHMARKS.md").open("a", encoding="utf-8") as report:
        report.write("\n" + corpus.section())
        report.writelines("\n" + section for section in SECTIONS)
    storage.append_section(REPO / "BENCHMARKS.md")
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    grpc_version = grpc.__version__
    print(f"grpcio {grpc_version}", flush=True)
    main()
