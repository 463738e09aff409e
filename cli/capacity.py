"""``toolmesh capacity``: replicas per service from W = ceil(Q * L / U).

Q is the request rate to absorb (requests per second), U the target utilization of a worker
(0 < U <= 1) and L the time one request occupies a worker, in seconds: each service's measured
mean latency from telemetry (``GetStats`` by service over ``--window``, mean_ms / 1000), or
``--latency`` for every service. One replica is one worker: each toolmesh replica is one
single-threaded asyncio process, so the replica count is W.

The maths is exact: Q, U and L are read from their decimal text as fractions, so the worked
example Q=20, L=0.3, U=0.6 gives exactly 10, and a whole W is never pushed to the next integer
by rounding (3 * 0.1 / 0.1 in floating point is 3.0000000000000004, whose ceiling is 4).

``--emit-hpa DIR`` writes, per service, ``DIR/<service>/hpa-min-replicas.yaml``: a strategic
merge patch of that service's HorizontalPodAutoscaler setting ``minReplicas`` to W. Point DIR
at ``deploy/k8s/overlays/prod`` and add to each overlay's kustomization.yaml, after its own
HPA patch (later patches win)::

    patches:
      - path: hpa-min-replicas.yaml
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from cli import output
from cli.main import CliError, Connection, bearer
from toolmesh.gateway.v1 import gateway_pb2
from toolmesh.telemetry.v1 import telemetry_pb2

SERVICES = ("gateway", "auth", "router", "memory", "telemetry")
PATCH_FILE = "hpa-min-replicas.yaml"
FOOTNOTE = (
    "W = ceil(Q * L / U). One replica = one worker: each replica is one single-threaded "
    "asyncio process, so REPLICAS = W."
)


def workers(rps: Fraction, latency_s: Fraction, utilization: Fraction) -> int:
    """W = ceil(Q * L / U), exactly: the worked example workers(20, 0.3, 0.6) is 10."""
    if rps < 0 or latency_s < 0 or not 0 < utilization <= 1:
        raise ValueError("Q >= 0, L >= 0 and 0 < U <= 1")
    return math.ceil(rps * latency_s / utilization)


def decimal(text: str) -> Fraction:
    """A decimal string as an exact fraction ("0.3" is 3/10, not the float nearest it)."""
    try:
        value = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a decimal number: {text!r}") from None
    return value


def positive(text: str) -> Fraction:
    value = decimal(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def utilization(text: str) -> Fraction:
    value = decimal(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError("between 0 (exclusive) and 1, e.g. 0.6")
    return value


def ms_to_seconds(mean_ms: float) -> Fraction:
    """A measured mean in ms (a double) as seconds, through its shortest decimal text."""
    return Fraction(repr(mean_ms)) / 1000


@dataclass(frozen=True)
class Estimate:
    service: str
    latency_s: Fraction | None
    source: str
    workers: int | None
    count: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "service": self.service,
            "latency_seconds": None if self.latency_s is None else float(self.latency_s),
            "latency_source": self.source,
            "samples": self.count,
            "workers": self.workers,
            "replicas": self.workers,
        }


def estimates(
    rps: Fraction,
    util: Fraction,
    given_latency: Fraction | None,
    measured: dict[str, tuple[Fraction, int]],
) -> list[Estimate]:
    """Per service; a service without a given or measured latency gets no estimate."""
    found = []
    names = list(SERVICES) + sorted(set(measured) - set(SERVICES))
    for name in names:
        if given_latency is not None:
            found.append(Estimate(name, given_latency, "given", workers(rps, given_latency, util)))
        elif name in measured:
            latency, count = measured[name]
            found.append(Estimate(name, latency, "measured", workers(rps, latency, util), count))
        else:
            found.append(Estimate(name, None, "no spans in the window", None))
    return found


def measure(conn: Connection, args: argparse.Namespace) -> dict[str, tuple[Fraction, int]]:
    reply = conn.gateway.GetStats(
        gateway_pb2.GetStatsRequest(
            group_by=telemetry_pb2.STATS_GROUP_BY_SERVICE, window_seconds=args.window
        ),
        metadata=bearer(conn, args),
        timeout=args.timeout,
    )
    return {
        row.service.removeprefix("toolmesh-"): (ms_to_seconds(row.mean_ms), row.count)
        for row in reply.rows
        if row.count
    }


def _fraction_text(value: Fraction) -> str:
    """Exact decimal text when there is one short enough, else 6 significant digits."""
    as_float = float(value)
    text = f"{as_float:.9g}"
    return text if Fraction(text) == value else f"{as_float:.6g}"


def hpa_patch(service: str, estimate: Estimate, rps: Fraction, util: Fraction) -> str:
    assert estimate.latency_s is not None and estimate.workers is not None
    q, latency, u = _fraction_text(rps), _fraction_text(estimate.latency_s), _fraction_text(util)
    return (
        f"# Written by `toolmesh capacity`: W = ceil(Q * L / U) = ceil({q} * {latency} / {u})"
        f" = {estimate.workers}\n"
        f"# (L {estimate.source}; one replica = one worker, a single-threaded asyncio process).\n"
        "# Include it in the overlay's kustomization.yaml after its own HPA patch:\n"
        "#   patches:\n"
        f"#     - path: {PATCH_FILE}\n"
        "# and keep the HPA's maxReplicas at or above minReplicas.\n"
        "apiVersion: autoscaling/v2\n"
        "kind: HorizontalPodAutoscaler\n"
        "metadata:\n"
        f"  name: {service}\n"
        "  namespace: toolmesh\n"
        "spec:\n"
        f"  minReplicas: {estimate.workers}\n"
    )


def emit_hpa(directory: Path, found: list[Estimate], rps: Fraction, util: Fraction) -> list[Path]:
    written = []
    for estimate in found:
        if estimate.workers is None or estimate.service not in SERVICES:
            continue
        path = directory / estimate.service / PATCH_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(hpa_patch(estimate.service, estimate, rps, util))
        written.append(path)
    return written


def format_estimates(found: list[Estimate], rps: Fraction, util: Fraction) -> str:
    rows = [
        [
            e.service,
            "-" if e.latency_s is None else f"{float(e.latency_s):.6g}",
            e.source if e.source != "measured" else f"measured ({e.count} spans)",
            "-" if e.workers is None else str(e.workers),
            "-" if e.workers is None else str(e.workers),
        ]
        for e in found
    ]
    table = output.table(["SERVICE", "L (S)", "L FROM", "W", "REPLICAS"], rows)
    head = f"Q = {_fraction_text(rps)} req/s, U = {_fraction_text(util)}"
    note = FOOTNOTE
    if any(e.workers is None for e in found):
        note += " A service without spans in the window needs --latency (or traffic)."
    return f"{head}\n{table}\n\n{note}"


def cmd_capacity(conn: Connection, args: argparse.Namespace) -> str:
    measured = {} if args.latency is not None else measure(conn, args)
    found = estimates(args.rps, args.utilization, args.latency, measured)
    if not any(e.workers is not None for e in found):
        raise CliError(
            f"no spans in the last {args.window}s to measure latency from; pass --latency",
            "FAILED_PRECONDITION",
        )
    written = (
        emit_hpa(Path(args.emit_hpa), found, args.rps, args.utilization) if args.emit_hpa else []
    )
    if args.json:
        return json.dumps(
            {
                "rps": float(args.rps),
                "utilization": float(args.utilization),
                "window_seconds": args.window,
                "services": [e.as_dict() for e in found],
                "hpa_patches": [str(p) for p in written],
                "note": FOOTNOTE,
            },
            indent=2,
        )
    text = format_estimates(found, args.rps, args.utilization)
    if written:
        text += "\n\nwrote " + ", ".join(str(p) for p in written)
    return text


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    capacity = sub.add_parser(
        "capacity",
        parents=[common],
        help="replicas per service: W = ceil(Q * L / U)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    capacity.add_argument("--rps", type=positive, required=True, help="Q, requests per second")
    capacity.add_argument(
        "--utilization", type=utilization, required=True, help="U, target utilization, e.g. 0.6"
    )
    capacity.add_argument(
        "--latency",
        type=positive,
        default=None,
        help="L in seconds for every service (default: each service's measured mean)",
    )
    capacity.add_argument(
        "--window", type=int, default=3600, help="seconds of spans to measure L over (3600)"
    )
    capacity.add_argument(
        "--emit-hpa",
        default="",
        metavar="DIR",
        help=f"write DIR/<service>/{PATCH_FILE} setting the HPA's minReplicas to W",
    )
    capacity.set_defaults(handler=cmd_capacity)
