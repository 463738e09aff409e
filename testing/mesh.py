"""The five real services as real processes on free loopback ports, for end-to-end tests and
benchmarks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kit.certs import make_all
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
SERVICES = ("telemetry", "auth", "memory", "router", "gateway")
# start_all's order: each wave needs only the waves before it to be serving (telemetry takes
# everyone's spans and audit events, the gateway waits for auth's keys), so the processes of a
# wave start together and their interpreters' start-up shares the cores instead of queueing.
WAVES = (("telemetry",), ("auth", "memory", "router"), ("gateway",))
MODULES = {name: f"services.{name}" for name in SERVICES} | {"gateway": "gateway"}
# Who may call whom when mTLS is on: only the gateway reaches the inner services (auth also
# takes the operator's admin tools); everyone may send spans to telemetry.
ALLOWED_PEERS = {
    "auth": "gateway,operator",
    "router": "gateway",
    "memory": "gateway",
    "telemetry": "",
    "gateway": "",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_of(instance: str) -> str:
    """ "memory" and "memory-1" are both instances of the memory service."""
    return instance.split("-", maxsplit=1)[0]


@dataclass
class Mesh:
    """Processes by instance name: "router" is the first replica, "router-1" the second."""

    data_dir: Path
    database_urls: dict[str, str] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    tls: bool = False
    replicas: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.ports:
            self.ports = {name: free_port() for name in self.all_instances()}
        if self.tls and not (self.certs / "ca.pem").exists():
            make_all(self.certs)

    @property
    def certs(self) -> Path:
        return self.data_dir / "certs"

    def credentials(self, identity: str = "operator") -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=(self.certs / "ca.pem").read_bytes(),
            private_key=(self.certs / f"{identity}.key").read_bytes(),
            certificate_chain=(self.certs / f"{identity}.pem").read_bytes(),
        )

    def channel(self, name: str, identity: str = "operator") -> grpc.Channel:
        """A blocking channel to one instance, as ``identity`` when mTLS is on."""
        if self.tls:
            return grpc.secure_channel(self.target(name), self.credentials(identity))
        return grpc.insecure_channel(self.target(name))

    def instances(self, service: str) -> list[str]:
        count = self.replicas.get(service, 1)
        return [service] + [f"{service}-{i}" for i in range(1, count)]

    def all_instances(self) -> list[str]:
        return [instance for name in SERVICES for instance in self.instances(name)]

    def target(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def service_target(self, service: str) -> str:
        """Every replica of a service, as a comma list the kit turns into round_robin."""
        return ",".join(self.target(instance) for instance in self.instances(service))

    @property
    def gateway(self) -> str:
        return self.target("gateway")

    def env(self, instance: str = "") -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOOLMESH_")}
        env["PYTHONPATH"] = str(REPO)
        env["TOOLMESH_DATA_DIR"] = str(self.data_dir)
        # The CLI's token cache stays with the mesh, not in the user's home.
        env["TOOLMESH_CACHE_DIR"] = str(self.data_dir / "cli-cache")
        if instance.startswith("gateway-"):
            # Each gateway replica keeps its own outbox file.
            env["TOOLMESH_DATA_DIR"] = str(self.data_dir / instance)
        env["TOOLMESH_OTLP_ENDPOINT"] = self.target("telemetry")
        env["TOOLMESH_GRACE_PERIOD_S"] = "3"
        for name in SERVICES:
            env[f"TOOLMESH_{name.upper()}_PORT"] = str(self.ports[name])
            env[f"TOOLMESH_GATEWAY_{name.upper()}_TARGET"] = self.service_target(name)
        if instance:
            env[f"TOOLMESH_{service_of(instance).upper()}_PORT"] = str(self.ports[instance])
        # Auth replicas share the signing keys and the dev client's credentials file.
        env["TOOLMESH_AUTH_DATA_DIR"] = str(self.data_dir)
        env["TOOLMESH_ROUTER_TELEMETRY_TARGET"] = self.service_target("telemetry")
        env["TOOLMESH_AUTH_TELEMETRY_TARGET"] = self.service_target("telemetry")
        for name in SERVICES:
            env[f"TOOLMESH_{name.upper()}_METRICS_PORT"] = "0"
        if self.tls:
            env["TOOLMESH_TLS_CA_FILE"] = str(self.certs / "ca.pem")
            for name in SERVICES:
                prefix = f"TOOLMESH_{name.upper()}_"
                env[prefix + "TLS_CERT_FILE"] = str(self.certs / f"{name}.pem")
                env[prefix + "TLS_KEY_FILE"] = str(self.certs / f"{name}.key")
                env[prefix + "ALLOWED_PEERS"] = ALLOWED_PEERS[name]
            env["TOOLMESH_GATEWAY_TLS_REQUIRE_CLIENT_AUTH"] = "false"
        for name, url in self.database_urls.items():
            env[f"TOOLMESH_{name.upper()}_DATABASE_URL"] = url
        env.update(self.extra_env)
        return env

    def log_path(self, name: str) -> Path:
        return self.data_dir / "logs" / f"{name}.log"

    def spawn(self, name: str) -> None:
        """Start the process without waiting for it (``wait_serving`` waits)."""
        self.log_path(name).parent.mkdir(parents=True, exist_ok=True)
        with self.log_path(name).open("ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", MODULES[service_of(name)]],
                cwd=REPO,
                env=self.env(name),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def start(self, name: str, timeout: float = 30.0) -> None:
        self.spawn(name)
        self.wait_serving(name, timeout)

    def start_together(self, names: list[str], timeout: float = 30.0) -> None:
        """Spawn every process, then wait until each serves (``timeout`` each)."""
        for name in names:
            self.spawn(name)
        for name in names:
            self.wait_serving(name, timeout)

    def start_all(self) -> None:
        for wave in WAVES:
            self.start_together([i for service in wave for i in self.instances(service)])

    def wait_serving(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.channel(name) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                proc = self.procs[name]
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited {proc.returncode}:\n{self.tail(name)}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"{name} not SERVING after {timeout}s:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.log_path(name)
        return (
            "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            if path.exists()
            else ""
        )

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        self.procs[name].send_signal(sig)
        return self._reap(name, timeout)

    def _reap(self, name: str, timeout: float = 15.0) -> int:
        """Wait for an instance already signalled; killed after ``timeout``."""
        proc = self.procs.pop(name)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def stop_all(self) -> dict[str, int]:
        """The waves in reverse (the gateway drains into the services still up), each wave's
        processes signalled together."""
        codes: dict[str, int] = {}
        for wave in reversed(WAVES):
            names = [i for service in wave for i in self.instances(service) if i in self.procs]
            for name in names:
                self.procs[name].send_signal(signal.SIGTERM)
            for name in names:
                codes[name] = self._reap(name)
        # Instances started by hand beyond the configured replicas.
        for name in reversed(list(self.procs)):
            codes[name] = self.stop(name)
        return codes

    def log_records(self, name: str) -> list[dict[str, object]]:
        records = []
        for line in self.log_path(name).read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def dev_credentials(self) -> dict[str, str]:
        creds: dict[str, str] = json.loads((self.data_dir / "auth" / "dev-client.json").read_text())
        return creds

    def token(self, scopes: tuple[str, ...] = ()) -> str:
        creds = self.dev_credentials()
        with self.channel("gateway") as channel:
            reply = gateway_pb2_grpc.GatewayStub(channel).IssueToken(
                gateway_pb2.IssueTokenRequest(
                    client_id=creds["client_id"],
                    client_secret=creds["client_secret"],
                    scopes=list(scopes),
                ),
                timeout=10,
            )
        token: str = reply.access_token
        return token
