"""The MCP face (``python -m mcpface``) as a real process, and an MCP SDK client session to it."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

REPO = Path(__file__).resolve().parents[1]


@dataclass
class FaceProcess:
    gateway_target: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    # With a CA file the face serves HTTPS (its TOOLMESH_MCPFACE_TLS_* certificate).
    ca_file: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def base(self) -> str:
        return f"{'https' if self.ca_file else 'http'}://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/mcp"

    def start(self, timeout: float = 30.0) -> None:
        """Blocks until ready: from an event loop that also runs the gateway, call it through
        ``asyncio.to_thread``."""
        env = {
            **os.environ,
            "TOOLMESH_MCPFACE_PORT": "0",
            "TOOLMESH_MCPFACE_METRICS_PORT": "0",
            "TOOLMESH_MCPFACE_GATEWAY_TARGET": self.gateway_target,
            "TOOLMESH_OTLP_ENDPOINT": "",
            "TOOLMESH_DATA_DIR": str(self.log_path.parent),
            **self.env,
        }
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mcpface"], cwd=REPO, env=env, stdout=self.log, stderr=self.log
        )
        deadline = time.monotonic() + timeout
        while not self.port:
            assert self.proc.poll() is None, f"mcpface exited:\n{self.tail()}"
            assert time.monotonic() < deadline, f"mcpface did not start:\n{self.tail()}"
            for record in self.records():
                if record.get("message") == "serving":
                    self.port = int(str(record["address"]).rsplit(":", 1)[1])
            time.sleep(0.05)
        while self.ready()[0] != 200:
            assert time.monotonic() < deadline, f"mcpface not ready:\n{self.tail()}"
            time.sleep(0.05)

    def get(self, path: str) -> tuple[int, dict[str, object]]:
        try:
            context = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else None
            with urllib.request.urlopen(f"{self.base}{path}", timeout=5, context=context) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")
        except urllib.error.URLError:
            return 0, {}  # not listening yet

    def ready(self) -> tuple[int, dict[str, object]]:
        return self.get("/readyz")

    def records(self) -> list[dict[str, object]]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                found.append(record)
        return found

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log.close()
        return code


@asynccontextmanager
async def mcp_session(
    url: str, token: str | None, ca_file: Path | None = None
) -> AsyncIterator[ClientSession]:
    """An initialized MCP client session over streamable HTTP, with the bearer token."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    http_client = (
        httpx2.AsyncClient(
            headers=headers,
            verify=ssl.create_default_context(cafile=ca_file),
            timeout=httpx2.Timeout(30, read=300),
        )
        if ca_file
        else create_mcp_http_client(headers=headers)
    )
    async with (
        http_client as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session
