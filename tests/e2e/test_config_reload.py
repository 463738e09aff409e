"""Configuration mounted from files and reloaded without a restart (docs/deploy.md): prices,
SLOs and routing rules change under the running processes; the version in use shows in
GetServiceInfo; a bad file keeps the old version and logs one ERROR line."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from services.router.settings import DEFAULT_RULES_FILE
from services.telemetry.settings import TelemetrySettings
from testing.mesh import Mesh
from toolmesh.common.v1 import common_pb2
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from toolmesh.router.v1 import router_pb2, router_pb2_grpc
from toolmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc

POLL_S = 0.2
T = TypeVar("T")
PRICES = TelemetrySettings.model_fields["prices_file"].default
SLOS = TelemetrySettings.model_fields["slo_file"].default
NEW_RULES = "2027.01.01-1"
# A rule the packaged rules do not have: this prompt lists the notes only under NEW_RULES.
NEW_INTENT = "  { pattern = '^\\s*what\\s+did\\s+i\\s+jot\\s*\\??\\s*$', score = 1.0 },\n"
NEW_EXAMPLE = '\n[[examples]]\nprompt = "what did i jot"\ntool = "list_notes"\n'


def new_rules() -> str:
    """The packaged rules as version NEW_RULES with one more intent for list_notes."""
    text = DEFAULT_RULES_FILE.read_text().replace('"2026.11.29-1"', f'"{NEW_RULES}"')
    anchor = "[tools.list_notes]\nintents = [\n"
    assert anchor in text
    return text.replace(anchor, anchor + NEW_INTENT) + NEW_EXAMPLE


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("reload")
    config = root / "config"
    (config / "rules.d").mkdir(parents=True)
    (config / "routing.toml").write_text(DEFAULT_RULES_FILE.read_text())
    (config / "prices.toml").write_text(PRICES.read_text())
    (config / "slo.toml").write_text(SLOS.read_text())
    mesh = Mesh(
        data_dir=root / "data",
        extra_env={
            "TOOLMESH_ROUTER_RULES_FILE": str(config / "routing.toml"),
            "TOOLMESH_ROUTER_RULES_DIR": str(config / "rules.d"),
            "TOOLMESH_TELEMETRY_PRICES_FILE": str(config / "prices.toml"),
            "TOOLMESH_TELEMETRY_SLO_FILE": str(config / "slo.toml"),
            "TOOLMESH_CONFIG_RELOAD_S": str(POLL_S),
        },
    )
    mesh.start_all()
    try:
        yield mesh
    finally:
        mesh.stop_all()


def config_dir(mesh: Mesh) -> Path:
    return mesh.data_dir.parent / "config"


def until(probe: Callable[[], T], done: Callable[[T], bool], timeout: float = 10.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(POLL_S / 2)


def info(mesh: Mesh, service: str) -> dict[str, str]:
    with mesh.channel(service) as channel:
        if service == "router":
            reply = router_pb2_grpc.RouterStub(channel).GetServiceInfo(
                router_pb2.GetServiceInfoRequest(), timeout=5
            )
        else:
            reply = telemetry_pb2_grpc.TelemetryStub(channel).GetServiceInfo(
                telemetry_pb2.GetServiceInfoRequest(), timeout=5
            )
    return dict(reply.info.attributes)


def refusals(mesh: Mesh, service: str, config: str) -> list[dict[str, object]]:
    return [
        r
        for r in mesh.log_records(service)
        if r.get("level") == "ERROR" and r.get("config") == config
    ]


def no_traceback(mesh: Mesh, service: str) -> bool:
    return "Traceback" not in mesh.log_path(service).read_text(errors="replace")


def test_new_prices_apply_to_new_usage_only_and_a_bad_table_keeps_them(mesh: Mesh) -> None:
    tenant = f"reload-{uuid.uuid4().hex[:6]}"
    caller = common_pb2.Caller(subject="ops", tenant=tenant)

    def record() -> telemetry_pb2.RecordUsageResponse:
        usage = telemetry_pb2.UsageRecord(
            request_id=uuid.uuid4().hex, tenant=tenant, principal="ops", route="/x", tool_calls=10
        )
        usage.occurred_at.GetCurrentTime()
        with mesh.channel("telemetry") as channel:
            stub = telemetry_pb2_grpc.TelemetryStub(channel)
            reply: telemetry_pb2.RecordUsageResponse = stub.RecordUsage(
                telemetry_pb2.RecordUsageRequest(records=[usage]), timeout=5
            )
            return reply

    def cost() -> int:
        with mesh.channel("telemetry") as channel:
            reply = telemetry_pb2_grpc.TelemetryStub(channel).GetCost(
                telemetry_pb2.GetCostRequest(caller=caller, days=1), timeout=5
            )
        return sum(row.cost_micros for row in reply.rows)

    before = info(mesh, "telemetry")
    assert before["config.prices.version"] == "2026-12-01"
    assert record().price_version == "2026-12-01"
    assert cost() == 10 * 200  # 0.0002 per tool call

    prices = config_dir(mesh) / "prices.toml"
    text = prices.read_text()
    prices.write_text(
        text.replace('version = "2026-12-01"', 'version = "2027-01-01"').replace(
            'per_tool_call = "0.0002"', 'per_tool_call = "0.001"'
        )
    )
    after = until(
        lambda: info(mesh, "telemetry"), lambda a: a["config.prices.version"] != "2026-12-01"
    )
    assert after["config.prices.version"] == "2027-01-01"
    assert after["config.prices.digest"] != before["config.prices.digest"]
    assert record().price_version == "2027-01-01"
    # The first record keeps the price it was charged at; only the new one costs 0.001.
    assert cost() == 10 * 200 + 10 * 1000

    # Changed prices under the version in use, then a table that does not parse: refused,
    # one ERROR line each, however many polls see them; the table in use stays.
    prices.write_text(prices.read_text().replace('"0.001"', '"0.002"'))
    until(lambda: refusals(mesh, "telemetry", "prices"), lambda r: len(r) >= 1)
    prices.write_text("version = \n")
    until(lambda: refusals(mesh, "telemetry", "prices"), lambda r: len(r) >= 2)
    time.sleep(5 * POLL_S)
    lines = refusals(mesh, "telemetry", "prices")
    assert len(lines) == 2, lines
    assert "still says version 2027-01-01" in str(lines[0]["message"])
    assert "keeping version 2027-01-01" in str(lines[1]["message"])
    assert info(mesh, "telemetry")["config.prices.version"] == "2027-01-01"
    assert record().price_version == "2027-01-01"
    assert no_traceback(mesh, "telemetry")


def test_a_changed_slo_objective_shows_in_get_slo(mesh: Mesh) -> None:
    def objective() -> telemetry_pb2.GetSloResponse:
        with mesh.channel("telemetry") as channel:
            reply: telemetry_pb2.GetSloResponse = telemetry_pb2_grpc.TelemetryStub(channel).GetSlo(
                telemetry_pb2.GetSloRequest(name="gateway-run"), timeout=5
            )
            return reply

    first = objective()
    assert first.version == "2026-12-01"
    assert first.objectives[0].slis[0].target == pytest.approx(0.99)
    slo = config_dir(mesh) / "slo.toml"
    slo.write_text(
        slo.read_text()
        .replace('version = "2026-12-01"', 'version = "2027-02-01"')
        .replace("availability = 0.99\n", "availability = 0.999\n", 1)
    )
    changed = until(objective, lambda r: r.version != "2026-12-01")
    assert changed.version == "2027-02-01"
    assert changed.objectives[0].slis[0].target == pytest.approx(0.999)
    assert info(mesh, "telemetry")["config.slo.version"] == "2027-02-01"


def test_a_mounted_rules_version_is_loaded_then_served_through_a_release(mesh: Mesh) -> None:
    token = mesh.token()
    metadata = (("authorization", f"Bearer {token}"),)

    def run() -> gateway_pb2.RunResponse:
        with mesh.channel("gateway") as channel:
            reply: gateway_pb2.RunResponse = gateway_pb2_grpc.GatewayStub(channel).Run(
                gateway_pb2.RunRequest(session_id="reload", prompt="what did i jot"),
                metadata=metadata,
                timeout=10,
            )
            return reply

    seed = info(mesh, "router")
    assert seed["routing_rules.loaded"] == seed["routing_rules.stable"] == "2026.11.29-1"
    assert run().tool_name == ""

    # A bad version file: refused with one line, nothing new loaded.
    versions = config_dir(mesh) / "rules.d"
    (versions / "broken.toml").write_text('version = "x"\nthreshold = 2\n')
    until(lambda: refusals(mesh, "router", "routing_rules"), lambda r: len(r) >= 1)
    (versions / "broken.toml").unlink()

    new = new_rules()
    (versions / "next.toml").write_text(new)
    loaded = until(lambda: info(mesh, "router"), lambda a: NEW_RULES in a["routing_rules.loaded"])
    assert loaded["routing_rules.loaded"] == f"2026.11.29-1,{NEW_RULES}"
    # Loaded is not served: the stable version still routes until a release says otherwise.
    assert loaded["routing_rules.stable"] == "2026.11.29-1"
    assert run().tool_name == ""

    with mesh.channel("gateway") as channel:
        gateway_pb2_grpc.GatewayStub(channel).StartRelease(
            gateway_pb2.StartReleaseRequest(
                unit=router_pb2.ReleaseUnit(kind=router_pb2.RELEASE_UNIT_KIND_ROUTING),
                candidate_version=NEW_RULES,
                plan=router_pb2.ReleasePlan(kind=router_pb2.RELEASE_PLAN_KIND_IMMEDIATE),
                reason="mounted rules",
            ),
            metadata=metadata,
            timeout=15,
        )
    served = until(run, lambda r: r.tool_name != "")
    assert (served.tool_name, served.rules_version) == ("list_notes", NEW_RULES)
    assert info(mesh, "router")["routing_rules.stable"] == NEW_RULES

    # The version's file edited in place without a new version: refused, the loaded one stays.
    (versions / "next.toml").write_text(new.replace("jot", "scribble"))
    until(lambda: refusals(mesh, "router", "routing_rules"), lambda r: len(r) >= 2)
    time.sleep(5 * POLL_S)
    lines = refusals(mesh, "router", "routing_rules")
    assert len(lines) == 2, lines
    assert "never changes" in str(lines[1]["message"])
    assert run().tool_name == "list_notes"
    assert no_traceback(mesh, "router")


@pytest.mark.parametrize("service", ["telemetry", "router"])
def test_sighup_reloads_instead_of_ending_the_process(mesh: Mesh, service: str) -> None:
    """SIGHUP's default action ends a process; here it means "reload now"."""
    mesh.procs[service].send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert mesh.procs[service].poll() is None, "SIGHUP must not stop the process"
    assert info(mesh, service)["replica" if service == "router" else "config.slo.version"]
