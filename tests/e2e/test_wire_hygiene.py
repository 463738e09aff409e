"""Bad bytes and odd headers against the real gateway process of the production-like mesh
(mutual TLS between services): precise statuses, and no token or traceback in any log."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from services.kit.interceptors import UNDECODABLE_MESSAGE
from testing.mesh import REPO, SERVICES, Mesh
from tests.wire import raw_call
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.e2e

RUN = "/toolmesh.gateway.v1.Gateway/Run"


def _all_logs(mesh: Mesh) -> str:
    return "\n".join(
        mesh.log_path(name).read_text(errors="replace")
        for name in SERVICES
        if mesh.log_path(name).exists()
    )


def test_a_token_with_a_non_utf8_byte_never_reaches_a_log(mesh: Mesh, token: str) -> None:
    """grpc's own logger printed such a header whole, four times; now nothing of it is logged."""
    signature = token.rsplit(".", 1)[1]
    answer = raw_call(
        mesh.ports["gateway"],
        RUN,
        gateway_pb2.RunRequest(session_id="hygiene", prompt="what is 1 + 1").SerializeToString(),
        headers=((b"authorization", b"Bearer " + token.encode() + b"\xffTAIL"),),
        ca_file=mesh.certs / "ca.pem",
    )
    # The undecodable header is dropped: the call is unauthenticated, not an error of ours.
    assert answer["grpc-status"] == str(grpc.StatusCode.UNAUTHENTICATED.value[0]), answer
    time.sleep(0.5)  # the gateway writes its lines as it handles the call; let them land
    logs = _all_logs(mesh)
    assert signature not in logs
    assert token not in logs
    assert "TAIL" not in logs


def test_undecodable_bytes_before_authentication_are_invalid_argument(mesh: Mesh) -> None:
    before = mesh.log_path("gateway").read_text(errors="replace")
    with mesh.channel("gateway") as channel:
        for _ in range(50):
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary(RUN)(b"\xff\xff\xff\xff", timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details() == UNDECODABLE_MESSAGE
    new = mesh.log_path("gateway").read_text(errors="replace")[len(before) :]
    assert "Traceback" not in new
    # Rate-limited: far fewer lines than calls (two sites, a burst of 20 each).
    assert new.count("\n") < 50


def _published_service_config() -> str:
    """The service config docs/deploy.md recommends to outside callers, verbatim."""
    text = (REPO / "docs" / "deploy.md").read_text()
    section = text.split("## Calling the gateway", 1)[1]
    return section.split("```json", 1)[1].split("```", 1)[0]


def test_the_published_service_config_works_against_a_real_gateway(mesh: Mesh, token: str) -> None:
    config = _published_service_config()
    parsed = json.loads(config)
    named = [n["method"] for c in parsed["methodConfig"] for n in c["name"]]
    rpcs = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].methods_by_name
    assert sorted(named) == sorted(rpcs), "every RPC named exactly once"
    for group in parsed["methodConfig"]:
        for name in group["name"]:
            # A stream's events may already have reached the caller: never replayed by gRPC.
            if rpcs[name["method"]].server_streaming:
                assert "retryPolicy" not in group, name
    channel = grpc.secure_channel(
        mesh.gateway,
        grpc.ssl_channel_credentials((mesh.certs / "ca.pem").read_bytes()),
        options=[("grpc.service_config", config), ("grpc.ssl_target_name_override", "gateway")],
    )
    with channel:
        info = gateway_pb2_grpc.GatewayStub(channel).GetServiceInfo(
            gateway_pb2.GetServiceInfoRequest(),
            timeout=10,
            wait_for_ready=True,
            metadata=(("authorization", f"Bearer {token}"),),
        )
    assert info.info.service == "gateway"
