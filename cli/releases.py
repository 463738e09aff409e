"""``toolmesh release start|status|promote|pause|resume|abort|history``.

A release takes a candidate version of a tool, of the routing rules or of a prompt selection
through gates, shadow traffic and weighted canary steps to promotion, rolling it back on its
own when the figures say so (docs/releases.md). ``start`` needs ``admin`` (``platform:admin``
for built-in tools, the routing rules and shared units), ``status`` and ``history`` need
``ops:read``; every start and control is audited.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from cli import output
from cli.main import CliError, Connection, bearer
from cli.ops import non_negative_int, when
from toolmesh.gateway.v1 import gateway_pb2
from toolmesh.router.v1 import router_pb2

PLANS = {
    "shadow-then-canary": router_pb2.RELEASE_PLAN_KIND_SHADOW_THEN_CANARY,
    "canary-only": router_pb2.RELEASE_PLAN_KIND_CANARY_ONLY,
    "immediate": router_pb2.RELEASE_PLAN_KIND_IMMEDIATE,
}
KINDS = {
    "tool": router_pb2.RELEASE_UNIT_KIND_TOOL,
    "routing": router_pb2.RELEASE_UNIT_KIND_ROUTING,
    "prompt": router_pb2.RELEASE_UNIT_KIND_PROMPT,
}
CONTROLS = {
    "promote": router_pb2.RELEASE_CONTROL_PROMOTE,
    "pause": router_pb2.RELEASE_CONTROL_PAUSE,
    "resume": router_pb2.RELEASE_CONTROL_RESUME,
    "abort": router_pb2.RELEASE_CONTROL_ABORT,
}
ACTIVE = {
    router_pb2.RELEASE_STATE_SHADOW,
    router_pb2.RELEASE_STATE_CANARY,
    router_pb2.RELEASE_STATE_PAUSED,
    router_pb2.RELEASE_STATE_MONITORING,
}
MAX_EXAMPLES_BYTES = 256 * 1024
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def duration(text: str) -> float:
    """Seconds from "30s", "500ms", "10m", "1h" or a plain number of seconds."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration (30s, 500ms, 10m, 1h): {text!r}")
    return float(match.group(1)) * _UNITS_S[match.group(2)]


def steps(text: str) -> list[int]:
    try:
        weights = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"comma-separated percents, e.g. 5,25,50,100: {text!r}"
        ) from None
    if not weights:
        raise argparse.ArgumentTypeError("at least one weight")
    return weights


def unit_from(text: str) -> router_pb2.ReleaseUnit:
    """ "tool:calculator", "routing" or "prompt:route-system"."""
    kind, _, name = text.partition(":")
    if kind not in KINDS or (kind == "routing") == bool(name):
        raise CliError(f"--unit: tool:NAME, routing or prompt:NAME, not {text!r}")
    return router_pb2.ReleaseUnit(kind=KINDS[kind], name=name)


def _examples(path: str) -> str:
    if not path:
        return ""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_EXAMPLES_BYTES:
        raise CliError(f"{path} is larger than {MAX_EXAMPLES_BYTES} bytes")
    try:
        json.loads(data)
    except ValueError:
        raise CliError(f"{path} is not JSON (a list of examples)") from None
    return data.decode("utf-8")


def plan_from(args: argparse.Namespace) -> router_pb2.ReleasePlan:
    plan = router_pb2.ReleasePlan(
        kind=PLANS.get(args.plan, router_pb2.RELEASE_PLAN_KIND_UNSPECIFIED)
    )
    if args.steps:
        plan.steps.extend(args.steps)
    if args.interval is not None:
        plan.interval_seconds = args.interval
    if args.threshold is not None:
        plan.threshold = args.threshold
    if args.shadow_share is not None:
        plan.shadow_share = args.shadow_share
    if args.shadow_intervals is not None:
        plan.shadow_intervals = args.shadow_intervals
    if args.monitor is not None:
        plan.monitor_seconds = args.monitor
    if args.min_requests is not None:
        plan.min_requests = args.min_requests
    return plan


# -- formatting -------------------------------------------------------------------------------


def _state(value: int) -> str:
    return router_pb2.ReleaseState.Name(value).removeprefix("RELEASE_STATE_").lower()


def _plan_name(value: int) -> str:
    return router_pb2.ReleasePlanKind.Name(value).removeprefix("RELEASE_PLAN_KIND_").lower()


def unit_label(unit: router_pb2.ReleaseUnit) -> str:
    kind = router_pb2.ReleaseUnitKind.Name(unit.kind).removeprefix("RELEASE_UNIT_KIND_").lower()
    if kind == "routing":
        return "routing"
    owner = f"{unit.tenant}/" if unit.tenant else ""
    return f"{kind}:{owner}{unit.name}"


def _stage(release: router_pb2.Release) -> str:
    state = _state(release.state)
    if release.state == router_pb2.RELEASE_STATE_PAUSED:
        state = f"paused ({_state(release.paused_state)})"
    canary = release.state in (router_pb2.RELEASE_STATE_CANARY, router_pb2.RELEASE_STATE_PAUSED)
    if canary and release.step >= 0:
        state += f" step {release.step + 1}/{len(release.plan.steps)}"
    return state


def format_list(releases: list[router_pb2.Release]) -> str:
    if not releases:
        return "(no releases)"
    return output.table(
        ["ID", "UNIT", "STABLE", "CANDIDATE", "STATE", "WEIGHT", "FAILED", "STARTED", "BY"],
        [
            [
                r.id,
                unit_label(r.unit),
                r.stable_version,
                r.candidate_version,
                _stage(r),
                f"{r.weight}%",
                f"{r.failed_checks}/{r.plan.threshold}",
                when(r.started_at),
                r.started_by or "-",
            ]
            for r in releases
        ],
    )


def _figures(analysis: router_pb2.ReleaseAnalysis) -> str:
    return output.table(
        ["VERSION", "SOURCE", "REQUESTS", "ERRORS", "P95 MS", "BURN", "AGREEMENT", "WINDOW"],
        [
            [
                f.version,
                f.source,
                str(f.requests),
                f"{f.errors} ({f.error_rate:.1%})",
                f"{f.p95_ms:.1f}",
                f"{f.error_burn_rate:.2f}",
                f"{f.agreement:.1%}" if f.source == "shadow" else "-",
                f"{_span(f.window_start, f.window_end)}",
            ]
            for f in analysis.figures
        ],
    )


def _span(start: Timestamp, end: Timestamp) -> str:
    seconds = (end.seconds + end.nanos / 1e9) - (start.seconds + start.nanos / 1e9)
    return f"{seconds:.1f}s to {when(end)[11:]}"


def _checks(checks: list[router_pb2.ReleaseCheck]) -> str:
    return output.table(
        ["CHECK", "RESULT", "DETAIL"],
        [[c.name, "pass" if c.passed else "FAIL", " ".join(c.detail.split())] for c in checks],
    )


def format_release(release: router_pb2.Release) -> str:
    plan = release.plan
    facts = [
        ("release", release.id),
        ("unit", unit_label(release.unit)),
        ("versions", f"stable {release.stable_version}, candidate {release.candidate_version}"),
        ("state", _stage(release)),
        ("weight", f"{release.weight}% of live traffic on the candidate"),
        (
            "plan",
            f"{_plan_name(plan.kind)}: steps {','.join(str(s) for s in plan.steps)} every "
            f"{plan.interval_seconds:g}s, threshold {plan.threshold}, min {plan.min_requests} "
            f"requests, monitor {plan.monitor_seconds:g}s",
        ),
        ("failed", f"{release.failed_checks} of {plan.threshold} analyses"),
        ("started", f"{when(release.started_at)} by {release.started_by or '-'}"),
    ]
    if release.state in ACTIVE:
        facts.append(("next check", when(release.next_check_at)))
        facts.append(("analyzer", release.analyzer or "(none yet)"))
    if release.HasField("monitor_until"):
        facts.append(("monitoring", f"until {when(release.monitor_until)}"))
    if release.HasField("finished_at"):
        facts.append(("finished", when(release.finished_at)))
    if release.reason:
        facts.append(("reason", release.reason))
    parts = ["\n".join(f"{k:<11} {v}" for k, v in facts)]
    if release.gates:
        parts.append("gates\n" + _checks(list(release.gates)))
    if release.HasField("last_analysis"):
        last = release.last_analysis
        head = (
            f"last analysis {when(last.at)} at {last.weight}% ({_state(last.state)}): "
            f"{last.outcome}" + (f" -> {last.decision}" if last.decision else "")
        )
        parts.append(head + "\n" + _checks(list(last.checks)))
        if last.figures:
            parts.append(_figures(last))
    if release.events:
        lines = [
            f"{when(e.at)[11:]}  {e.action:<8} {e.actor:<12} {' '.join(e.detail.split())}"
            for e in release.events[-15:]
        ]
        parts.append("history\n" + "\n".join(lines))
    return "\n\n".join(parts)


# -- commands ---------------------------------------------------------------------------------


def cmd_start(conn: Connection, args: argparse.Namespace) -> str:
    name = getattr(args, "name", "")
    reply = conn.gateway.StartRelease(
        gateway_pb2.StartReleaseRequest(
            unit=router_pb2.ReleaseUnit(kind=KINDS[args.kind], name=name),
            candidate_version=args.candidate,
            plan=plan_from(args),
            allow_breaking=getattr(args, "allow_breaking", False),
            examples_json=_examples(getattr(args, "examples", "")),
            shared=getattr(args, "shared", False),
            reason=args.reason,
        ),
        metadata=bearer(conn, args),
        timeout=args.timeout,
    )
    if args.json:
        return output.as_json(reply)
    release = reply.release
    return (
        f"release {release.id} started: {unit_label(release.unit)} {release.candidate_version} "
        f"({_stage(release)}, {release.weight}%)\n\n" + format_release(release)
    )


def _status_once(conn: Connection, args: argparse.Namespace) -> tuple[str, bool]:
    """The status text and whether anything is still in progress."""
    if args.id:
        reply = conn.gateway.GetRelease(
            gateway_pb2.GetReleaseRequest(id=args.id),
            metadata=bearer(conn, args),
            timeout=args.timeout,
        )
        text = output.as_json(reply) if args.json else format_release(reply.release)
        return text, reply.release.state in ACTIVE
    listed = conn.gateway.ListReleases(
        gateway_pb2.ListReleasesRequest(active_only=True),
        metadata=bearer(conn, args),
        timeout=args.timeout,
    )
    if args.json:
        return output.as_json(listed), bool(listed.releases)
    if not listed.releases:
        return "(no release in progress)", False
    details = []
    for release in listed.releases:
        reply = conn.gateway.GetRelease(
            gateway_pb2.GetReleaseRequest(id=release.id),
            metadata=bearer(conn, args),
            timeout=args.timeout,
        )
        details.append(format_release(reply.release))
    return "\n\n" + ("\n\n" + "-" * 72 + "\n\n").join(details), True


def cmd_status(conn: Connection, args: argparse.Namespace) -> str:
    text, running = _status_once(conn, args)
    if not args.watch:
        return text
    while True:
        print(text, flush=True)
        if not running:
            return ""
        time.sleep(args.every)
        print(f"\n{'=' * 72}\n", flush=True)
        text, running = _status_once(conn, args)


def cmd_control(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.gateway.ControlRelease(
        gateway_pb2.ControlReleaseRequest(
            id=args.id, action=CONTROLS[args.release_command], reason=args.reason
        ),
        metadata=bearer(conn, args),
        timeout=args.timeout,
    )
    if args.json:
        return output.as_json(reply)
    release = reply.release
    return (
        f"release {release.id}: {_stage(release)}, candidate {release.candidate_version} at "
        f"{release.weight}%"
    )


def cmd_history(conn: Connection, args: argparse.Namespace) -> str:
    request = gateway_pb2.ListReleasesRequest(limit=args.limit)
    if args.unit:
        request.unit.CopyFrom(unit_from(args.unit))
    reply = conn.gateway.ListReleases(
        request,
        metadata=bearer(conn, args),
        timeout=args.timeout,
    )
    return output.as_json(reply) if args.json else format_list(list(reply.releases))


def _plan_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--candidate", required=True, help="the version to release")
    parser.add_argument(
        "--plan",
        choices=sorted(PLANS),
        default="",
        help="default: shadow-then-canary where shadowing is possible (read-only tools, "
        "routing), else canary-only; immediate promotes at once after the gates",
    )
    parser.add_argument(
        "--steps", type=steps, default=None, help="canary weights, e.g. 5,25,50,100"
    )
    parser.add_argument(
        "--interval", type=duration, default=None, help="between analyses (default 30s)"
    )
    parser.add_argument(
        "--threshold",
        type=non_negative_int,
        default=None,
        help="failed analyses before rollback (default 2)",
    )
    parser.add_argument(
        "--shadow-share", type=float, default=None, help="share of calls copied (default 0.5)"
    )
    parser.add_argument(
        "--shadow-intervals",
        type=non_negative_int,
        default=None,
        help="passed shadow analyses before the canary (default 2)",
    )
    parser.add_argument(
        "--monitor",
        type=duration,
        default=None,
        help="watch the SLO after promotion (default 10m; 0 to skip)",
    )
    parser.add_argument(
        "--min-requests",
        type=non_negative_int,
        default=None,
        help="samples an analysis needs (default 20)",
    )
    parser.add_argument("--reason", default="", help="why (recorded and audited)")


def add_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    release = sub.add_parser("release", help="release a tool, routing rules or prompt version")
    rsub = release.add_subparsers(dest="release_command", required=True, metavar="ACTION")

    start = rsub.add_parser("start", help="gates, then shadow and canary (admin)")
    ssub = start.add_subparsers(dest="kind", required=True, metavar="UNIT")
    tool = ssub.add_parser("tool", parents=[common], help="a tool version")
    tool.add_argument("name", help="calculator, or <backend>.<tool>")
    _plan_flags(tool)
    tool.add_argument(
        "--allow-breaking",
        action="store_true",
        help="accept a breaking contract change (it also needs a new major version)",
    )
    tool.add_argument(
        "--examples",
        default="",
        help="JSON file of examples the candidate must pass (backend tools)",
    )
    tool.set_defaults(handler=cmd_start)
    routing = ssub.add_parser("routing", parents=[common], help="a routing rules version")
    _plan_flags(routing)
    routing.set_defaults(handler=cmd_start)
    prompt = ssub.add_parser("prompt", parents=[common], help="a prompt version (canary only)")
    prompt.add_argument("name", help="route-system or answer")
    _plan_flags(prompt)
    prompt.add_argument(
        "--shared", action="store_true", help="the platform selection (platform:admin)"
    )
    prompt.set_defaults(handler=cmd_start)

    status = rsub.add_parser(
        "status", parents=[common], help="stage, weight and the figures of each check (ops:read)"
    )
    status.add_argument("id", nargs="?", default="", help="default: every release in progress")
    status.add_argument("--watch", action="store_true", help="refresh until it is over")
    status.add_argument("--every", type=duration, default=1.0, help="refresh period (default 1s)")
    status.set_defaults(handler=cmd_status)

    for action, text in (
        ("promote", "make the candidate stable now (monitoring follows)"),
        ("pause", "stop the analysis; the candidate keeps its weight"),
        ("resume", "resume the analysis"),
        ("abort", "roll back now: all traffic to the stable version"),
    ):
        control = rsub.add_parser(action, parents=[common], help=f"{text} (admin)")
        control.add_argument("id")
        control.add_argument(
            "--reason", default="", required=action == "abort", help="why (audited)"
        )
        control.set_defaults(handler=cmd_control)

    history = rsub.add_parser("history", parents=[common], help="past releases (ops:read)")
    history.add_argument("--unit", default="", help="tool:NAME, routing or prompt:NAME")
    history.add_argument("--limit", type=non_negative_int, default=50)
    history.set_defaults(handler=cmd_history)
