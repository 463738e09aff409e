"""Write the multi-replica proof's figures into docs/scaling.md (between markers)."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

BEGIN = "<!-- scale:begin -->"
END = "<!-- scale:end -->"


def main(results: Path, doc: Path) -> None:
    figures = json.loads(results.read_text())
    replicas = ", ".join(f"{n} x {name}" for name, n in figures["replicas"].items())
    rows = [
        ("replicas", replicas + " (one PostgreSQL database, mTLS)"),
        ("clients", f"{figures['workers']} closed-loop sessions over both gateways"),
        ("duration", f"{figures['seconds']} s; one replica of each service SIGKILLed at 2 s"),
        ("acknowledged Runs", figures["acknowledged"]),
        ("errors seen by clients", figures["errors"] or "none"),
        ("throughput", f"{figures['rps']} Run/s"),
        ("latency p50 / p99", f"{figures['p50_ms']} / {figures['p99_ms']} ms"),
        ("acknowledged turns lost", figures["lost"]),
        ("turns stored twice", figures["doubled"]),
        ("sessions out of order", figures["sessions_out_of_order"]),
    ]
    for key in ("budget_granted", "budget_refused", "audit_chain"):
        if key in figures:
            rows.append((key.replace("_", " "), figures[key]))
    block = "\n".join(
        [
            BEGIN,
            f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `make scale-test` on a 2-core "
            "machine that runs all ten processes, the clients and PostgreSQL.",
            "",
            "| | |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in rows),
            END,
        ]
    )
    text = doc.read_text() if doc.exists() else "# Scaling\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n## Multi-replica proof\n\n" + block + "\n"
    doc.write_text(text)
    print(f"wrote {doc}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
