"""CPU time per request and idle RSS of every mesh process, from /proc (Linux), and py-spy
profiles of every process under load (`python -m bench.cpu`).

CPU per Run is the process's user+system time over the measured window divided by the Runs
answered in it: the share of the machine each hop costs, whatever the scheduling noise does
to latency.
"""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from testing.mesh import SERVICES, Mesh

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command's closing parenthesis: state is field 3, utime 14, stime 15.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class CpuWindow:
    """CPU seconds each named process used between ``start`` and ``stop`` (the load
    generator calls them at the ends of its measured window, after the warm-up)."""

    pids: dict[str, int]
    used: dict[str, float] = field(default_factory=dict)
    _before: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        self._before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> None:
        self.used = {n: cpu_seconds(pid) - self._before[n] for n, pid in self.pids.items()}

    def per_request_ms(self, requests: int) -> dict[str, float]:
        return {name: s * 1000 / requests for name, s in self.used.items()} if requests else {}


def mesh_pids(mesh: Mesh) -> dict[str, int]:
    return {name: mesh.procs[name].pid for name in SERVICES if name in mesh.procs}


def cpu_table(rows: list[tuple[str, int, CpuWindow]]) -> list[str]:
    """Markdown rows: CPU ms per request per process, and their sum."""
    names = [*SERVICES, "load generator"]
    lines = [
        "| call | " + " | ".join(names) + " | total |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for label, requests, window in rows:
        per = window.per_request_ms(requests)
        cells = [f"{per.get(n, 0.0):.2f}" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {sum(per.values()):.2f} |")
    return lines


# -- profiles -------------------------------------------------------------------------------


def top_frames(collapsed: Path, limit: int = 12) -> list[tuple[str, float, float]]:
    """(function, self share, inclusive share) of a py-spy ``--format raw`` profile."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[_short(frames[-1])] += count
        for frame in {_short(f) for f in frames}:
            inclusive[frame] += count
    if not total:
        return []
    return [(name, n / total, inclusive[name] / total) for name, n in own.most_common(limit)]


def _short(frame: str) -> str:
    """`func (path/to/module.py:12)` -> `func (module.py)`."""
    name, _, where = frame.partition(" (")
    path = where.split(":", 1)[0]
    parts = Path(path).parts
    return f"{name} ({'/'.join(parts[-2:])})" if parts else name


@contextmanager
def profiled(pids: dict[str, int], out: Path, seconds: float) -> Iterator[None]:
    """py-spy record of every process for ``seconds`` (raw collapsed stacks in ``out``)."""
    spy = Path(sys.executable).with_name("py-spy")
    procs = [
        subprocess.Popen(
            [
                str(spy),
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(int(seconds)),
                "--rate",
                "67",
                "--format",
                "raw",
                "--nonblocking",
                "-o",
                str(out / f"{name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]
    try:
        yield
    finally:
        for proc in procs:
            proc.wait(timeout=seconds + 30)


def main() -> None:
    """Profile a mesh under Run and CallTool load; print CPU per request and the top frames."""
    from bench import run as bench_run

    seconds = float(os.environ.get("BENCH_SECONDS", "8"))
    concurrency = int(os.environ.get("BENCH_PROFILE_CONCURRENCY", "32"))
    out = Path(os.environ.get("BENCH_PROFILE_DIR", tempfile.mkdtemp(prefix="toolmesh-prof-")))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="toolmesh-bench-") as tmp:
        mesh = Mesh(data_dir=Path(tmp), extra_env={"TOOLMESH_LOG_LEVEL": "WARNING"})
        try:
            mesh.start_all()
            token = mesh.token()
            bench_run.set_bench_budget(mesh, token)
            time.sleep(0.5)
            pids = mesh_pids(mesh) | {"load generator": os.getpid()}
            print({name: f"{rss_mb(pid):.0f} MB" for name, pid in pids.items()}, flush=True)
            window = CpuWindow(pids)
            result = asyncio.run(bench_run.bench_run(mesh.gateway, token, concurrency, window))
            print(
                f"Run c={concurrency}: {result.rps:.0f}/s p50 {result.p50_ms:.2f} ms "
                f"errors {result.errors}"
            )
            for line in cpu_table([(f"Run, {concurrency} callers", result.requests, window)]):
                print(line)
            # Profiled separately: the sampler's own CPU would skew the figures above.
            with profiled(mesh_pids(mesh), out, seconds + 1):
                asyncio.run(bench_run.bench_run(mesh.gateway, token, concurrency))
        finally:
            mesh.stop_all()
    for name in SERVICES:
        path = out / f"{name}.txt"
        if path.exists():
            print(f"\n== {name} (self, inclusive)")
            for frame, own, inclusive in top_frames(path, 15):
                print(f"  {own:6.1%} {inclusive:6.1%}  {frame}")
    print(f"\nprofiles in {out}")


if __name__ == "__main__":
    main()
