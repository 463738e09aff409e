"""The commands end to end against a real gateway (in front of contract fakes), in-process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cli.main import main
from tests.unit.gateway.conftest import start_gateway
from tests.unit.gateway.fakes import Fakes


@pytest.fixture
async def target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    (tmp_path / "auth").mkdir()
    (tmp_path / "auth" / "dev-client.json").write_text(
        json.dumps({"client_id": "dev", "client_secret": "s3cret", "tenant": "acme"})
    )
    monkeypatch.setenv("TOOLMESH_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("TOOLMESH_TOKEN", raising=False)
    inner, gateway, channel, gw = await start_gateway(Fakes())
    await gw.wait_ready()
    yield f"127.0.0.1:{gateway.port}"
    await channel.close()
    await gateway.stop(0)
    await inner.stop(0)


async def toolmesh(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    # The CLI is synchronous; run it off the loop that serves the gateway.
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_run_prints_answer_tool_and_ids_with_a_dev_token(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await toolmesh(
        capsys, "run", "what is 17 * 23", "--session", "demo", "--target", target
    )
    assert (code, err) == (0, "")
    assert out.startswith("calculator says 391\n")
    assert "calculator@1.0.0" in out and "request id" in out


async def test_run_json_then_history_json(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await toolmesh(
        capsys, "run", "what is 2 + 3", "--session", "j", "--json", "--target", target
    )
    assert code == 0 and json.loads(out)["tool_name"] == "calculator"
    code, out, _ = await toolmesh(capsys, "history", "--session", "j", "--json", "--target", target)
    turns = json.loads(out)["turns"]
    assert code == 0 and [t["content"] for t in turns] == ["what is 2 + 3", "calculator says 391"]


async def test_bad_input_prints_the_status_and_field_and_exits_non_zero(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await toolmesh(capsys, "run", " ", "--session", "s", "--target", target)
    assert code == 1 and out == ""
    assert err.startswith("error: INVALID_ARGUMENT: prompt: ")
    assert "\n  prompt: " in err and "Traceback" not in err


async def test_token_tools_and_stats(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, token, _ = await toolmesh(capsys, "token", "--target", target)
    assert code == 0 and token.count(".") == 2
    code, out, _ = await toolmesh(capsys, "tools", "--target", target, "--token", token.strip())
    assert code == 0 and "save_note" in out and "write" in out
    code, out, _ = await toolmesh(capsys, "stats", "--by", "service", "--target", target)
    assert code == 0 and "toolmesh-gateway" in out


async def test_token_with_explicit_credentials(
    target: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("wrong\n")
    code, out, err = await toolmesh(
        capsys,
        "token",
        "--client-id",
        "dev",
        "--client-secret-file",
        str(secret),
        "--target",
        target,
    )
    assert code == 1 and out == ""
    assert err == "error: UNAUTHENTICATED: invalid client credentials\n"
    assert "wrong" not in err


async def test_bad_token_is_unauthenticated(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = await toolmesh(capsys, "tools", "--target", target, "--token", "not-a-jwt")
    assert code == 1 and err == "error: UNAUTHENTICATED: malformed token\n"
