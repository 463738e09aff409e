"""The operator commands' parsing, maths and output; capacity's HPA patches through kustomize."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from cli import capacity, ops
from cli.main import build_parser, main
from tests.unit.gateway import test_operations as gateway_ops
from toolmesh.gateway.v1 import gateway_pb2
from toolmesh.telemetry.v1 import telemetry_pb2

REPO = Path(__file__).resolve().parents[3]


# -- capacity ---------------------------------------------------------------------------------


def test_capacity_worked_example_is_exactly_ten() -> None:
    q, latency, u = (capacity.decimal(t) for t in ("20", "0.3", "0.6"))
    assert capacity.workers(q, latency, u) == 10


def test_capacity_is_exact_where_floating_point_is_not() -> None:
    # In floating point 3 * 0.1 / 0.1 is 3.0000000000000004, whose ceiling would be 4.
    assert 3 * 0.1 / 0.1 > 3
    assert capacity.workers(capacity.decimal("3"), capacity.decimal("0.1"), Fraction("0.1")) == 3
    assert capacity.workers(Fraction(3), Fraction("0.2"), Fraction("0.6")) == 1


@pytest.mark.parametrize(
    ("q", "latency", "u", "expected"),
    [
        ("800", "0.003", "0.6", 4),
        ("400", "0.003", "0.6", 2),
        ("1", "0.001", "1", 1),
        ("10", "0.31", "0.6", 6),  # 5.1666... -> 6
        ("0", "0.3", "0.6", 0),
    ],
)
def test_capacity_formula(q: str, latency: str, u: str, expected: int) -> None:
    assert capacity.workers(Fraction(q), Fraction(latency), Fraction(u)) == expected


def test_capacity_refuses_a_utilization_outside_0_to_1() -> None:
    with pytest.raises(ValueError):
        capacity.workers(Fraction(1), Fraction(1), Fraction(0))
    with pytest.raises(argparse.ArgumentTypeError):
        capacity.utilization("1.5")
    with pytest.raises(argparse.ArgumentTypeError):
        capacity.positive("abc")


def test_measured_mean_ms_becomes_exact_seconds() -> None:
    assert capacity.ms_to_seconds(300.0) == Fraction(3, 10)
    assert capacity.ms_to_seconds(2.5) == Fraction(1, 400)


def test_capacity_with_given_latency_prints_ten_per_service(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["capacity", "--rps", "20", "--utilization", "0.6", "--latency", "0.3"])
    out = capsys.readouterr().out
    assert code == 0
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["gateway"],)]
    assert rows == [["gateway", "0.3", "given", "10", "10"]]
    assert "single-threaded asyncio process" in out


def test_capacity_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["capacity", "--rps", "20", "--utilization", "0.6", "--latency", "0.3", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert {s["service"]: s["replicas"] for s in data["services"]} == dict.fromkeys(
        capacity.SERVICES, 10
    )


def test_estimates_mark_services_without_spans() -> None:
    found = capacity.estimates(
        Fraction(20), Fraction(6, 10), None, {"gateway": (Fraction(3, 10), 5)}
    )
    by_name = {e.service: e for e in found}
    assert by_name["gateway"].workers == 10 and by_name["gateway"].source == "measured"
    assert by_name["telemetry"].workers is None


@pytest.mark.skipif(
    shutil.which("kubectl", path=str(Path(sys.executable).parent)) is None
    and shutil.which("kubectl") is None,
    reason="kubectl (kustomize) not installed",
)
def test_emitted_hpa_patch_sets_min_replicas_in_the_prod_overlay(tmp_path: Path) -> None:
    k8s = tmp_path / "k8s"
    shutil.copytree(REPO / "deploy" / "k8s", k8s)
    overlay = k8s / "overlays" / "prod"
    argv = ["capacity", "--rps", "20", "--utilization", "0.6", "--latency", "0.3"]
    assert main([*argv, "--emit-hpa", str(overlay)]) == 0
    patch = overlay / "gateway" / capacity.PATCH_FILE
    assert yaml.safe_load(patch.read_text())["spec"] == {"minReplicas": 10}
    # Included as docs/observability.md says: after the overlay's own HPA patch.
    kustomization = overlay / "gateway" / "kustomization.yaml"
    data = yaml.safe_load(kustomization.read_text())
    data["patches"].append({"path": capacity.PATCH_FILE})
    kustomization.write_text(yaml.safe_dump(data))
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or "kubectl"
    built = subprocess.run(
        [kubectl, "kustomize", str(overlay / "gateway")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    hpas = [
        doc for doc in yaml.safe_load_all(built) if doc and doc["kind"] == "HorizontalPodAutoscaler"
    ]
    assert [h["spec"]["minReplicas"] for h in hpas] == [10]
    assert hpas[0]["spec"]["maxReplicas"] >= 10


# -- the other commands' parsing --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "micros"),
    [("0.25", 250_000), ("1", 1_000_000), ("0.000001", 1), ("12.5", 12_500_000), ("0", 0)],
)
def test_cost_is_parsed_to_exact_micros(text: str, micros: int) -> None:
    assert ops.cost_micros(text) == micros


@pytest.mark.parametrize("text", ["0.0000001", "-1", "abc", "nan"])
def test_bad_cost_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        ops.cost_micros(text)


def test_group_by_list() -> None:
    assert ops.group_by_list("tenant,principal,tool,day") == ["tenant", "principal", "tool", "day"]
    with pytest.raises(argparse.ArgumentTypeError):
        ops.group_by_list("tool,tool")
    with pytest.raises(argparse.ArgumentTypeError):
        ops.group_by_list("route")


def test_parser_knows_every_operator_command() -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["budget", "set", "--period", "day", "--tool-calls", "10", "--cost", "0.25"]
    )
    assert (args.tool_calls, args.cost, args.principal) == (10, 250_000, "")
    assert parser.parse_args(["cost", "--by", "tool,day"]).by == ["tool", "day"]
    assert parser.parse_args(["audit", "verify"]).handler is ops.cmd_audit_verify
    assert parser.parse_args(["trace", "ab" * 16]).trace_id == "ab" * 16
    assert parser.parse_args(["slo", "--json"]).json


# -- output -----------------------------------------------------------------------------------


def _span(span_id: str, parent: str, service: str, name: str, ms: float, **kw: object):
    span = telemetry_pb2.TraceSpan(
        span_id=span_id,
        parent_span_id=parent,
        service=service,
        name=name,
        duration_ms=ms,
        **kw,  # type: ignore[arg-type]
    )
    span.start_time.FromMilliseconds(int(1000 + len(span_id)))
    return span


def test_trace_tree_indents_children_under_their_parent() -> None:
    reply = gateway_pb2.GetTraceResponse(
        spans=[
            _span("r", "", "toolmesh-gateway", "Gateway/Run", 12.0),
            _span("rc", "r", "toolmesh-gateway", "Router/Route", 4.0),
            _span("rcs", "rc", "toolmesh-router", "Router/Route", 3.0),
            _span("rcst", "rcs", "toolmesh-router", "execute_tool calculator", 1.0, error=True),
        ]
    )
    lines = ops.format_trace(reply).splitlines()
    assert lines[0].split() == ["SPAN", "SERVICE", "KIND", "MS", "STATUS"]
    assert lines[1].startswith("Gateway/Run ")
    assert lines[2].startswith("  Router/Route ")
    assert lines[3].startswith("    Router/Route ") and "router" in lines[3]
    assert lines[4].startswith("      execute_tool calculator") and "ERROR" in lines[4]
    assert lines[-1] == "4 spans; services: gateway, router"


def test_verify_output_names_the_event_and_the_tampering() -> None:
    broken = gateway_pb2.VerifyAuditResponse(
        ok=False,
        events_checked=3,
        problem=telemetry_pb2.AuditProblem(
            kind=telemetry_pb2.AUDIT_PROBLEM_KIND_EDITED,
            seq=2,
            event_id="ev-2",
            message="stored hash does not match",
        ),
    )
    text = ops.format_verify(broken)
    assert "BROKEN" in text and "EDITED at seq 2 (event ev-2)" in text
    ok = ops.format_verify(gateway_pb2.VerifyAuditResponse(ok=True, events_checked=3, head_seq=3))
    assert ok.startswith("audit chain ok: 3 events checked")


def test_verify_output_names_checkpoint_problems_and_dead_letters() -> None:
    """REWRITTEN, TRUNCATED and WIPED came out as UNKNOWN; dead letters were not mentioned."""
    for kind in ("REWRITTEN", "TRUNCATED", "WIPED", "CHECKPOINT_INVALID"):
        reply = gateway_pb2.VerifyAuditResponse(
            ok=False,
            problem=telemetry_pb2.AuditProblem(kind=f"AUDIT_PROBLEM_KIND_{kind}", seq=5),
            last_checkpoint=telemetry_pb2.AuditCheckpoint(seq=5),
        )
        text = ops.format_verify(reply)
        assert f"BROKEN: {kind} at seq 5" in text and "last signed checkpoint: seq 5" in text
    ok = ops.format_verify(gateway_pb2.VerifyAuditResponse(ok=True, dead_letter_notices=2))
    assert "dead letters: 2 audit event(s)" in ok


def test_budget_and_cost_tables_show_money_in_currency_units() -> None:
    status = telemetry_pb2.BudgetStatus(
        tenant="acme",
        period=telemetry_pb2.BUDGET_PERIOD_DAY,
        limits=telemetry_pb2.BudgetAmounts(tool_calls=10, cost_micros=250_000),
        used=telemetry_pb2.BudgetAmounts(tool_calls=3, cost_micros=1500),
        reserved=telemetry_pb2.BudgetAmounts(tool_calls=1),
    )
    text = ops.format_budgets([status])
    assert "(whole tenant)" in text and "3 / 10 (+1 held)" in text
    assert "0.001500 / 0.250000" in text and "/ no limit" in text
    cost = gateway_pb2.GetCostResponse(
        rows=[
            telemetry_pb2.CostRow(
                tool_name="calculator", requests=2, cost_micros=2_500, currency="USD"
            )
        ]
    )
    assert "0.002500 USD" in ops.format_cost(cost, ["tool"])


def test_slo_table_shows_firing_alerts() -> None:
    reply = gateway_pb2.GetSloResponse(
        version="v1",
        objectives=[
            telemetry_pb2.SloObjective(
                name="flaky",
                service="toolmesh-router",
                tool="chaos_flaky",
                slis=[
                    telemetry_pb2.SliStatus(
                        kind=telemetry_pb2.SLI_KIND_AVAILABILITY,
                        target=0.99,
                        total=40,
                        good=20,
                        sli=0.5,
                        error_budget_remaining=-49,
                        burn_rates=[telemetry_pb2.BurnRate(window_seconds=300, burn_rate=50)],
                        alerts=[
                            telemetry_pb2.BurnAlert(
                                severity=telemetry_pb2.BURN_ALERT_SEVERITY_PAGE, firing=True
                            ),
                            telemetry_pb2.BurnAlert(
                                severity=telemetry_pb2.BURN_ALERT_SEVERITY_TICKET, firing=False
                            ),
                        ],
                    )
                ],
            )
        ],
    )
    row = ops.format_slo(reply).splitlines()[1]
    assert row.split()[:4] == ["flaky", "router", "tool", "chaos_flaky"]
    assert row.rstrip().endswith("PAGE") and "50.0" in row


# -- the commands against a real gateway and telemetry, in-process ------------------------------


# The real gateway in front of a real telemetry (tests.unit.gateway.test_operations).
ops_stack = gateway_ops.stack


async def _toolmesh(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    import asyncio

    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_commands_against_a_real_gateway(
    ops_stack: gateway_ops.Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"--target={ops_stack.target}"
    admin = f"--token={ops_stack.token(scope='ops:read admin')}"
    trace_id = await gateway_ops._a_trace(ops_stack, "acme")

    code, out, err = await _toolmesh(capsys, "trace", trace_id, target, admin)
    assert (code, err) == (0, "")
    assert out.splitlines()[1].startswith("toolmesh.gateway.v1.Gateway/Run")
    assert out.splitlines()[2].startswith("  toolmesh.router.v1.Router/Route")

    code, out, err = await _toolmesh(
        capsys, "budget", "set", "--period", "month", "--cost", "0.25", target, admin
    )
    assert code == 0, err
    assert "0.000000 / 0.250000" in out
    code, out, _ = await _toolmesh(capsys, "budget", "show", "--json", target, admin)
    assert json.loads(out)["budgets"][0]["limits"]["cost_micros"] == 250_000

    code, out, _ = await _toolmesh(capsys, "cost", "--by", "tool,day", target, admin)
    assert code == 0 and out.startswith("(no usage in this window)")

    # The budget change is audited through the gateway's outbox, delivered in the background:
    # the chain holds it once the relay has run (asserting 0 raced that delivery).
    for _ in range(100):
        code, out, _ = await _toolmesh(capsys, "audit", "verify", target, admin)
        if "1 events checked" in out:
            break
        await asyncio.sleep(0.05)
    assert code == 0 and out.startswith("audit chain ok: 1 events checked")

    code, out, _ = await _toolmesh(capsys, "slo", target, admin)
    assert code == 0 and "gateway-run" in out

    code, _, err = await _toolmesh(capsys, "trace", "0" * 32, target, admin)
    assert code == 1 and "INVALID_ARGUMENT" in err and "trace_id" in err
