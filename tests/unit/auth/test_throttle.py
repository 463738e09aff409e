"""Wrong secrets are throttled per (client id, source address) under a per-client ceiling:
whoever knows a client id cannot lock its owner out. An injected clock, no sleeps."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from services.auth.public import throttle_source
from services.auth.throttle import MAX_TRACKED, FailureThrottle
from services.kit.certs import make_all
from services.kit.channels import open_channel
from services.kit.context import CLIENT_ADDRESS_METADATA_KEY
from services.kit.tls import TlsFiles
from tests.unit.auth.conftest import AuthServer, code_of, make_settings
from toolmesh.auth.v1 import auth_pb2, auth_pb2_grpc

OWNER = "198.51.100.7"
ATTACKER = "203.0.113.9"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttle(clock: Clock, **overrides: float) -> FailureThrottle:
    values: dict[str, float] = {
        "per_source": 3,
        "per_client": 6,
        "window_s": 60,
        "backoff_s": 30,
        "trusted_s": 3600,
    }
    values.update(overrides)
    return FailureThrottle(
        per_source=int(values["per_source"]),
        per_client=int(values["per_client"]),
        window_s=values["window_s"],
        backoff_s=values["backoff_s"],
        trusted_s=values["trusted_s"],
        clock=clock,
    )


def test_an_attacker_at_one_address_does_not_lock_out_the_owner_at_another() -> None:
    clock = Clock()
    limits = throttle(clock)
    assert [limits.begin("bot", ATTACKER) for _ in range(3)] == [0, 0, 0]
    assert limits.begin("bot", ATTACKER) == 30  # backed off, at that address only
    assert limits.begin("bot", OWNER) == 0
    limits.succeeded("bot", OWNER)
    clock.now += 29
    assert limits.begin("bot", ATTACKER) == pytest.approx(1)
    clock.now += 1
    # Backoff over, but the three failures are still in the window.
    assert limits.begin("bot", ATTACKER) == 30
    clock.now += 61
    assert limits.begin("bot", ATTACKER) == 0


def test_many_addresses_reach_the_per_client_ceiling_except_where_the_owner_succeeded() -> None:
    clock = Clock()
    limits = throttle(clock)
    assert limits.begin("bot", OWNER) == 0
    limits.succeeded("bot", OWNER)  # the owner's address is trusted from now on
    for i in range(6):
        assert limits.begin("bot", f"203.0.113.{i}") == 0
    # Six failures from six addresses: the ceiling holds for every new address...
    assert limits.begin("bot", "203.0.113.99") == 30
    assert limits.begin("bot", "192.0.2.1") == 30
    # ... but not for the address where the right secret came from.
    assert limits.begin("bot", OWNER) == 0
    # Another client id is not affected.
    assert limits.begin("other", "203.0.113.99") == 0


def test_trust_expires() -> None:
    clock = Clock()
    limits = throttle(clock, trusted_s=100)
    limits.succeeded("bot", OWNER)
    for i in range(6):
        limits.begin("bot", f"203.0.113.{i}")
    clock.now += 101
    for i in range(6):  # the first six left the window: six new failures
        limits.begin("bot", f"198.18.0.{i}")
    assert limits.begin("bot", OWNER) == 30


def test_a_success_clears_its_own_failures_only() -> None:
    clock = Clock()
    limits = throttle(clock)
    for _ in range(2):
        limits.begin("bot", OWNER)
        limits.begin("bot", ATTACKER)
    limits.succeeded("bot", OWNER)
    assert [limits.begin("bot", OWNER) for _ in range(3)] == [0, 0, 0]
    assert limits.begin("bot", ATTACKER) == 0
    assert limits.begin("bot", ATTACKER) == 30


def test_memory_is_bounded_whatever_the_ids_and_addresses() -> None:
    limits = throttle(Clock())
    for i in range(MAX_TRACKED + 500):
        limits.begin(f"c{i}", f"10.0.{i // 256 % 256}.{i % 256}")
    assert len(limits._source_attempts) == MAX_TRACKED
    assert len(limits._client_attempts) == MAX_TRACKED


def test_sources_are_addresses_and_ipv6_counts_per_64() -> None:
    assert throttle_source("10.1.2.3") == "10.1.2.3"
    assert throttle_source("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert throttle_source("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert throttle_source("::ffff:10.1.2.3") == "10.1.2.3"
    assert throttle_source("unix:/run/x.sock") == "unix:/run/x.sock"


async def test_through_auth_the_owner_gets_a_token_while_an_attacker_hammers(
    tmp_path: Path,
) -> None:
    """In plaintext dev mode (no peer identity) the forwarded address is trusted, as from the
    gateway; the owner and the attacker come from different addresses."""
    server = await AuthServer(
        make_settings(tmp_path / "data", throttle_failures=3, throttle_client_failures=20)
    ).start()
    try:
        secret = server.dev_credentials()["client_secret"]
        guess = auth_pb2.IssueTokenRequest(client_id="dev", client_secret="guess")
        attacker = [(CLIENT_ADDRESS_METADATA_KEY, ATTACKER)]
        owner = [(CLIENT_ADDRESS_METADATA_KEY, f"ipv4:{OWNER}:51234")]
        codes = [(await code_of(server.stub.IssueToken(guess, metadata=attacker)))[0]]
        codes += [(await code_of(server.stub.IssueToken(guess, metadata=attacker)))[0]]
        codes += [(await code_of(server.stub.IssueToken(guess, metadata=attacker)))[0]]
        codes += [(await code_of(server.stub.IssueToken(guess, metadata=attacker)))[0]]
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
        right = auth_pb2.IssueTokenRequest(client_id="dev", client_secret=secret)
        assert (await server.stub.IssueToken(right, metadata=owner)).access_token
        # The attacker with the right secret (say, a leak) is still held off at its address.
        assert (await code_of(server.stub.IssueToken(right, metadata=attacker)))[
            0
        ] == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop()


async def test_the_forwarded_address_is_trusted_from_the_gateway_only(tmp_path: Path) -> None:
    """Over mutual TLS: the operator's certificate cannot pick its source address."""
    certs = tmp_path / "certs"
    make_all(certs)
    server = await AuthServer(
        make_settings(
            tmp_path / "data",
            throttle_failures=2,
            tls_cert_file=certs / "auth.pem",
            tls_key_file=certs / "auth.key",
            tls_ca_file=certs / "ca.pem",
            allowed_peers="gateway,operator",
        )
    ).start()
    assert server.running is not None
    target = f"127.0.0.1:{server.running.port}"

    def stub_as(name: str) -> auth_pb2_grpc.AuthStub:
        files = TlsFiles.load(certs / f"{name}.pem", certs / f"{name}.key", certs / "ca.pem")
        channels.append(open_channel(target, credentials=files.channel_credentials()))
        return auth_pb2_grpc.AuthStub(channels[-1])

    channels: list[grpc.aio.Channel] = []
    try:
        operator, gateway = stub_as("operator"), stub_as("gateway")
        secret = server.dev_credentials()["client_secret"]
        guess = auth_pb2.IssueTokenRequest(client_id="dev", client_secret="guess")
        right = auth_pb2.IssueTokenRequest(client_id="dev", client_secret=secret)
        for _ in range(2):
            code, _ = await code_of(
                operator.IssueToken(guess, metadata=[(CLIENT_ADDRESS_METADATA_KEY, ATTACKER)])
            )
            assert code == grpc.StatusCode.UNAUTHENTICATED
        # The operator's claimed address is ignored: it is throttled at its own address.
        code, _ = await code_of(
            operator.IssueToken(right, metadata=[(CLIENT_ADDRESS_METADATA_KEY, OWNER)])
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The gateway speaks for its caller: the owner's address was never throttled.
        issued = await gateway.IssueToken(right, metadata=[(CLIENT_ADDRESS_METADATA_KEY, OWNER)])
        assert issued.access_token
    finally:
        for channel in channels:
            await channel.close()
        await server.stop()
