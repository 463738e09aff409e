"""Start-up time and idle memory of every service process (issue 14: idle RSS <= 80 MB each).

Each service is started the way testing/mesh.py starts it (``python -m <module>``, SQLite,
loopback) and, once the whole mesh serves, left idle for a moment; then its resident set
(``VmRSS``, what a container's memory limit counts) and its peak (``VmHWM``) are read from
/proc. Start-up is the time from spawning the process to its health check answering SERVING
(to its /readyz answering 200 for the MCP face), each process started alone, one after another,
so the figures do not share the CPU with one another.

Where the idle memory goes (``import_profile``): each process's libraries imported one after
another into a fresh interpreter, in a fixed order, the resident set read after each; what
remains is toolmesh's own code with the contracts, and, from the running process's figure,
the state a serving process holds (threads, connections, caches).

``python -m bench.footprint`` prints the section; bench.run appends it to BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from testing.mesh import REPO, SERVICES, Mesh

# The goal of issue 14, per process.
RSS_LIMIT_MB = 80.0
IDLE_S = float(os.environ.get("BENCH_IDLE_S", "3"))


# The libraries measured one by one, in this order (a library's share includes what it loads
# that no library before it had loaded); anything else a process imports counts with its own code.
LIBRARIES = (
    "grpc",
    "google.protobuf",
    "sqlalchemy",
    "sqlalchemy.ext.asyncio",
    "sqlalchemy.dialects.postgresql",
    "aiosqlite",
    "pydantic",
    "pydantic_settings",
    "opentelemetry.sdk.trace",
    "opentelemetry.instrumentation.grpc",
    "opentelemetry.exporter.prometheus",
    "cryptography.hazmat.primitives.asymmetric.ed25519",
    "jwt",
    "argon2",
    "re2",
    "jsonschema",
    "httpx2",
    "openai",
    "mcp",
)
# The module each process is started from.
ENTRY = {name: f"services.{name}.app" for name in SERVICES} | {
    "gateway": "gateway.app",
    "mcpface": "mcpface.app",
}

_PROFILE = """
import importlib, json, sys
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) / 1024
wanted = set(json.loads(sys.argv[1]))
rows = [('the interpreter', rss())]
for library in json.loads(sys.argv[2]):
    if library.split('.')[0] not in wanted:
        continue
    before = rss()
    importlib.import_module(library)
    rows.append((library, rss() - before))
before = rss()
importlib.import_module(sys.argv[3])
rows.append(('toolmesh code, contracts and the rest', rss() - before))
print(json.dumps(rows))
"""

_LOADED = "import importlib, json, sys; importlib.import_module(sys.argv[1]); " + (
    "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
)


def _fresh_python(code: str, *args: str) -> str:
    """What ``code`` prints, run in a fresh interpreter (nothing imported before it)."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def import_profile(process: str) -> list[tuple[str, float]]:
    """(what, MB) of the resident set a process's imports take, library by library."""
    entry = ENTRY[process]
    loaded = _fresh_python(_LOADED, entry)
    out = _fresh_python(_PROFILE, loaded, json.dumps(LIBRARIES), entry)
    return [(str(what), float(mb)) for what, mb in json.loads(out)]


@dataclass(frozen=True)
class Footprint:
    process: str
    start_s: float
    rss_mb: float
    peak_mb: float
    # Started again on the same data: the schema at head (every later start, and every
    # production start, where the migration Job has run first).
    restart_s: float = 0.0
    restart_rss_mb: float = 0.0


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB, from /proc (Linux)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def _start_face(mesh: Mesh, timeout: float = 30.0) -> tuple[subprocess.Popen[bytes], float]:
    """The MCP face in front of the mesh's gateway; returns once /readyz answers 200."""
    log_path = mesh.log_path("mcpface")
    env = {
        **mesh.env(),
        "TOOLMESH_MCPFACE_PORT": "0",
        "TOOLMESH_MCPFACE_METRICS_PORT": "0",
        "TOOLMESH_MCPFACE_GATEWAY_TARGET": mesh.gateway,
        # Its "serving" line names the port it took.
        "TOOLMESH_LOG_LEVEL": "INFO",
    }
    began = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mcpface"], cwd=REPO, env=env, stdout=log, stderr=log
        )
    port = 0
    while time.monotonic() - began < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"mcpface exited {proc.returncode}:\n{mesh.tail('mcpface')}")
        if not port:
            for record in mesh.log_records("mcpface"):
                if record.get("message") == "serving":
                    port = int(str(record["port"]))
        if port:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return proc, time.monotonic() - began
            except (urllib.error.URLError, ConnectionError):
                pass
        time.sleep(0.02)
    proc.kill()
    raise TimeoutError(f"mcpface not ready after {timeout}s:\n{mesh.tail('mcpface')}")


def measure() -> list[Footprint]:
    """A fresh data directory (each service migrates its new schema), then a restart on it."""
    with tempfile.TemporaryDirectory(prefix="toolmesh-footprint-") as tmp:
        first = _measure_once(Path(tmp))
        again = {row.process: row for row in _measure_once(Path(tmp))}
    return [
        Footprint(
            row.process,
            row.start_s,
            row.rss_mb,
            row.peak_mb,
            again[row.process].start_s,
            again[row.process].rss_mb,
        )
        for row in first
    ]


def _measure_once(data_dir: Path) -> list[Footprint]:
    mesh = Mesh(data_dir=data_dir, extra_env={"TOOLMESH_LOG_LEVEL": "WARNING"})
    started: dict[str, float] = {}
    face: subprocess.Popen[bytes] | None = None
    try:
        for name in SERVICES:
            began = time.monotonic()
            mesh.start(name)
            started[name] = time.monotonic() - began
        face, started["mcpface"] = _start_face(mesh)
        time.sleep(IDLE_S)
        pids = {name: mesh.procs[name].pid for name in SERVICES} | {"mcpface": face.pid}
        return [Footprint(name, started[name], *memory_mb(pid)) for name, pid in pids.items()]
    finally:
        if face is not None:
            face.terminate()
            face.wait(15)
        mesh.stop_all()


def section(rows: list[Footprint] | None = None) -> str:
    rows = measure() if rows is None else rows
    lines = [
        "## Footprint: start-up time and idle memory per process",
        "",
        "Produced by `bench.footprint` (part of `make bench`). Every process started as "
        "testing/mesh.py starts it (SQLite, loopback, no TLS, no model, no MCP backend), one "
        "after another; start-up is spawn to health SERVING (the MCP face: to /readyz 200); "
        f"memory (VmRSS) is read from /proc after {IDLE_S:.0f} s idle. First start: a fresh "
        "data directory, each service migrating its new schema (Alembic loaded); restart: the "
        "same processes again on the migrated data, as every later start and every production "
        "start (where the migration Job runs first). "
        f"Goal (issue 14): idle RSS <= {RSS_LIMIT_MB:.0f} MB per process.",
        "",
        "| process | first start s | idle RSS MB | peak RSS MB | restart s | idle RSS MB "
        "| within goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ok = "yes" if max(row.rss_mb, row.restart_rss_mb) <= RSS_LIMIT_MB else "no"
        lines.append(
            f"| {row.process} | {row.start_s:.2f} | {row.rss_mb:.1f} | {row.peak_mb:.1f} "
            f"| {row.restart_s:.2f} | {row.restart_rss_mb:.1f} | {ok} |"
        )
    return "\n".join(lines) + "\n\n" + profile_section(rows)


def profile_section(rows: list[Footprint]) -> str:
    """Where each process's idle memory (restart, schema at head) goes, library by library."""
    profiles = {row.process: dict(import_profile(row.process)) for row in rows}
    names: list[str] = []
    for profile in profiles.values():
        names += [name for name in profile if name not in names]
    own = "toolmesh code, contracts and the rest"
    names = [n for n in names if n != own] + [own, "serving state (idle RSS - imports)"]
    lines = [
        "### Where the idle memory goes (MB of resident set)",
        "",
        "Produced by `bench.footprint.import_profile`: each process's libraries imported into "
        "a fresh interpreter one after another in a fixed order (a library's share includes "
        "what it loads that none before it had), the resident set read after each; its own "
        "code last; serving state is the restarted process's idle RSS (table above) minus all "
        "of that. Shared libraries count in every process's RSS although the kernel keeps one "
        "copy of their code for all of them.",
        "",
        "| part | " + " | ".join(profiles) + " |",
        "|---|" + "---|" * len(profiles),
    ]
    idle = {row.process: row.restart_rss_mb for row in rows}
    for name in names:
        cells = []
        for process, profile in profiles.items():
            if name.startswith("serving state"):
                value: float | None = idle[process] - sum(profile.values())
            else:
                value = profile.get(name)
            cells.append("-" if value is None else f"{value:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    rows = measure()
    print(json.dumps([row.__dict__ for row in rows]))
    print(section(rows))


if __name__ == "__main__":
    main()
