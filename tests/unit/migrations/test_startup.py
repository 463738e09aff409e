"""Real service processes refuse a schema they are not made for, with a message saying what to run.

Each case starts ``python -m services.<name>`` with TOOLMESH_<NAME>_DATABASE_URL pointing at a
database prepared for it, and `toolmesh migrate` as an operator would run it (the Job's step).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.kit import migrations as kit
from tests.unit.migrations.conftest import ROOT, SERVICES
from tests.unit.migrations.test_migrations import stamp

START_TIMEOUT_S = 30


def service_env(name: str, url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOOLMESH_")}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "TOOLMESH_DATA_DIR": str(data_dir),
            f"TOOLMESH_{name.upper()}_DATABASE_URL": url,
            f"TOOLMESH_{name.upper()}_PORT": "0",
            "TOOLMESH_METRICS_PORT": "0",
            "TOOLMESH_OTLP_ENDPOINT": "",
            # Only the router calls out (tool health); nothing listens there, which it tolerates.
            "TOOLMESH_ROUTER_TELEMETRY_TARGET": "127.0.0.1:9",
        }
    )
    env.update(extra)
    return env


def refused(name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the service, expecting it to exit on its own."""
    return subprocess.run(
        [sys.executable, "-m", f"services.{name}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )


def serves(name: str, env: dict[str, str]) -> str:
    """Start the service, wait for its "serving" log line, stop it with SIGTERM; its output."""
    process = subprocess.Popen(
        [sys.executable, "-m", f"services.{name}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        for line in process.stdout:
            lines.append(line)
            if '"message": "serving"' in line or time.monotonic() > deadline:
                break
    finally:
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=START_TIMEOUT_S)
    output = "".join(lines) + rest
    assert '"message": "serving"' in output, output
    return output


def migrate_cli(name: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "migrate", "--service", name, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )


@pytest.mark.parametrize("name", ["router", "memory", "auth"])
async def test_a_service_refuses_a_schema_newer_than_it_knows(
    database_url: str, name: str, tmp_path: Path
) -> None:
    service = SERVICES[name]
    await kit.upgrade(database_url, service.migrations)
    await stamp(database_url, service, "ffffffffffff")  # as a newer release would have left it

    # Whether or not it may migrate: a schema from the future is never "migrated" back.
    for migrate in ("true", "false") if name == "router" else ("true",):
        env = service_env(
            name, database_url, tmp_path, **{f"TOOLMESH_{name.upper()}_MIGRATE_ON_START": migrate}
        )
        done = refused(name, env)
        output = done.stdout + done.stderr
        assert done.returncode != 0, output
        assert "refusing to start" in output
        assert "revision ffffffffffff, which this release does not know" in output
        assert f"toolmesh migrate --service {name} --downgrade" in output
    # Nothing was changed by the refusals.
    assert await kit.current(database_url, service.migrations) == ("ffffffffffff",)


async def test_without_migrate_on_start_the_router_waits_for_toolmesh_migrate(
    database_url: str, tmp_path: Path
) -> None:
    migrations = SERVICES["router"].migrations
    env = service_env("router", database_url, tmp_path, TOOLMESH_ROUTER_MIGRATE_ON_START="false")
    done = refused("router", env)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "run `toolmesh migrate --service router`" in output
    assert await kit.current(database_url, migrations) == ()

    shown = migrate_cli("router", env, "--show")
    assert shown.returncode == 0, shown.stderr
    assert "current <none>, head 0005: behind" in shown.stdout

    migrated = migrate_cli("router", env)
    assert migrated.returncode == 0, migrated.stderr
    assert "router: current <none>, target 0005 (head)" in migrated.stdout
    assert "router: now at 0005" in migrated.stdout
    assert await kit.current(database_url, migrations) == migrations.heads

    serves("router", env)
    again = migrate_cli("router", env)
    assert again.returncode == 0 and "router: already at 0005" in again.stdout


async def test_toolmesh_migrate_fails_clearly(tmp_path: Path) -> None:
    env = service_env("memory", "", tmp_path)
    unknown = migrate_cli("memory", env, "--to", "zzz")
    assert unknown.returncode == 1
    assert "error: memory:" in unknown.stderr and "zzz" in unknown.stderr
    unreachable = migrate_cli(
        "memory", env, "--database-url", "postgresql://postgres@127.0.0.1:9/nowhere"
    )
    assert unreachable.returncode == 1
    assert "error: memory: migration failed: OperationalError" in unreachable.stderr
    # The default database is the service's own SQLite file under TOOLMESH_DATA_DIR.
    assert (tmp_path / "memory.db").exists()
