"""`toolmesh up`, `run` and `history` as a user runs them (what `make run` starts)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from stat import S_IMODE

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from testing.mesh import REPO, SERVICES, Mesh, free_port

pytestmark = pytest.mark.e2e

TOOLMESH = shutil.which("toolmesh") or str(Path(os.sys.executable).parent / "toolmesh")


def _serving(target: str) -> bool:
    return _gateway_serving(target)


def _gateway_serving(target: str) -> bool:
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def _up(mesh: Mesh, log: Path) -> subprocess.Popen[bytes]:
    start = log.stat().st_size if log.exists() else 0
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [TOOLMESH, "up"], cwd=REPO, env=mesh.env(), stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 60
    # Supervised (restarts on) once `up` says so, after the MCP face is ready too.
    while not _gateway_serving(mesh.gateway) or b"toolmesh is up" not in log.read_bytes()[start:]:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    return proc


def _down(proc: subprocess.Popen[bytes], log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log.read_text()


def _children(pid: int) -> dict[int, str]:
    """Child pid -> command line, read from /proc."""
    found: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                child = int(stat.parent.name)
                found[child] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return found


def _memory_child(proc: subprocess.Popen[bytes]) -> int | None:
    for child, cmdline in _children(proc.pid).items():
        if "services.memory" in cmdline:
            return child
    return None


def _assert_private(data_dir: Path) -> None:
    """Everything `up` and the services created is the user's alone: 0700 and 0600."""
    assert S_IMODE(data_dir.stat().st_mode) == 0o700
    names = [p.name for p in data_dir.rglob("*") if p.is_file()]
    # SQLite databases with their -wal files, outboxes, signing keys, the dev client's secret.
    for suffix in (".db", ".db-wal", ".pem", "dev-client.json"):
        assert any(name.endswith(suffix) for name in names), (suffix, names)
    for path in [data_dir, *data_dir.rglob("*")]:
        wanted = 0o700 if path.is_dir() else 0o600
        assert S_IMODE(path.stat().st_mode) == wanted, path


def _cli(mesh: Mesh, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TOOLMESH, *args, "--target", mesh.gateway],
        cwd=REPO,
        env=mesh.env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_up_run_restart_history(tmp_path: Path) -> None:
    # The face on a free port too: `up` waits for it before it supervises anything.
    face = {"TOOLMESH_MCPFACE_PORT": str(free_port()), "TOOLMESH_MCPFACE_METRICS_PORT": "0"}
    mesh = Mesh(data_dir=tmp_path / "var", extra_env=face)
    log = tmp_path / "up.log"
    proc = _up(mesh, log)
    try:
        answer = _cli(mesh, "run", "what is 17 * 23", "--session", "demo")
        assert answer.returncode == 0, answer.stderr
        assert "391" in answer.stdout
        assert "calculator" in answer.stdout
        as_json = _cli(mesh, "run", "what is 2 + 3", "--session", "demo", "--json")
        assert as_json.returncode == 0, as_json.stderr
        reply = json.loads(as_json.stdout)
        assert reply["tool_name"] == "calculator" and len(reply["trace_id"]) == 32
        # Without --session: the documented default session, which `history` reads too.
        unnamed = _cli(mesh, "run", "what is 4 * 5")
        assert unnamed.returncode == 0 and "20" in unnamed.stdout, unnamed.stderr
        default = _cli(mesh, "history", "--json")
        assert default.returncode == 0, default.stderr
        assert json.loads(default.stdout)["turns"][0]["content"] == "what is 4 * 5"
        bad = _cli(mesh, "run", "", "--session", "demo")
        assert bad.returncode != 0
        assert "INVALID_ARGUMENT" in bad.stderr and "Traceback" not in bad.stderr
        _assert_private(mesh.data_dir)

        # A crashed service is restarted by `up`, as the deployment platform would.
        crashed = _memory_child(proc)
        assert crashed is not None
        os.kill(crashed, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (_memory_child(proc) in (None, crashed)) or not _serving(mesh.target("memory")):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert "restarting" in log.read_text()
    finally:
        _down(proc, log)
    for name in SERVICES:
        assert not _gateway_serving(mesh.target(name))

    proc = _up(mesh, log)
    try:
        history = _cli(mesh, "history", "--session", "demo", "--json")
        assert history.returncode == 0, history.stderr
        turns = json.loads(history.stdout)["turns"]
        contents = [turn["content"] for turn in turns]
        assert contents[0] == "what is 17 * 23" and "391" in contents[1]
        assert len(contents) == 4
    finally:
        _down(proc, log)
