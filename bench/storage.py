"""Storage per Run: what telemetry keeps on disk for each Gateway.Run, by data kind.

Runs a fresh mesh (SQLite, the development wiring) twice: keeping every trace, then with tail
sampling at a 10% ratio (errors and slow traces are always kept). Each time it sends a warm-up
Run, measures the telemetry database, sends RUNS more Runs, waits until their usage records
have arrived and no span awaits its sampling decision, and measures again. The difference in
pages used per table and index (SQLite's dbstat), divided by the Runs, is the figure: what
retention has to hold per Run for as long as it keeps each kind.

Called from bench/run.py, which appends the section to BENCHMARKS.md; runnable on its own:
``python -m bench.storage``.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from grpc import aio

from testing.mesh import REPO, Mesh
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

RUNS = int(os.environ.get("BENCH_STORAGE_RUNS", "400"))
CONCURRENCY = 8
PROMPT = "what is 17 * 23"
# Table -> the data kind its rows (and its indexes) belong to.
KINDS = {
    "telemetry_spans": "spans",
    "telemetry_usage": "usage records",
    "telemetry_usage_totals": "usage records",
    "telemetry_reservations": "usage records",
    "telemetry_audit": "audit",
    "telemetry_audit_heads": "audit",
    "telemetry_audit_anchors": "audit",
}
ORDER = ("spans", "usage records", "audit")
SAMPLED = {
    "TOOLMESH_TELEMETRY_TRACE_KEEP_RATIO": "0.1",
    "TOOLMESH_TELEMETRY_TRACE_DECISION_WAIT_S": "2",
    "TOOLMESH_TELEMETRY_TRACE_DECISION_INTERVAL_S": "0.5",
}


@dataclass(frozen=True)
class Usage:
    """Bytes of pages and rows per kind."""

    bytes: dict[str, int]
    rows: dict[str, int]


def _measure(database: Path) -> Usage:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
        owner = dict(conn.execute("SELECT name, tbl_name FROM sqlite_schema"))
        sizes: dict[str, int] = {}
        for name, pages in conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"):
            kind = KINDS.get(owner.get(name, name))
            if kind:
                sizes[kind] = sizes.get(kind, 0) + int(pages)
        rows = dict.fromkeys(ORDER, 0)
        for table, kind in KINDS.items():
            rows[kind] += int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    return Usage(sizes, rows)


def _settled(database: Path, runs: int) -> bool:
    """Every Run's usage record arrived and no span waits for its sampling decision."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
        (records,) = conn.execute("SELECT count(*) FROM telemetry_usage").fetchone()
        (pending,) = conn.execute("SELECT count(*) FROM telemetry_spans WHERE NOT kept").fetchone()
    return int(records) >= runs and int(pending) == 0


async def _runs(target: str, token: str, count: int, tag: str) -> None:
    metadata = (("authorization", f"Bearer {token}"),)
    queue = iter(range(count))
    async with aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=15)
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def worker() -> None:
            for i in queue:
                request = gateway_pb2.RunRequest(session_id=f"{tag}-{i}", prompt=PROMPT)
                await stub.Run(request, metadata=metadata, timeout=10)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


def _wait(database: Path, runs: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not _settled(database, runs):
        if time.monotonic() > deadline:
            raise RuntimeError("usage records or sampling decisions did not settle in time")
        time.sleep(0.5)
    # Spans of the last Runs are exported in batches about once a second.
    time.sleep(2.5)


def measure(extra_env: dict[str, str]) -> tuple[Usage, int]:
    """Bytes and rows per kind added by RUNS Runs on a fresh mesh; and the Runs measured."""
    with tempfile.TemporaryDirectory(prefix="toolmesh-storage-") as tmp:
        env = {"TOOLMESH_LOG_LEVEL": "WARNING", **extra_env}
        mesh = Mesh(data_dir=Path(tmp), extra_env=env)
        database = Path(tmp) / "telemetry.db"
        try:
            mesh.start_all()
            token = mesh.token()
            asyncio.run(_runs(mesh.gateway, token, 1, "warm-up"))
            _wait(database, 1)
            before = _measure(database)
            asyncio.run(_runs(mesh.gateway, token, RUNS, "storage"))
            _wait(database, RUNS + 1)
            after = _measure(database)
        finally:
            mesh.stop_all()
    added = Usage(
        {k: after.bytes.get(k, 0) - before.bytes.get(k, 0) for k in ORDER},
        {k: after.rows[k] - before.rows[k] for k in ORDER},
    )
    return added, RUNS


def section() -> list[str]:
    """The "Storage per Run" section of BENCHMARKS.md, measured now."""
    lines = [
        "",
        "## Storage per Run",
        "",
        f'Produced by `bench/storage.py`: {RUNS} `Run("{PROMPT}")` on a fresh SQLite mesh '
        "after one warm-up Run; the growth of the pages telemetry's tables and indexes use "
        "(SQLite `dbstat`), divided by the Runs. A calculator Run is read-only, so it leaves no "
        "audit event (a write-tool Run adds one `tool.write` event). Retention holds each kind "
        "for its own time (docs/observability.md).",
        "",
        "| telemetry | kind | rows per Run | bytes per Run |",
        "|---|---|---|---|",
    ]
    for label, env in (
        ("every trace kept (`trace_keep_ratio` 1)", {}),
        ("tail sampling, 10% of ordinary traces", SAMPLED),
    ):
        usage, runs = measure(env)
        for kind in ORDER:
            lines.append(
                f"| {label} | {kind} | {usage.rows[kind] / runs:.2f} "
                f"| {usage.bytes[kind] / runs:,.0f} |"
            )
        total = sum(usage.bytes.values()) / runs
        lines.append(f"| {label} | **total** | | **{total:,.0f}** |")
        print(f"storage, {label}: {total:,.0f} bytes per Run", flush=True)
    lines += [
        "",
        "Every Run here answers quickly and without error, so with sampling only the ratio "
        "keeps its spans; a failed or slow Run keeps all of them. At 30 Runs/s a week is "
        "18.1 million Runs: multiply the bytes per Run by that for a week of retention.",
        "",
    ]
    return lines


def append_section(report: Path) -> None:
    with report.open("a") as file:
        file.write("\n".join(section()))


if __name__ == "__main__":
    print("\n".join(section()))
    print(f"(not written; `make bench` appends it to {REPO / 'BENCHMARKS.md'})")
