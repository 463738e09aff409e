"""Every start-up error of every service, as a real process: exit code 2, exactly one CRITICAL
JSON line naming the environment variable and the fix, and no traceback anywhere.

The processes exit during start-up, so they all run at once (a few seconds in all).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.kit.certs import make_all
from testing.mesh import MODULES, REPO


@dataclass(frozen=True)
class Case:
    name: str
    service: str
    env: dict[str, str]
    # The environment variable the CRITICAL line must name.
    setting: str
    # Extra words the message must hold (a path, a port).
    says: tuple[str, ...] = ()


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    critical: list[dict[str, object]] = field(default_factory=list)


@dataclass(frozen=True)
class Files:
    root: Path
    certs: Path
    a_file: Path
    bad_toml: Path
    garbage_pem: Path
    # A copy of each service's key (so it matches its certificate), mode 0644.
    open_keys: dict[str, Path]
    open_dir: Path
    busy_port: int
    busy_metrics_port: int


def _tls(files: Files, service: str, key: Path | None = None) -> dict[str, str]:
    prefix = f"TOOLMESH_{service.upper()}_"
    return {
        prefix + "TLS_CERT_FILE": str(files.certs / f"{service}.pem"),
        prefix + "TLS_KEY_FILE": str(key or files.certs / f"{service}.key"),
        "TOOLMESH_TLS_CA_FILE": str(files.certs / "ca.pem"),
    }


def _production(files: Files, service: str, **extra: str) -> dict[str, str]:
    env = {"TOOLMESH_ENV": "production", **_tls(files, service)}
    if service != "gateway":
        env[f"TOOLMESH_{service.upper()}_ALLOWED_PEERS"] = "gateway"
    env.update(extra)
    return env


def cases(files: Files) -> list[Case]:
    """Each service with the errors whose code differs per service; each error of the shared
    kit code once, on one service or another."""
    listed: list[Case] = []
    for service in MODULES:
        svc = service.upper()
        listed += [
            Case(
                "port-taken",
                service,
                {f"TOOLMESH_{svc}_PORT": str(files.busy_port)},
                f"TOOLMESH_{svc}_PORT",
                (str(files.busy_port),),
            ),
            Case("env-prod", service, {"TOOLMESH_ENV": "prod"}, "TOOLMESH_ENV"),
            Case(
                "production-key-world-readable",
                service,
                _production(
                    files,
                    service,
                    **{f"TOOLMESH_{svc}_TLS_KEY_FILE": str(files.open_keys[service])},
                ),
                f"TOOLMESH_{svc}_TLS_KEY_FILE",
                (str(files.open_keys[service]),),
            ),
        ]
    for service in ("gateway", "auth", "memory"):
        listed.append(
            Case(
                "data-dir-is-a-file",
                service,
                {"TOOLMESH_DATA_DIR": str(files.a_file)},
                "TOOLMESH_DATA_DIR",
                (str(files.a_file),),
            )
        )
    for service in ("auth", "memory"):
        name = f"TOOLMESH_{service.upper()}_DATABASE_URL"
        listed.append(
            Case(
                "database-unreachable",
                service,
                {name: "postgresql://toolmesh@127.0.0.1:1/toolmesh"},
                name,
            )
        )
    listed += [
        Case(
            "port-not-a-number",
            "gateway",
            {"TOOLMESH_GATEWAY_PORT": "abc"},
            "TOOLMESH_GATEWAY_PORT",
        ),
        Case("port-out-of-range", "auth", {"TOOLMESH_AUTH_PORT": "70000"}, "TOOLMESH_AUTH_PORT"),
        Case(
            "tls-cert-missing",
            "router",
            {**_tls(files, "router"), "TOOLMESH_ROUTER_TLS_CERT_FILE": "/nonexistent.pem"},
            "TOOLMESH_ROUTER_TLS_CERT_FILE",
        ),
        Case(
            "tls-key-garbage",
            "memory",
            _tls(files, "memory", key=files.garbage_pem),
            "TOOLMESH_MEMORY_TLS_KEY_FILE",
        ),
        Case(
            "tls-key-of-another-certificate",
            "telemetry",
            _tls(files, "telemetry", key=files.certs / "gateway.key"),
            "TOOLMESH_TELEMETRY_TLS_KEY_FILE",
        ),
        Case(
            "tls-partial",
            "memory",
            {"TOOLMESH_MEMORY_TLS_CERT_FILE": "/x.pem"},
            "TOOLMESH_MEMORY_TLS_KEY_FILE",
        ),
        Case(
            "production-without-tls",
            "telemetry",
            {"TOOLMESH_ENV": "production"},
            "TOOLMESH_TELEMETRY_TLS_CERT_FILE",
        ),
        Case(
            "production-data-dir-open",
            "gateway",
            _production(files, "gateway", TOOLMESH_DATA_DIR=str(files.open_dir)),
            "TOOLMESH_DATA_DIR",
            (str(files.open_dir),),
        ),
        Case(
            "production-empty-allowlist",
            "router",
            _production(files, "router", TOOLMESH_ROUTER_ALLOWED_PEERS=""),
            "TOOLMESH_ROUTER_ALLOWED_PEERS",
        ),
        Case("log-level-unknown", "auth", {"TOOLMESH_LOG_LEVEL": "LOUD"}, "TOOLMESH_LOG_LEVEL"),
        Case(
            "metrics-port-taken",
            "router",
            {"TOOLMESH_ROUTER_METRICS_PORT": str(files.busy_metrics_port)},
            "TOOLMESH_ROUTER_METRICS_PORT",
        ),
        Case(
            "peer-aliases-malformed",
            "memory",
            {"TOOLMESH_PEER_ALIASES": "gateway"},
            "TOOLMESH_PEER_ALIASES",
        ),
        Case(
            "database-url-malformed",
            "telemetry",
            {"TOOLMESH_TELEMETRY_DATABASE_URL": "not a url"},
            "TOOLMESH_TELEMETRY_DATABASE_URL",
        ),
        Case(
            "database-driver-unknown",
            "router",
            {"TOOLMESH_ROUTER_DATABASE_URL": "mysql://u@127.0.0.1/db"},
            "TOOLMESH_ROUTER_DATABASE_URL",
        ),
        Case(
            "rules-file-missing",
            "router",
            {"TOOLMESH_ROUTER_RULES_FILE": "/nonexistent/routing.toml"},
            "TOOLMESH_ROUTER_RULES_FILE",
        ),
        Case(
            "rules-file-not-toml",
            "router",
            {"TOOLMESH_ROUTER_RULES_FILE": str(files.bad_toml)},
            "TOOLMESH_ROUTER_RULES_FILE",
        ),
        Case(
            "plugin-module-missing",
            "router",
            {"TOOLMESH_ROUTER_PLUGIN_MODULES": "no_such_module_anywhere"},
            "TOOLMESH_ROUTER_PLUGIN_MODULES",
        ),
        Case(
            "prices-file-missing",
            "telemetry",
            {"TOOLMESH_TELEMETRY_PRICES_FILE": "/nonexistent/prices.toml"},
            "TOOLMESH_TELEMETRY_PRICES_FILE",
        ),
        Case(
            "slo-file-not-toml",
            "telemetry",
            {"TOOLMESH_TELEMETRY_SLO_FILE": str(files.bad_toml)},
            "TOOLMESH_TELEMETRY_SLO_FILE",
        ),
        Case(
            "policy-file-missing",
            "auth",
            {"TOOLMESH_AUTH_POLICY_FILE": "/nonexistent/policy.toml"},
            "TOOLMESH_AUTH_POLICY_FILE",
        ),
        Case(
            "token-ttl-too-short",
            "auth",
            {"TOOLMESH_AUTH_TOKEN_TTL_S": "5"},
            "TOOLMESH_AUTH_TOKEN_TTL_S",
        ),
        Case(
            "history-limits-inverted",
            "memory",
            {
                "TOOLMESH_MEMORY_DEFAULT_HISTORY_LIMIT": "50",
                "TOOLMESH_MEMORY_MAX_HISTORY_LIMIT": "10",
            },
            "TOOLMESH_MEMORY_DEFAULT_HISTORY_LIMIT",
        ),
        Case(
            "deadline-negative",
            "gateway",
            {"TOOLMESH_GATEWAY_DEFAULT_DEADLINE_S": "-1"},
            "TOOLMESH_GATEWAY_DEFAULT_DEADLINE_S",
        ),
    ]
    return listed


def _listening() -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, int(sock.getsockname()[1])


def _base_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOOLMESH_")}
    env["PYTHONPATH"] = str(REPO)
    env["TOOLMESH_DATA_DIR"] = str(data_dir)
    env["TOOLMESH_OTLP_ENDPOINT"] = ""
    for service in MODULES:
        env[f"TOOLMESH_{service.upper()}_PORT"] = "0"
        env[f"TOOLMESH_{service.upper()}_METRICS_PORT"] = "0"
    return env


def _run(case: Case, root: Path) -> Outcome:
    data_dir = root / "data" / f"{case.service}-{case.name}"
    env = _base_env(data_dir)
    env.update(case.env)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", MODULES[case.service]],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired as expired:
        return Outcome(-1, str(expired.stdout), str(expired.stderr))
    outcome = Outcome(proc.returncode, proc.stdout, proc.stderr)
    for line in proc.stderr.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("level") == "CRITICAL":
            outcome.critical.append(record)
    return outcome


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Files]:
    root = tmp_path_factory.mktemp("startup")
    certs = root / "certs"
    make_all(certs)
    a_file = root / "a-file"
    a_file.write_text("not a directory")
    bad_toml = root / "bad.toml"
    bad_toml.write_text("this is = = not toml [")
    garbage = root / "garbage.pem"
    garbage.write_text("neither PEM nor DER: a key file someone overwrote\n")
    open_dir = root / "open-data"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    busy, busy_port = _listening()
    busy_metrics, busy_metrics_port = _listening()
    open_keys = {}
    for service in MODULES:
        key = root / f"open-{service}.key"
        shutil.copy(certs / f"{service}.key", key)
        key.chmod(0o644)
        open_keys[service] = key
    try:
        yield Files(
            root,
            certs,
            a_file,
            bad_toml,
            garbage,
            open_keys,
            open_dir,
            busy_port,
            busy_metrics_port,
        )
    finally:
        busy.close()
        busy_metrics.close()


@pytest.fixture(scope="module")
def outcomes(files: Files) -> dict[str, tuple[Case, Outcome]]:
    listed = cases(files)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda case: _run(case, files.root), listed))
    return {f"{c.service}-{c.name}": (c, o) for c, o in zip(listed, results, strict=True)}


def _ids() -> list[str]:
    # The case list depends only on names, not on the files: build it with placeholders.
    p = Path("/placeholder")
    placeholder = Files(p, p, p, p, p, dict.fromkeys(MODULES, p), p, 1, 2)
    return [f"{c.service}-{c.name}" for c in cases(placeholder)]


@pytest.mark.parametrize("case_id", _ids())
def test_a_start_up_error_is_one_critical_line_naming_the_setting(
    outcomes: dict[str, tuple[Case, Outcome]], case_id: str
) -> None:
    case, outcome = outcomes[case_id]
    output = outcome.stdout + outcome.stderr
    assert outcome.code == 2, f"exit {outcome.code}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    assert len(outcome.critical) == 1, output[-3000:]
    (line,) = outcome.critical
    assert case.setting in str(line["setting"]), line
    assert case.setting in str(line["message"]), line
    assert line["fix"], line
    for word in case.says:
        assert word in str(line["message"]), line
