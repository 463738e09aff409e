"""Kubernetes exec probe: grpc.health.v1 Check over mTLS with the pod's own certificate.

Kubelet's native gRPC probe speaks plaintext only, and with mTLS on the service port
(TOOLMESH_TLS_CERT_FILE / _KEY_FILE / _CA_FILE) it can no longer check health. This runs
in the service's container (its Python, its environment) and exits 0 only when the server
answers SERVING.

usage: python /app/grpc_health_tls.py PORT TLS_SERVER_NAME [SERVICE]
(shipped in the image by the Dockerfile; deploy/k8s/overlays/prod/<service> calls it)
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str]) -> int:
    port, server_name = argv[1], argv[2]
    service = argv[3] if len(argv) > 3 else ""

    def read(kind: str) -> bytes:
        with open(os.environ[f"TOOLMESH_TLS_{kind}_FILE"], "rb") as handle:
            return handle.read()

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read("CA"), private_key=read("KEY"), certificate_chain=read("CERT")
    )
    # The certificate names the Service, not the loopback address we dial.
    options = [("grpc.ssl_target_name_override", server_name)]
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=3
            )
        except grpc.RpcError as error:
            print(f"health check failed: {error.code().name}", file=sys.stderr)
            return 1
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(
            f"not serving: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
