"""`toolmesh up` as a process: it reports what its own children do, and a start-up error is a
clear message and exit code 2, never a traceback or a false "toolmesh is up"."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from testing.mesh import REPO, SERVICES, free_port
from tests.e2e.test_cli import TOOLMESH

pytestmark = pytest.mark.e2e


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOOLMESH_")}
    env["PYTHONPATH"] = str(REPO)
    env["TOOLMESH_DATA_DIR"] = str(data_dir)
    env["TOOLMESH_GRACE_PERIOD_S"] = "1"
    for name in SERVICES:
        env[f"TOOLMESH_{name.upper()}_METRICS_PORT"] = "0"
    env.update(extra)
    return env


def _up(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TOOLMESH, "up", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _free_range(count: int = 6) -> int:
    """A base port whose ``count`` ports are all free now."""
    for _ in range(50):
        base = free_port()
        if base + count > 65535:
            continue
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port range")


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, int]]:
    """A port of a would-be mesh taken by this very test process."""
    base = _free_range()
    sock = socket.socket()
    sock.bind(("127.0.0.1", base + 2))  # the router's port
    sock.listen()
    try:
        yield sock, base
    finally:
        sock.close()


def test_a_taken_port_is_named_with_the_process_holding_it(
    tmp_path: Path, listener: tuple[socket.socket, int]
) -> None:
    _, base = listener
    result = _up(_env(tmp_path / "var"), "--base-port", str(base))
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert f"port {base + 2} (TOOLMESH_ROUTER_PORT, router) is taken by pid {os.getpid()}" in (
        result.stderr
    )
    assert "toolmesh is up" not in output and "SERVING" not in output
    assert "Traceback" not in output


def test_a_child_that_refuses_to_start_is_reported_by_its_reason(tmp_path: Path) -> None:
    env = _env(tmp_path / "var", TOOLMESH_AUTH_POLICY_FILE="/nonexistent/policy.toml")
    result = _up(env, "--base-port", str(_free_range()))
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "auth refused to start: TOOLMESH_AUTH_POLICY_FILE" in result.stderr
    assert "fix: point TOOLMESH_AUTH_POLICY_FILE at a valid policy file" in result.stderr
    assert "telemetry stopped" in result.stdout  # what had started is stopped again
    assert "toolmesh is up" not in output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("base", "says"),
    [
        ("65532", "puts the last port (the MCP face's) at 65537"),
        ("-5", "choose a base port from"),
        ("http", "is not a port number"),
    ],
)
def test_base_ports_out_of_range_are_refused(tmp_path: Path, base: str, says: str) -> None:
    result = _up(_env(tmp_path / "var"), "--base-port", base, timeout=30)
    assert result.returncode == 2
    assert says in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "var").exists()  # refused before anything was started or created


def test_an_unusable_data_directory_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = _up(_env(blocker / "var"), "--base-port", str(_free_range()), timeout=30)
    assert result.returncode == 2
    assert "TOOLMESH_DATA_DIR" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
