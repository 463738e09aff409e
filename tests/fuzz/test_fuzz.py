"""The wire fuzz of every RPC of every service, short form (issue 10).

One mesh of real processes with mutual TLS. Every RPC the five services serve, found in the
generated descriptors (and telemetry's OTLP Export), gets random bytes, odd messages (invalid
UTF-8, NUL, huge strings, extreme numbers, undefined enums, out-of-range times, thousands of
items) and odd metadata (huge or non-UTF-8 x-request-id, bad authorization, bad traceparent).
Inner services are called as the mesh peer their rules allow; the gateway with a real token.
Seeded, so a failure replays. Bad input may be refused in any precise way, but never INTERNAL
or UNKNOWN, the services stay serving, and no log of the mesh holds a traceback.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from services.auth.app import PEER_RULES as AUTH_RULES
from services.kit import scopes
from services.kit.peers import ANY_PEER, PeerRules
from services.memory.app import PEER_RULES as MEMORY_RULES
from services.router.app import PEER_RULES as ROUTER_RULES
from services.telemetry.app import PEER_RULES as TELEMETRY_RULES
from testing.mesh import SERVICES, Mesh
from tests.fuzz.cases import odd_messages, plausible, random_bodies
from tests.wire import raw_call
from toolmesh.auth.v1 import auth_pb2
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from toolmesh.memory.v1 import memory_pb2
from toolmesh.router.v1 import router_pb2
from toolmesh.telemetry.v1 import telemetry_pb2

pytestmark = pytest.mark.e2e

SEED = 10
RANDOM_BODIES = 4
ODD_MESSAGES = 14
CONCURRENCY = 12
TIMEOUT_S = 10.0
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

# (instance, service descriptor, peer rules) for every service the mesh serves.
TARGETS = [
    ("gateway", gateway_pb2.DESCRIPTOR.services_by_name["Gateway"], None),
    ("auth", auth_pb2.DESCRIPTOR.services_by_name["Auth"], AUTH_RULES),
    ("router", router_pb2.DESCRIPTOR.services_by_name["Router"], ROUTER_RULES),
    ("memory", memory_pb2.DESCRIPTOR.services_by_name["Memory"], MEMORY_RULES),
    ("telemetry", telemetry_pb2.DESCRIPTOR.services_by_name["Telemetry"], TELEMETRY_RULES),
    (
        "telemetry",
        trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"],
        TELEMETRY_RULES,
    ),
]

# Odd metadata a grpc client can send (printable ASCII values); non-UTF-8 ones go raw below.
ODD_METADATA: list[tuple[str, tuple[tuple[str, str | bytes], ...]]] = [
    ("huge x-request-id", (("x-request-id", "r" * 6000),)),
    ("x-request-id with spaces and quotes", (("x-request-id", "a b\"c'<script>"),)),
    ("traceparent garbage", (("traceparent", "00-zzzz-yyyy-01"),)),
    ("traceparent all zero", (("traceparent", "00-" + "0" * 32 + "-" + "0" * 16 + "-01"),)),
    (
        "traceparent version ff, huge tracestate",
        (
            ("traceparent", "ff-" + "a" * 32 + "-" + "b" * 16 + "-ff"),
            ("tracestate", "k=" + "v" * 5000),
        ),
    ),
    ("authorization without scheme", (("authorization", "abc.def.ghi"),)),
    ("authorization Basic", (("authorization", "Basic dXNlcjpwYXNz"),)),
    ("authorization Bearer junk JWT", (("authorization", "Bearer eyJhbGciOiJub25lIn0.e30."),)),
    ("authorization Bearer 7000 bytes", (("authorization", "Bearer " + "A" * 7000),)),
    ("two authorization headers", (("authorization", "Bearer a"), ("authorization", "Bearer b"))),
    ("binary junk header", (("x-fuzz-bin", b"\x00\xff"),)),
]
# Raw HTTP/2 headers no grpc client sends: non-UTF-8 values.
RAW_HEADERS: list[tuple[str, tuple[tuple[bytes, bytes], ...]]] = [
    ("non-UTF-8 x-request-id", ((b"x-request-id", b"\xff\xfe\x80"),)),
    (
        "non-UTF-8 traceparent",
        ((b"traceparent", b"00-\xff" + b"a" * 31 + b"-" + b"b" * 16 + b"-01"),),
    ),
    ("non-UTF-8 authorization", ((b"authorization", b"Bearer \xc3\x28\xff"),)),
]


@dataclass(frozen=True)
class Rpc:
    instance: str
    path: str
    method: MethodDescriptor
    identity: str

    @property
    def streaming(self) -> bool:
        return bool(self.method.server_streaming)


@dataclass
class Answer:
    rpc: Rpc
    case: str
    code: grpc.StatusCode
    details: str


def _identity(rules: PeerRules | None, path: str) -> str:
    """A mesh peer allowed to call ``path`` (the gateway where it may, else the operator)."""
    if rules is None:
        return "operator"
    roles = rules.by_method.get(path, frozenset())
    for role in ("gateway", "operator"):
        if role in roles or ANY_PEER in roles:
            return role
    return sorted(roles)[0] if roles else "gateway"


def every_rpc() -> list[Rpc]:
    return [
        Rpc(instance, path, method, _identity(rules, path))
        for instance, service, rules in TARGETS
        for method in service.methods
        for path in [f"/{service.full_name}/{method.name}"]
    ]


@pytest.fixture(scope="module")
def fuzz_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    mesh = Mesh(data_dir=tmp_path_factory.mktemp("fuzz") / "var", tls=True)
    mesh.start_all()
    try:
        yield mesh
    finally:
        mesh.stop_all()


async def _call(
    channel: aio.Channel, rpc: Rpc, body: bytes, metadata: tuple[tuple[str, str | bytes], ...]
) -> tuple[grpc.StatusCode, str]:
    try:
        if rpc.streaming:
            stream = channel.unary_stream(rpc.path)(body, metadata=metadata, timeout=TIMEOUT_S)
            async for _ in stream:
                pass
        else:
            await channel.unary_unary(rpc.path)(body, metadata=metadata, timeout=TIMEOUT_S)
    except aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


async def _fuzz(mesh: Mesh, token: str, rpcs: list[Rpc]) -> list[Answer]:
    rng = random.Random(SEED)
    bearer: tuple[tuple[str, str | bytes], ...] = (("authorization", f"Bearer {token}"),)
    channels = {
        (rpc.instance, rpc.identity): aio.secure_channel(
            mesh.target(rpc.instance), mesh.credentials(rpc.identity)
        )
        for rpc in rpcs
    }
    jobs: list[tuple[Rpc, str, bytes, tuple[tuple[str, str | bytes], ...]]] = []
    for rpc in rpcs:
        auth = bearer if rpc.instance == "gateway" else ()
        base = plausible(rpc.method.input_type)
        for label, body in random_bodies(rng, RANDOM_BODIES):
            jobs.append((rpc, label, body, auth))
        for label, body in odd_messages(rpc.method.input_type, rng, ODD_MESSAGES):
            jobs.append((rpc, label, body, auth))
        for label, metadata in ODD_METADATA:
            headers = (
                metadata if label.startswith(("authorization", "two auth")) else auth + metadata
            )
            jobs.append((rpc, label, base, headers))
    rng.shuffle(jobs)
    answers: list[Answer] = []
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(
        rpc: Rpc, label: str, body: bytes, metadata: tuple[tuple[str, str | bytes], ...]
    ) -> None:
        async with limit:
            code, details = await _call(channels[rpc.instance, rpc.identity], rpc, body, metadata)
        answers.append(Answer(rpc, label, code, details))

    try:
        await asyncio.gather(*(one(*job) for job in jobs))
    finally:
        await asyncio.gather(*(channel.close() for channel in channels.values()))
    return answers


def _raw(mesh: Mesh, token: str, rpcs: list[Rpc]) -> list[Answer]:
    """Non-UTF-8 header values, on the first RPC of each service (through a raw HTTP/2 client)."""
    answers = []
    firsts = {rpc.instance: rpc for rpc in reversed(rpcs) if not rpc.streaming}
    for rpc in firsts.values():
        cert = (mesh.certs / f"{rpc.identity}.pem", mesh.certs / f"{rpc.identity}.key")
        for label, odd in RAW_HEADERS:
            headers = odd
            if rpc.instance == "gateway" and "authorization" not in label:
                headers = ((b"authorization", f"Bearer {token}".encode()), *odd)
            answer = raw_call(
                mesh.ports[rpc.instance],
                rpc.path,
                plausible(rpc.method.input_type),
                headers=headers,
                ca_file=mesh.certs / "ca.pem",
                client_cert=cert,
            )
            status = answer.get("grpc-status")
            code = next(
                (c for c in grpc.StatusCode if str(c.value[0]) == status), grpc.StatusCode.UNKNOWN
            )
            answers.append(Answer(rpc, label, code, answer.get("grpc-message", str(answer))))
    return answers


def _logs(mesh: Mesh) -> dict[str, str]:
    return {
        name: mesh.log_path(name).read_text(errors="replace")
        for name in SERVICES
        if mesh.log_path(name).exists()
    }


def test_every_rpc_answers_bad_input_precisely(fuzz_mesh: Mesh) -> None:
    mesh = fuzz_mesh
    token = mesh.token(tuple(sorted(scopes.ALL)))
    rpcs = every_rpc()
    started = time.monotonic()
    answers = asyncio.run(_fuzz(mesh, token, rpcs)) + _raw(mesh, token, rpcs)
    elapsed = time.monotonic() - started
    codes = Counter(a.code.name for a in answers)
    print(f"\nfuzz: {len(answers)} calls to {len(rpcs)} RPCs in {elapsed:.1f} s: {dict(codes)}")

    wrong = [a for a in answers if a.code in FORBIDDEN]
    assert not wrong, "\n".join(
        f"{a.rpc.path} [{a.case}] as {a.rpc.identity}: {a.code.name} {a.details[:200]}"
        for a in wrong[:30]
    )
    # Still serving, and still doing real work.
    for name in SERVICES:
        with mesh.channel(name) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    with mesh.channel("gateway") as channel:
        run = gateway_pb2_grpc.GatewayStub(channel).Run(
            gateway_pb2.RunRequest(session_id="after-fuzz", prompt="what is 2 + 3"),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=10,
        )
    assert "5" in run.answer, run
    time.sleep(0.5)  # lines of the last calls land
    tracebacks = {name: text.count("Traceback") for name, text in _logs(mesh).items()}
    assert not any(tracebacks.values()), tracebacks


def test_every_served_rpc_is_fuzzed() -> None:
    """The list comes from the contracts: a new RPC is fuzzed without anyone adding it here."""
    paths = {rpc.path for rpc in every_rpc()}
    assert len(paths) == sum(len(list(s.methods)) for _, s, _ in TARGETS)
    assert "/toolmesh.gateway.v1.Gateway/Run" in paths
    assert "/opentelemetry.proto.collector.trace.v1.TraceService/Export" in paths
    assert len({rpc.instance for rpc in every_rpc()}) == len(SERVICES)


def test_cases_are_seeded() -> None:
    method = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].methods_by_name["Run"]
    first = odd_messages(method.input_type, random.Random(SEED), ODD_MESSAGES)
    again = odd_messages(method.input_type, random.Random(SEED), ODD_MESSAGES)
    assert first == again
    assert any("invalid UTF-8" in label for label, _ in first)
    assert Path(__file__).name.startswith("test_")
