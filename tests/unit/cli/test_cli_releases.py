"""``toolmesh release ...`` through main() against a real gateway (in front of the contract
fakes), in-process: what reaches the router, which scope the gateway asks for, what is
audited and what is printed. The releases themselves run against real routers in
tests/unit/router/test_releases.py and on the real mesh in tests/releases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from cli.releases import duration, steps, unit_from
from tests.unit.cli.test_cli_backends import Cli, _eventually, cli  # noqa: F401
from toolmesh.router.v1 import router_pb2

R = router_pb2
OPERATOR = "admin platform:admin ops:read tools:read"


async def test_start_sends_the_plan_and_is_audited(cli: Cli) -> None:  # noqa: F811
    code, out, err = await cli(
        "release", "start", "tool", "calculator", "--candidate", "1.1.0",
        "--plan", "canary-only", "--steps", "10,50,100", "--interval", "500ms",
        "--threshold", "3", "--monitor", "5m", "--min-requests", "30",
        "--reason", "faster parser", token=cli.token(scope=OPERATOR),
    )  # fmt: skip
    assert (code, err) == (0, "")
    (request,) = cli.fakes.router.release_requests
    assert isinstance(request, R.StartReleaseRequest)
    assert (request.unit.kind, request.unit.name) == (R.RELEASE_UNIT_KIND_TOOL, "calculator")
    plan = request.plan
    assert plan.kind == R.RELEASE_PLAN_KIND_CANARY_ONLY and list(plan.steps) == [10, 50, 100]
    assert (plan.interval_seconds, plan.threshold, plan.min_requests) == (0.5, 3, 30)
    assert plan.monitor_seconds == 300 and not plan.HasField("max_burn_rate")
    assert request.caller.tenant == "acme" and request.reason == "faster parser"
    assert out.startswith("release r1 started: tool:calculator 1.1.0 (canary step 1/3, 10%)")
    assert "plan        canary_only: steps 10,50,100 every 0.5s, threshold 3" in out
    await _eventually(lambda: "release.start" in cli.actions())
    event = next(e for e in cli.fakes.telemetry.audit if e.action == "release.start")
    assert event.target == "tool:calculator@1.1.0"
    assert json.loads(event.details_json)["plan"] == "RELEASE_PLAN_KIND_CANARY_ONLY"


async def test_platform_wide_units_need_the_platform_operator(cli: Cli) -> None:  # noqa: F811
    tenant_admin = cli.token(scope="admin ops:read tools:read")
    for argv in (
        ("release", "start", "tool", "calculator", "--candidate", "1.1.0"),
        ("release", "start", "routing", "--candidate", "2026.12.01-1"),
        ("release", "start", "prompt", "answer", "--candidate", "3", "--shared"),
    ):
        code, _, err = await cli(*argv, token=tenant_admin)
        assert code == 1 and "PERMISSION_DENIED" in err and "platform:admin" in err
    assert not cli.fakes.router.release_requests
    # A tenant's own backend tool and prompt selection are its admin's to release.
    code, _, err = await cli(
        "release", "start", "tool", "files.read", "--candidate", "2.0.0", token=tenant_admin
    )
    assert (code, err) == (0, "")
    code, _, err = await cli(
        "release", "start", "prompt", "answer", "--candidate", "3", token=tenant_admin
    )
    assert (code, err) == (0, "")
    await _eventually(lambda: cli.actions().count("permission.denied") == 3)


async def test_examples_from_a_file_and_a_refused_gate(cli: Cli, tmp_path: Path) -> None:  # noqa: F811
    examples = tmp_path / "ex.json"
    examples.write_text(json.dumps([{"arguments": {"path": "a"}, "answer_contains": "a"}]))
    code, _, err = await cli(
        "release", "start", "tool", "files.read", "--candidate", "2.0.0",
        "--allow-breaking", "--examples", str(examples),
    )  # fmt: skip
    assert (code, err) == (0, "")
    request = cli.fakes.router.release_requests[-1]
    assert isinstance(request, R.StartReleaseRequest) and request.allow_breaking
    assert json.loads(request.examples_json)[0]["answer_contains"] == "a"
    code, _, err = await cli("release", "start", "tool", "files.read", "--candidate", "bad")
    assert code == 1 and err.startswith("error: FAILED_PRECONDITION: release r0 refused")
    examples.write_text("not json")
    code, _, err = await cli(
        "release", "start", "tool", "files.read", "--candidate", "2.0.0", "--examples",
        str(examples),
    )  # fmt: skip
    assert code == 1 and "is not JSON" in err
    # The refused start is audited too.
    await _eventually(lambda: cli.actions().count("release.start") == 2)


async def test_status_shows_the_figures_each_check_used(cli: Cli) -> None:  # noqa: F811
    operator = cli.token(scope=OPERATOR)
    await cli("release", "start", "tool", "calculator", "--candidate", "1.1.0", token=operator)
    release = cli.fakes.router.releases["r1"]
    at = Timestamp()
    at.GetCurrentTime()
    release.last_analysis.CopyFrom(
        R.ReleaseAnalysis(
            at=at,
            state=R.RELEASE_STATE_CANARY,
            weight=5,
            outcome="failed",
            decision="failed analysis 1 of 2",
            checks=[
                R.ReleaseCheck(
                    name="error_rate",
                    passed=False,
                    detail="candidate 20.00% of 40 calls failed, stable 0.00% of 400",
                    value=0.2,
                    limit=0.02,
                ),
                R.ReleaseCheck(name="p95_latency", passed=True, detail="candidate p95 12 ms"),
            ],
            figures=[
                R.ReleaseFigures(version="1.0.0", source="traffic", requests=400, p95_ms=11),
                R.ReleaseFigures(
                    version="1.1.0", source="traffic", requests=40, errors=8, error_rate=0.2
                ),
            ],
        )
    )
    code, out, err = await cli("release", "status", "r1", token=operator)
    assert (code, err) == (0, "")
    assert "last analysis" in out and "failed -> failed analysis 1 of 2" in out
    assert "error_rate   FAIL    candidate 20.00% of 40 calls failed" in out
    assert "1.1.0    traffic  40        8 (20.0%)" in out
    code, out, _ = await cli("release", "status", "r1", "--json", token=operator)
    assert json.loads(out)["release"]["last_analysis"]["checks"][0]["name"] == "error_rate"
    # Without an id: every release in progress.
    code, out, _ = await cli("release", "status", token=operator)
    assert "release     r1" in out


async def test_controls_and_history(cli: Cli) -> None:  # noqa: F811
    operator = cli.token(scope=OPERATOR)
    await cli("release", "start", "tool", "calculator", "--candidate", "1.1.0", token=operator)
    code, out, _ = await cli("release", "pause", "r1", "--reason", "look")
    assert code == 0 and out.startswith("release r1: paused (canary) step 1/4, candidate 1.1.0")
    code, out, _ = await cli("release", "resume", "r1")
    assert code == 0 and out.startswith("release r1: canary step 1/4")
    with pytest.raises(SystemExit):  # an abort says why
        await cli("release", "abort", "r1")
    code, out, _ = await cli("release", "abort", "r1", "--reason", "wrong build")
    assert code == 0 and "aborted" in out and "at 0%" in out
    controls = [
        r for r in cli.fakes.router.release_requests if isinstance(r, R.ControlReleaseRequest)
    ]
    assert [c.action for c in controls] == [
        R.RELEASE_CONTROL_PAUSE,
        R.RELEASE_CONTROL_RESUME,
        R.RELEASE_CONTROL_ABORT,
    ]
    assert controls[-1].reason == "wrong build"
    await _eventually(
        lambda: {"release.pause", "release.resume", "release.abort"} <= set(cli.actions())
    )
    code, out, _ = await cli("release", "history", "--unit", "tool:calculator")
    header, row = out.splitlines()
    assert header.split()[:5] == ["ID", "UNIT", "STABLE", "CANDIDATE", "STATE"]
    assert row.split()[:5] == ["r1", "tool:calculator", "1.0.0", "1.1.0", "aborted"]
    listed = cli.fakes.router.release_requests[-1]
    assert isinstance(listed, R.ListReleasesRequest) and listed.unit.name == "calculator"


def test_flags_parse_durations_steps_and_units() -> None:
    assert (duration("30s"), duration("500ms"), duration("10m"), duration("2")) == (
        30.0,
        0.5,
        600.0,
        2.0,
    )
    assert steps("5,25,50,100") == [5, 25, 50, 100]
    assert unit_from("routing").kind == R.RELEASE_UNIT_KIND_ROUTING
    assert unit_from("prompt:answer").name == "answer"
    for bad in ("routing:x", "tool", "nope:x"):
        with pytest.raises(Exception, match="--unit"):
            unit_from(bad)
