"""The prod exec probe really checks grpc.health.v1 over mTLS (kubelet's gRPC probe cannot)."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.deploy import kube

PROBE = kube.DEPLOY / "docker" / "grpc_health_tls.py"
SERVER_NAME = "memory-headless.toolmesh.svc.cluster.local"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    sans: list[str] | None = None,
    ca: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer_name, issuer_key = issuer or (name, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _mesh(directory: Path, tag: str) -> tuple[x509.Name, ec.EllipticCurvePrivateKey, Path]:
    key = _key()
    cert = _cert(f"toolmesh-ca-{tag}", key, None, ca=True)
    path = directory / f"ca-{tag}.crt"
    path.write_bytes(_pem(cert))
    return cert.subject, key, path


def _leaf(
    directory: Path, ca: tuple[x509.Name, ec.EllipticCurvePrivateKey], cn: str, sans: list[str]
) -> tuple[Path, Path]:
    key = _key()
    cert_path, key_path = directory / f"{cn}.crt", directory / f"{cn}.key"
    cert_path.write_bytes(_pem(_cert(cn, key, ca, sans)))
    key_path.write_bytes(_pem_key(key))
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    name, key, ca = _mesh(d, "mesh")
    _, _, other_ca = _mesh(d, "other")
    server_cert, server_key = _leaf(d, (name, key), "memory", [SERVER_NAME])
    client_cert, client_key = _leaf(d, (name, key), "gateway", ["gateway-headless"])
    other_name, other_key, _ = _mesh(d, "rogue")
    rogue_cert, rogue_key = _leaf(d, (other_name, other_key), "rogue", ["rogue"])
    return {
        "ca": ca,
        "other_ca": other_ca,
        "server_cert": server_cert,
        "server_key": server_key,
        "client_cert": client_cert,
        "client_key": client_key,
        "rogue_cert": rogue_cert,
        "rogue_key": rogue_key,
    }


@pytest.fixture
def server(pki: dict[str, Path]) -> Iterator[tuple[int, health.HealthServicer]]:
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)])
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, srv)
    credentials = grpc.ssl_server_credentials(
        [(pki["server_key"].read_bytes(), pki["server_cert"].read_bytes())],
        root_certificates=pki["ca"].read_bytes(),
        require_client_auth=True,
    )
    port = srv.add_secure_port("127.0.0.1:0", credentials)
    srv.start()
    try:
        yield port, servicer
    finally:
        srv.stop(0)


def probe(
    port: int, cert: Path, key: Path, ca: Path, server_name: str = SERVER_NAME
) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        TOOLMESH_TLS_CERT_FILE=str(cert),
        TOOLMESH_TLS_KEY_FILE=str(key),
        TOOLMESH_TLS_CA_FILE=str(ca),
    )
    return subprocess.run(
        [sys.executable, str(PROBE), str(port), server_name],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_serving_server_passes(server, pki) -> None:  # type: ignore[no-untyped-def]
    port, servicer = server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    result = probe(port, pki["client_cert"], pki["client_key"], pki["ca"])
    assert result.returncode == 0, result.stderr


def test_draining_server_fails(server, pki) -> None:  # type: ignore[no-untyped-def]
    port, servicer = server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    result = probe(port, pki["client_cert"], pki["client_key"], pki["ca"])
    assert result.returncode == 1
    assert "NOT_SERVING" in result.stderr


def test_wrong_trust_fails(server, pki) -> None:  # type: ignore[no-untyped-def]
    port, servicer = server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    # The probe does not trust a server certificate from another CA...
    assert probe(port, pki["client_cert"], pki["client_key"], pki["other_ca"]).returncode == 1
    # ...and the server refuses a client certificate the mesh CA did not sign.
    assert probe(port, pki["rogue_cert"], pki["rogue_key"], pki["ca"]).returncode == 1


def test_nothing_listening_fails(pki) -> None:  # type: ignore[no-untyped-def]
    assert probe(1, pki["client_cert"], pki["client_key"], pki["ca"]).returncode == 1


def test_the_image_ships_the_probe_where_prod_calls_it(
    rendered: dict[str, list[kube.Doc]],
) -> None:
    dockerfile = (kube.REPO / "Dockerfile").read_text()
    assert "COPY deploy/docker/grpc_health_tls.py /app/grpc_health_tls.py" in dockerfile
    for deployment in kube.of_kind(rendered["overlays/prod"], "Deployment"):
        for container in kube.pod_spec(deployment)["containers"]:
            probe = container["readinessProbe"].get("exec")
            if probe:
                assert probe["command"][:2] == ["python", "/app/grpc_health_tls.py"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_against_the_real_memory_service_in_production_mode(tmp_path: Path) -> None:
    """What prod runs: memory with TOOLMESH_ENV=production and mTLS. The exec probe passes;
    the plaintext check that kubelet's native gRPC probe would make cannot even connect."""
    certs = tmp_path / "certs"
    subprocess.run(
        [sys.executable, "-m", "services.kit.certs", "--dns", SERVER_NAME, str(certs)],
        cwd=kube.REPO,
        check=True,
        capture_output=True,
        timeout=60,
    )
    port = _free_port()
    tls = {
        "TOOLMESH_TLS_CERT_FILE": str(certs / "memory.pem"),
        "TOOLMESH_TLS_KEY_FILE": str(certs / "memory.key"),
        "TOOLMESH_TLS_CA_FILE": str(certs / "ca.pem"),
    }
    env = (
        {k: v for k, v in os.environ.items() if not k.startswith("TOOLMESH_")}
        | tls
        | {
            "TOOLMESH_ENV": "production",
            "TOOLMESH_HOST": "127.0.0.1",
            "TOOLMESH_MEMORY_PORT": str(port),
            "TOOLMESH_METRICS_PORT": "0",
            "TOOLMESH_OTLP_ENDPOINT": "",
            "TOOLMESH_DATA_DIR": str(tmp_path / "data"),
            "TOOLMESH_MEMORY_ALLOWED_PEERS": "gateway",
        }
    )
    log = (tmp_path / "memory.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.memory"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            result = probe(
                port,
                certs / "memory.pem",
                certs / "memory.key",
                certs / "ca.pem",
            )
            if result.returncode == 0:
                break
            assert process.poll() is None, (tmp_path / "memory.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "memory.log").read_text()[-3000:]
            time.sleep(0.3)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as refused:
                health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=3
                )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        log.close()
