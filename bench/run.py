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

from bench import calltool, corpus, cpu, footprint, model, storage
from bench.echo_server import METHOD
from bench.load import Result, Window, closed_loop
from testing.mesh import REPO, Mesh, free_port
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from toolmesh.telemetry.v1 import telemetry_pb2

SECONDS = float(os.environ.get("BENCH_SECONDS", "10"))
# Sections other modules measure on the traced mesh, appended to BENCHMARKS.md.
SECTIONS: list[str] = []
# CPU per request per process (label, requests, window), and idle RSS per service (MB).
CPU_ROWS: list[tuple[str, int, cpu.CpuWindow]] = []
IDLE_RSS: dict[str, float] = {}
# The echo's own CPU per call (concurrency, server ms, client ms): the price of one bare hop.
ECHO_CPU: list[tuple[int, float, float]] = []
ECHO_PID: list[int] = []
CONCURRENCY = tuple(int(c) for c in os.environ.get("BENCH_CONCURRENCY", "1,32").split(","))
PROMPT = "what is 17 * 23"


async def _wait_ready(channel: aio.Channel) -> None:
    await asyncio.wait_for(channel.channel_ready(), timeout=15)


async def bench_echo(target: str, concurrency: int) -> Result:
    pids = {"server": ECHO_PID[0], "client": os.getpid()} if ECHO_PID else {}
    window = cpu.CpuWindow(pids)
    async with aio.insecure_channel(target) as channel:
        await _wait_ready(channel)
        echo = channel.unary_unary(METHOD)
        payload = PROMPT.encode()
        result = await closed_loop(
            lambda _w: echo(payload, timeout=5), concurrency, SECONDS, window=window
        )
    if pids and concurrency not in {c for c, _, _ in ECHO_CPU}:
        per = window.per_request_ms(result.requests)
        ECHO_CPU.append((concurrency, per["server"], per["client"]))
    return result


async def bench_run(
    target: str, token: str, concurrency: int, window: Window | None = None
) -> Result:
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

        return await closed_loop(call, concurrency, SECONDS, window=window)


def set_bench_budget(mesh: Mesh, token: str) -> None:
    """A budget for the bench caller's whole tenant, far above what the bench spends: every
    Run is checked against it, none is refused by it."""
    with mesh.channel("gateway") as channel:
        gateway_pb2_grpc.GatewayStub(channel).SetBudget(
            gateway_pb2.SetBudgetRequest(
                period=telemetry_pb2.BUDGET_PERIOD_DAY,
                limits=telemetry_pb2.BudgetAmounts(tool_calls=1_000_000_000),
            ),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=10,
        )


def _row(name: str, result: Result, base: Result) -> str:
    return (
        f"| {name} | {result.concurrency} | {result.requests} | {result.errors} "
        f"| {result.rps:,.0f} | {result.p50_ms:.2f} | {result.p95_ms:.2f} | {result.p99_ms:.2f} "
        f"| {result.p50_ms / base.p50_ms:.1f}x | {result.rps / base.rps:.3f} |"
    )


def write_report(
    results: list[tuple[Result, Result]],
    variants: list[tuple[str, list[tuple[Result, Result]]]],
    path: Path,
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
        "in the gateway), memory (two turns appended, SQLite WAL with "
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
    for label, variant in variants:
        for echo, run in variant:
            lines.append(_row("echo", echo, echo))
            lines.append(_row(label, run, echo))
    lines += [
        "",
        "Every server is a single-threaded asyncio process; on 2 cores the five services, "
        "memory's SQLite writes (an fsync per group commit) and the load "
        "generator share the CPU, so Run's throughput here is bounded by CPU, not by waiting. "
        '"tracing off" (`TOOLMESH_TRACE_SAMPLE_RATIO=0`) shows the share of that CPU spent '
        "recording, exporting and ingesting a span for every hop (DESIGN.md: sample in "
        'production). "synchronous=NORMAL" runs memory, telemetry and the gateway\'s outbox '
        "with `sqlite_synchronous=NORMAL`: no fsync per commit, an acknowledged write survives "
        'kill -9 of a process but not a power loss (docs/reliability.md, "SQLite '
        'durability"); every other row keeps the default, FULL.',
        "",
        "## CPU per request per process (this run)",
        "",
        "Milliseconds of CPU (user + system, from /proc) each process used over a row's "
        "measured window, divided by the requests answered in it: what each hop costs the "
        "machine, whatever scheduling noise does to latency. Every row runs with a budget "
        "set for the bench tenant.",
        "",
        *cpu.cpu_table(CPU_ROWS),
        "",
        *(
            f"A raw echo call at {c} callers costs {server + client:.2f} ms of CPU "
            f"(server {server:.2f}, client {client:.2f}): the price of one bare gRPC hop in "
            "Python, before any control. A rules-routed Run makes four such hops "
            "(caller -> gateway, gateway -> router twice, gateway -> memory) besides the "
            "batched span, usage and outbox traffic."
            for c, server, client in ECHO_CPU
            if c == max(CONCURRENCY)
        ),
        "",
        "Idle RSS per service (after start-up, before load): "
        + ", ".join(f"{name} {mb:.0f} MB" for name, mb in IDLE_RSS.items())
        + ".",
        "",
        (REPO / "bench" / "changes.md").read_text(),
        (REPO / "bench" / "before.md").read_text(),
    ]
    path.write_text("\n".join(lines))


async def measure(
    echo_target: str, mesh: Mesh, token: str, levels: tuple[int, ...], label: str = "Run"
) -> list[tuple[Result, Result]]:
    results = []
    for concurrency in levels:
        echo = await bench_echo(echo_target, concurrency)
        window = cpu.CpuWindow(cpu.mesh_pids(mesh) | {"load generator": os.getpid()})
        run = await bench_run(mesh.gateway, token, concurrency, window)
        CPU_ROWS.append((f"{label}, {concurrency} callers", run.requests, window))
        print(
            f"c={concurrency}: echo {echo.rps:,.0f}/s p50 {echo.p50_ms:.2f} ms; "
            f"Run {run.rps:,.0f}/s p50 {run.p50_ms:.2f} ms, errors {run.errors}",
            flush=True,
        )
        results.append((echo, run))
    return results


# Beside the default rows, at the highest concurrency: what recording every span costs, and
# what an fsync per commit costs (memory, telemetry and the gateway's outbox file).
UNTRACED = ("Run, tracing off", {"TOOLMESH_TRACE_SAMPLE_RATIO": "0"})
SYNCHRONOUS_NORMAL = (
    "Run, synchronous=NORMAL",
    {
        "TOOLMESH_SQLITE_SYNCHRONOUS": "NORMAL",
        "TOOLMESH_GATEWAY_OUTBOX_SQLITE_SYNCHRONOUS": "NORMAL",
    },
)


def _mesh_results(
    echo_target: str,
    concurrency: tuple[int, ...],
    label: str = "Run",
    env: dict[str, str] | None = None,
) -> list[tuple[Result, Result]]:
    """Rows of ``label`` on a fresh mesh with ``env``; the default rows (no ``env``) also
    measure idle RSS and CallTool."""
    with tempfile.TemporaryDirectory(prefix="toolmesh-bench-") as tmp:
        traced = env is None
        extra = {"TOOLMESH_LOG_LEVEL": "WARNING", "TOOLMESH_TRACE_SAMPLE_RATIO": "1.0"}
        mesh = Mesh(data_dir=Path(tmp), extra_env=extra | (env or {}))
        try:
            mesh.start_all()
            token = mesh.token()
            set_bench_budget(mesh, token)
            time.sleep(0.5)
            if traced:
                IDLE_RSS.update({n: cpu.rss_mb(pid) for n, pid in cpu.mesh_pids(mesh).items()})
            results = asyncio.run(measure(echo_target, mesh, token, concurrency, label))
            if traced:
                pids = cpu.mesh_pids(mesh) | {"load generator": os.getpid()}
                SECTIONS.append(
                    asyncio.run(
                        calltool.bench(
                            echo_target,
                            mesh.gateway,
                            token,
                            concurrency,
                            SECONDS,
                            cpu_rows=CPU_ROWS,
                            pids=pids,
                        )
                    )
                )
            return results
        finally:
            mesh.stop_all()


def main() -> None:
    echo_port = free_port()
    echo = subprocess.Popen([sys.executable, "-m", "bench.echo_server", str(echo_port)], cwd=REPO)
    ECHO_PID.append(echo.pid)
    target = f"127.0.0.1:{echo_port}"
    try:
        traced = _mesh_results(target, CONCURRENCY)
        variants = [
            (label, _mesh_results(target, (max(CONCURRENCY),), label, env))
            for label, env in (UNTRACED, SYNCHRONOUS_NORMAL)
        ]
        # Run through the model path beside the rules path and this same echo.
        SECTIONS.append(model.section(target))
        # Start-up time and idle memory of every process (bench.footprint).
        SECTIONS.append(footprint.section())
    finally:
        echo.terminate()
        echo.wait()
    write_report(traced, variants, REPO / "BENCHMARKS.md")
    with (REPO / "BENCHMARKS.md").open("a", encoding="utf-8") as report:
        report.write("\n" + corpus.section())
        report.writelines("\n" + section for section in SECTIONS)
    storage.append_section(REPO / "BENCHMARKS.md")
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    grpc_version = grpc.__version__
    print(f"grpcio {grpc_version}", flush=True)
    main()
