"""Operator commands: ``trace``, ``cost``, ``budget set|show``, ``audit list|verify``, ``slo``.

Each maps to one gateway RPC (scoped by the gateway to the caller's tenant; ``ops:read``, and
``admin`` for ``budget set``). Tables by default, the reply as JSON with ``--json``.
``audit verify`` exits non-zero when the chain is broken, naming the event and the tampering.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from google.protobuf.timestamp_pb2 import Timestamp

from cli import output
from cli.main import CliError, Connection, bearer
from toolmesh.gateway.v1 import gateway_pb2
from toolmesh.telemetry.v1 import telemetry_pb2

MICROS = Decimal(1_000_000)
COST_GROUP_BY = {
    "tenant": telemetry_pb2.COST_GROUP_BY_TENANT,
    "principal": telemetry_pb2.COST_GROUP_BY_PRINCIPAL,
    "tool": telemetry_pb2.COST_GROUP_BY_TOOL,
    "day": telemetry_pb2.COST_GROUP_BY_DAY,
    "model": telemetry_pb2.COST_GROUP_BY_MODEL,
}
PERIODS = {"day": telemetry_pb2.BUDGET_PERIOD_DAY, "month": telemetry_pb2.BUDGET_PERIOD_MONTH}
# Every kind verify can report, from the enum itself, so a new kind is never "UNKNOWN".
PROBLEM_KINDS = {
    number: name.removeprefix("AUDIT_PROBLEM_KIND_")
    for name, number in telemetry_pb2.AuditProblemKind.items()
    if number != telemetry_pb2.AUDIT_PROBLEM_KIND_UNSPECIFIED
}
SLI_KINDS = {
    telemetry_pb2.SLI_KIND_AVAILABILITY: "availability",
    telemetry_pb2.SLI_KIND_LATENCY: "latency",
}
SEVERITIES = {
    telemetry_pb2.BURN_ALERT_SEVERITY_PAGE: "PAGE",
    telemetry_pb2.BURN_ALERT_SEVERITY_TICKET: "TICKET",
}


class AuditBroken(CliError):
    """The audit chain failed verification (exit status 1, after the report is printed)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "DATA_LOSS")


# -- parsing helpers ------------------------------------------------------------------------


def group_by_list(text: str) -> list[str]:
    """``tenant,principal`` -> ["tenant", "principal"]; unknown or repeated keys are refused."""
    keys = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [key for key in keys if key not in COST_GROUP_BY]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown key {unknown[0]!r}; choose from {','.join(COST_GROUP_BY)}"
        )
    if len(set(keys)) != len(keys):
        raise argparse.ArgumentTypeError("each key at most once")
    return keys


def cost_micros(text: str) -> int:
    """Currency units as a decimal string -> integer micros: "0.25" -> 250000, exactly."""
    try:
        amount = Decimal(text.strip())
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a decimal amount: {text!r}") from None
    if not amount.is_finite() or amount < 0:
        raise argparse.ArgumentTypeError("a non-negative amount, e.g. 0.25")
    micros = amount * MICROS
    if micros != micros.to_integral_value():
        raise argparse.ArgumentTypeError("at most 6 decimal places (micros)")
    return int(micros)


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


# -- formatting -----------------------------------------------------------------------------


def money(micros: int, currency: str = "") -> str:
    text = f"{Decimal(micros) / MICROS:.6f}"
    return f"{text} {currency}".rstrip()


def when(stamp: Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    moment = datetime.fromtimestamp(stamp.seconds, UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def short_service(name: str) -> str:
    return name.removeprefix("toolmesh-")


def format_trace(reply: gateway_pb2.GetTraceResponse) -> str:
    """The span tree: children indented under their parent, siblings by start time.

    A span whose parent is not stored (the caller's own span, or a dropped one) is a root.
    """
    spans = list(reply.spans)
    if not spans:
        return "(no spans)"
    ids = {span.span_id for span in spans}
    children: dict[str, list[telemetry_pb2.TraceSpan]] = defaultdict(list)
    roots = []
    for span in spans:
        if span.parent_span_id and span.parent_span_id in ids:
            children[span.parent_span_id].append(span)
        else:
            roots.append(span)

    def start(span: telemetry_pb2.TraceSpan) -> tuple[int, int, str]:
        return (span.start_time.seconds, span.start_time.nanos, span.span_id)

    rows: list[list[str]] = []

    def walk(span: telemetry_pb2.TraceSpan, depth: int) -> None:
        status = "ERROR" if span.error else "ok"
        if span.HasField("grpc_status_code") and span.grpc_status_code:
            status += f" (grpc {span.grpc_status_code})"
        kind = telemetry_pb2.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_").lower()
        rows.append(
            [
                "  " * depth + span.name,
                short_service(span.service),
                kind,
                f"{span.duration_ms:.1f}",
                status,
            ]
        )
        for child in sorted(children[span.span_id], key=start):
            walk(child, depth + 1)

    for root in sorted(roots, key=start):
        walk(root, 0)
    services = sorted({short_service(span.service) for span in spans})
    footer = f"\n{len(spans)} spans; services: {', '.join(services)}"
    return output.table(["SPAN", "SERVICE", "KIND", "MS", "STATUS"], rows) + footer


def format_cost(reply: gateway_pb2.GetCostResponse, keys: list[str]) -> str:
    window = f"window {when(reply.window_start)} .. {when(reply.window_end)}"
    if not reply.rows:
        return f"(no usage in this window)\n{window}"
    headers = [key.upper() for key in keys]
    fields = {
        "tenant": "tenant",
        "principal": "principal",
        "tool": "tool_name",
        "day": "day",
        "model": "model",
    }
    rows = [
        [
            *(getattr(row, fields[key]) or "-" for key in keys),
            str(row.requests),
            str(row.tokens_in),
            str(row.tokens_out),
            str(row.tool_calls),
            str(row.cost_units),
            money(row.cost_micros, row.currency),
        ]
        for row in reply.rows
    ]
    table = output.table(
        [*headers, "REQUESTS", "TOKENS IN", "TOKENS OUT", "TOOL CALLS", "COST UNITS", "COST"],
        rows,
    )
    return f"{table}\n{window}"


def _metric(limit: int, used: int, reserved: int, as_money: bool = False) -> str:
    def show(value: int) -> str:
        return money(value) if as_money else str(value)

    if limit == 0:
        return f"{show(used)} / no limit"
    held = f" (+{show(reserved)} held)" if reserved else ""
    return f"{show(used)} / {show(limit)}{held}"


def format_budgets(budgets: list[telemetry_pb2.BudgetStatus]) -> str:
    if not budgets:
        return "(no budgets)"
    rows = []
    for b in budgets:
        period = {v: k for k, v in PERIODS.items()}.get(b.period, "?")
        rows.append(
            [
                b.tenant,
                b.principal or "(whole tenant)",
                period,
                _metric(b.limits.tool_calls, b.used.tool_calls, b.reserved.tool_calls),
                _metric(b.limits.tokens, b.used.tokens, b.reserved.tokens),
                _metric(b.limits.cost_micros, b.used.cost_micros, b.reserved.cost_micros, True),
                when(b.resets_at),
            ]
        )
    return output.table(
        ["TENANT", "PRINCIPAL", "PERIOD", "TOOL CALLS", "TOKENS", "COST", "RESETS AT"], rows
    )


def format_audit(reply: gateway_pb2.ListAuditResponse) -> str:
    if not reply.events:
        return "(no audit events)"
    rows = [
        [
            str(stored.seq),
            when(stored.event.occurred_at),
            stored.event.actor,
            stored.event.action,
            stored.event.target,
            stored.event.outcome,
            stored.event.event_id,
        ]
        for stored in reply.events
    ]
    text = output.table(["SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME", "EVENT"], rows)
    if reply.next_page_token:
        text += f"\nmore: --page-token {reply.next_page_token}"
    return text


def describe_problem(problem: telemetry_pb2.AuditProblem) -> str:
    kind = PROBLEM_KINDS.get(problem.kind, "UNKNOWN")
    event = f" (event {problem.event_id})" if problem.event_id else ""
    return f"{kind} at seq {problem.seq}{event}: {problem.message}"


def format_verify(reply: gateway_pb2.VerifyAuditResponse) -> str:
    if reply.ok:
        text = (
            f"audit chain ok: {reply.events_checked} events checked; "
            f"head seq {reply.head_seq} hash {reply.head_hash[:16] or '-'}"
        )
    else:
        text = (
            f"audit chain BROKEN: {describe_problem(reply.problem)}\n"
            f"{reply.events_checked} events checked; recorded head seq {reply.head_seq}"
        )
    # Items a sender could not deliver are never silent: their notices are in the chain.
    if reply.dead_letter_notices:
        text += f"\ndead letters: {reply.dead_letter_notices} audit event(s) set aside by a sender"
    if reply.HasField("last_checkpoint"):
        text += f"\nlast signed checkpoint: seq {reply.last_checkpoint.seq}"
    return text


def _percent(value: float) -> str:
    return f"{value * 100:.2f}%"


def format_slo(reply: gateway_pb2.GetSloResponse) -> str:
    if not reply.objectives:
        return "(no objectives)"
    rows = []
    for objective in reply.objectives:
        what = objective.route or f"tool {objective.tool}"
        for sli in objective.slis:
            kind = SLI_KINDS.get(sli.kind, "?")
            if sli.kind == telemetry_pb2.SLI_KIND_LATENCY:
                kind += f" <={sli.latency_threshold_ms:g}ms"
            burns = {b.window_seconds: b.burn_rate for b in sli.burn_rates}
            firing = [SEVERITIES.get(a.severity, "?") for a in sli.alerts if a.firing]
            rows.append(
                [
                    objective.name,
                    f"{short_service(objective.service)} {what}",
                    kind,
                    _percent(sli.target),
                    f"{_percent(sli.sli)} of {sli.total}",
                    _percent(sli.error_budget_remaining),
                    *(f"{burns.get(w, 0.0):.1f}" for w in (300, 3600, 21600)),
                    ",".join(firing) or "-",
                ]
            )
    table = output.table(
        [
            "OBJECTIVE",
            "SCOPE",
            "SLI",
            "TARGET",
            "ACTUAL",
            "BUDGET LEFT",
            "BURN 5M",
            "BURN 1H",
            "BURN 6H",
            "FIRING",
        ],
        rows,
    )
    return f"{table}\nconfig version {reply.version}, evaluated {when(reply.evaluated_at)}"


# -- commands -------------------------------------------------------------------------------


def cmd_trace(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.gateway.GetTrace(
        gateway_pb2.GetTraceRequest(trace_id=args.trace_id),
        metadata=bearer(conn, args),
        timeout=args.timeout,
    )
    return output.as_json(reply) if args.json else format_trace(reply)


def cmd_cost(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.gateway.GetCost(
        gateway_pb2.GetCostRequest(days=args.days, group_by=[COST_GROUP_BY[k] for k in args.by]),
        metadata=bearer(conn, args),
        timeout=args.timeout,
    )
    return output.as_json(reply) if args.json else format_cost(reply, args.by)


def cmd_budget_set(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.gateway.SetBudget(
        gateway_pb2.SetBudgetRequest(
            principal=args.principal,
            period=PERIODS[args.period],
            limits=telemetry_pb2.BudgetAmounts(
                tool_calls=args.tool_calls, tokens=args.tokens, cost_micros=args.cost
            ),
        ),
        metadata=bearer(conn, args),
        timeout=args.timeout,
    )
    if args.json:
        return output.as_json(reply)
    if reply.removed:
        who = args.principal or "the whole tenant"
        return f"budget removed ({who}, per {args.period})"
    return format_budgets([reply.budget])


def cmd_budget_show(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.gateway.ListBudgets(
        gateway_pb2.ListBudgetsRequest(), metadata=bearer(conn, args), timeout=args.timeout
    )
    return output.as_json(reply) if args.json else format_budgets(list(reply.budgets))


def cmd_audit_list(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.gateway.ListAudit(
        gateway_pb2.ListAuditRequest(
            action=args.action, limit=args.limit, page_token=args.page_token
        ),
        metadata=bearer(conn, args),
        timeout=args.timeout,
    )
    return output.as_json(reply) if args.json else format_audit(reply)


def cmd_audit_verify(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.gateway.VerifyAudit(
        gateway_pb2.VerifyAuditRequest(), metadata=bearer(conn, args), timeout=args.timeout
    )
    text = output.as_json(reply) if args.json else format_verify(reply)
    if not reply.ok:
        # The report on stdout, then the verdict on stderr with a non-zero exit status.
        print(text)
        raise AuditBroken(f"audit chain broken: {describe_problem(reply.problem)}")
    return text


def cmd_slo(conn: Connection, args: argparse.Namespace) -> str:
    reply = conn.gateway.GetSlo(
        gateway_pb2.GetSloRequest(name=args.name), metadata=bearer(conn, args), timeout=args.timeout
    )
    return output.as_json(reply) if args.json else format_slo(reply)


def add_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    trace = sub.add_parser("trace", parents=[common], help="one request's span tree")
    trace.add_argument("trace_id", help="32 hexadecimal characters (RunResponse.trace_id)")
    trace.set_defaults(handler=cmd_trace)

    cost = sub.add_parser("cost", parents=[common], help="usage and cost, grouped")
    cost.add_argument("--days", type=non_negative_int, default=0, help="last N days (0: 30)")
    cost.add_argument(
        "--by",
        type=group_by_list,
        default=[],
        help="comma list of tenant,principal,tool,day,model (default: one total row)",
    )
    cost.set_defaults(handler=cmd_cost)

    budget = sub.add_parser("budget", help="budgets of your tenant")
    bsub = budget.add_subparsers(dest="budget_command", required=True, metavar="ACTION")
    bset = bsub.add_parser(
        "set",
        parents=[common],
        help="set a budget (admin); all limits 0 removes it",
        description="Sets a budget of the caller's tenant (the token's), or of one principal "
        "in it. A limit of 0 means no limit on that metric; all 0 removes the budget.",
    )
    bset.add_argument("--principal", default="", help="subject (default: the whole tenant)")
    bset.add_argument("--period", choices=sorted(PERIODS), required=True)
    bset.add_argument("--tool-calls", type=non_negative_int, default=0)
    bset.add_argument("--tokens", type=non_negative_int, default=0, help="input + output")
    bset.add_argument(
        "--cost", type=cost_micros, default=0, help="currency units, e.g. 0.25 (= 250000 micros)"
    )
    bset.set_defaults(handler=cmd_budget_set)
    bshow = bsub.add_parser("show", parents=[common], help="budgets and where they stand")
    bshow.set_defaults(handler=cmd_budget_show)

    audit = sub.add_parser("audit", help="the tenant's audit trail")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    alist = asub.add_parser("list", parents=[common], help="events by seq")
    alist.add_argument("--action", default="", help="only this action, e.g. token.issue")
    alist.add_argument("--limit", type=non_negative_int, default=0, help="1..1000 (0: 100)")
    alist.add_argument("--page-token", default="", help="from the previous page")
    alist.set_defaults(handler=cmd_audit_list)
    averify = asub.add_parser(
        "verify", parents=[common], help="check the hash chain; exit 1 when broken"
    )
    averify.set_defaults(handler=cmd_audit_verify)

    slo = sub.add_parser("slo", parents=[common], help="objectives, error budgets, burn alerts")
    slo.add_argument("--name", default="", help="only this objective")
    slo.set_defaults(handler=cmd_slo)
