"""Acknowledged turns survive kill -9 of a real memory process (SQLite WAL, synchronous=FULL)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kit.channels import open_channel
from toolmesh.common.v1 import common_pb2
from toolmesh.memory.v1 import memory_pb2, memory_pb2_grpc

REPO = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def start_memory(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "TOOLMESH_DATA_DIR": str(data_dir),
        "TOOLMESH_MEMORY_PORT": str(port),
        "TOOLMESH_OTLP_ENDPOINT": "",
        "TOOLMESH_METRICS_PORT": "0",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "services.memory"], cwd=REPO, env=env, stderr=subprocess.DEVNULL
    )
    try:
        await wait_until_serving(process, port)
    except BaseException:
        process.kill()
        process.wait(timeout=10)
        raise
    return process


async def wait_until_serving(process: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + 20
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            assert process.poll() is None, "memory exited during start-up"
            try:
                answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except aio.AioRpcError:
                pass
            assert time.monotonic() < deadline, "memory did not become healthy"
            await asyncio.sleep(0.1)


def request(i: int) -> memory_pb2.AppendTurnsRequest:
    return memory_pb2.AppendTurnsRequest(
        caller=common_pb2.Caller(tenant="acme"),
        session_id="crash",
        request_id=f"r-{i}",
        turns=[common_pb2.Turn(role=common_pb2.TURN_ROLE_USER, content=f"turn {i}")],
    )


async def test_acknowledged_turns_survive_kill_9(tmp_path: Path) -> None:
    port = free_port()
    process = await start_memory(tmp_path, port)
    try:
        channel = open_channel(f"127.0.0.1:{port}")
        stub = memory_pb2_grpc.MemoryStub(channel)
        await asyncio.gather(*(stub.AppendTurns(request(i)) for i in range(50)))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        await channel.close()
        process = await start_memory(tmp_path, port)
        channel = open_channel(f"127.0.0.1:{port}")
        stub = memory_pb2_grpc.MemoryStub(channel)
        turns = (
            await stub.GetHistory(
                memory_pb2.GetHistoryRequest(
                    caller=common_pb2.Caller(tenant="acme"), session_id="crash"
                )
            )
        ).turns
        assert [t.seq for t in turns] == list(range(1, 51))
        assert sorted(t.content for t in turns) == sorted(f"turn {i}" for i in range(50))
        await channel.close()
    finally:
        process.kill()
        process.wait(timeout=10)
