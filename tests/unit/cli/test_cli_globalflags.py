"""CLI polish: global flags anywhere, --version, run - from stdin, JSON errors with the status
code, --fail-on-fallback, help without code markup, and a token minted once then reused."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from grpc import aio

from cli import globalflags, tokencache
from cli.main import build_parser, main
from tests.unit.gateway.conftest import start_gateway
from tests.unit.gateway.fakes import FakeAuth, Fakes
from toolmesh.auth.v1 import auth_pb2


class CountingAuth(FakeAuth):
    def __init__(self) -> None:
        super().__init__()
        self.issued = 0

    async def IssueToken(
        self, request: auth_pb2.IssueTokenRequest, context: aio.ServicerContext
    ) -> auth_pb2.IssueTokenResponse:
        self.issued += 1
        return await super().IssueToken(request, context)


@dataclass
class Gateway:
    target: str
    auth: CountingAuth


@pytest.fixture
async def gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gateway]:
    (tmp_path / "auth").mkdir()
    (tmp_path / "auth" / "dev-client.json").write_text(
        json.dumps({"client_id": "dev", "client_secret": "s3cret", "tenant": "acme"})
    )
    monkeypatch.setenv("TOOLMESH_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("TOOLMESH_TOKEN", raising=False)
    auth = CountingAuth()
    inner, server, channel, gw = await start_gateway(Fakes(auth=auth))
    await gw.wait_ready()
    yield Gateway(f"127.0.0.1:{server.port}", auth)
    await channel.close()
    await server.stop(0)
    await inner.stop(0)


async def toolmesh(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_global_flags_before_the_subcommand_move_after_it() -> None:
    assert globalflags.hoist(["--json", "--target", "h:1", "run", "p"]) == [
        "run",
        "p",
        "--json",
        "--target",
        "h:1",
    ]
    assert globalflags.hoist(["--token=t", "tenants", "allow", "a", "--", "-x"]) == [
        "tenants",
        "allow",
        "a",
        "--token=t",
        "--",
        "-x",
    ]
    # After the subcommand: left alone.
    assert globalflags.hoist(["run", "p", "--json"]) == ["run", "p", "--json"]
    parser = build_parser()
    for argv in (
        ["--json", "--target", "h:1", "--token", "t", "history", "--session", "s"],
        ["history", "--session", "s", "--json", "--target", "h:1", "--token", "t"],
    ):
        args = parser.parse_args(globalflags.hoist(argv))
        assert (args.json, args.target, args.token) == (True, "h:1", "t")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"toolmesh {globalflags.version()}"


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += _parsers(child)
    return found


def test_help_texts_carry_no_code_markup() -> None:
    parsers = _parsers(build_parser())
    assert len(parsers) > 40
    for parser in parsers:
        text = parser.format_help()
        assert "`" not in text and "::" not in text, parser.prog


async def test_global_flags_work_on_either_side(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    before = await toolmesh(
        capsys, "--json", "--target", gateway.target, "run", "what is 2 + 3", "--session", "a"
    )
    after = await toolmesh(
        capsys, "run", "what is 2 + 3", "--session", "b", "--target", gateway.target, "--json"
    )
    for code, out, err in (before, after):
        assert (code, err) == (0, "")
        assert json.loads(out)["tool_name"] == "calculator"


async def test_run_dash_reads_the_prompt_from_stdin(
    gateway: Gateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("what is 2 + 3\n"))
    code, out, _ = await toolmesh(
        capsys, "run", "-", "--session", "in", "--target", gateway.target, "--json"
    )
    assert code == 0 and json.loads(out)["tool_name"] == "calculator"
    code, out, _ = await toolmesh(
        capsys, "history", "--session", "in", "--target", gateway.target, "--json"
    )
    assert json.loads(out)["turns"][0]["content"] == "what is 2 + 3"


async def test_fail_on_fallback_exits_non_zero_when_no_tool_answered(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    run = ["run", "--session", "f", "--target", gateway.target]
    code, out, _ = await toolmesh(capsys, *run, "hello there")
    assert code == 0 and "no match" in out
    code, out, _ = await toolmesh(capsys, *run, "hello there", "--fail-on-fallback")
    assert code == globalflags.FALLBACK_EXIT and "no match" in out
    code, _, _ = await toolmesh(capsys, *run, "what is 2 + 3", "--fail-on-fallback")
    assert code == 0


async def test_json_errors_go_to_stderr_with_the_status_code(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await toolmesh(
        capsys, "--json", "run", " ", "--session", "s", "--target", gateway.target
    )
    assert code == 1 and out == ""
    error = json.loads(err)["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert [v["field"] for v in error["field_violations"]] == ["prompt"]
    code, out, err = await toolmesh(
        capsys, "token", "--json", "--client-id", "x", "--target", gateway.target
    )
    assert code == 1 and out == ""
    assert json.loads(err)["error"]["code"] == "INVALID_ARGUMENT"


async def test_the_token_is_minted_once_and_reused(
    gateway: Gateway, capsys: pytest.CaptureFixture[str], token_cache_dir: Path
) -> None:
    for session in ("t1", "t2", "t3"):
        code, _, err = await toolmesh(
            capsys, "run", "what is 2 + 3", "--session", session, "--target", gateway.target
        )
        assert (code, err) == (0, "")
    await toolmesh(capsys, "tools", "--target", gateway.target)
    assert gateway.auth.issued == 1
    path = token_cache_dir / tokencache.FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_cache_dir.stat().st_mode) == 0o700
    assert "s3cret" not in path.read_text()


@dataclass
class Reply:
    access_token: str
    expires_in: int


def test_a_token_near_expiry_is_replaced() -> None:
    minted: list[str] = []

    def issue() -> Reply:
        minted.append(f"t{len(minted)}")
        return Reply(minted[-1], 600)

    key = tokencache.cache_key("gw", "dev", "secret")
    assert tokencache.cached_token(key, issue, now=1000.0) == ("t0", False)
    assert tokencache.cached_token(key, issue, now=1500.0) == ("t0", True)
    # 60 s left: too close to expiry to start a command with.
    assert tokencache.cached_token(key, issue, now=1540.0) == ("t1", False)
    # Another secret (or mesh) never gets this token.
    other = tokencache.cache_key("gw", "dev", "rotated")
    assert tokencache.cached_token(other, issue, now=1541.0) == ("t2", False)
