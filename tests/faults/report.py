"""Turn the fault suite's results into the table in docs/reliability.md (between markers)."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

BEGIN = "<!-- faults:begin -->"
END = "<!-- faults:end -->"
COLUMNS = (
    ("scenario", "scenario"),
    ("requests", "requests"),
    ("answered", "answered"),
    ("degraded", "degraded"),
    ("refused", "refused"),
    ("failed", "failed"),
    ("p99_ms", "p99 ms"),
    ("deadline_ms", "deadline ms"),
    ("overruns", "over deadline+50ms"),
    ("breaker_transitions", "breaker transitions"),
    ("acknowledged", "acknowledged"),
    ("lost", "turns lost"),
    ("doubled", "turns stored twice"),
    ("usage_lost", "usage lost"),
    ("usage_doubled", "usage stored twice"),
    ("audit_chain", "audit chain"),
)

# The figures of the scenarios that check a hung dependency and the order after replay.
REPLAY_COLUMNS = (
    ("scenario", "scenario"),
    ("worst_share", "worst Run's share of its deadline"),
    ("starved", "healthy hops starved (router/tool fallbacks)"),
    ("via_outbox", "Runs acknowledged via the outbox"),
    ("out_of_order", "stored turns out of acknowledgment order"),
    ("replay_start_s", "replay start after recovery, s"),
    ("replay_done_s", "last replayed turn stored after recovery, s"),
)


def table(rows: list[dict[str, object]], columns: tuple[tuple[str, str], ...] = COLUMNS) -> str:
    lines = [
        "| " + " | ".join(title for _, title in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += [
        "| " + " | ".join(str(row.get(key, "-")) for key, _ in columns) + " |" for row in rows
    ]
    return "\n".join(lines)


def main(results: Path, doc: Path) -> None:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    block = "\n".join(
        [
            BEGIN,
            f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `make faults` on this 2-core "
            "machine: five real processes with mTLS, SQLite, 4 closed-loop clients "
            "(16 in the burst) for 10 s per scenario; the fault at 1 s, recovery 2.5 s later.",
            "",
            table(rows),
            "",
            "Hung dependency and order after replay (issue 10): the worst Run's latency over its "
            "deadline, Runs answered with a healthy hop's fallback, each session's stored order, "
            "and when the outbox's turns reached memory after it recovered (memory's stored "
            "times of the turns only the replay could bring, and of the last one).",
            "",
            table([row for row in rows if "replay_start_s" in row], REPLAY_COLUMNS),
            END,
        ]
    )
    text = doc.read_text() if doc.exists() else "# Reliability\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n## Fault suite results\n\n" + block + "\n"
    doc.write_text(text)
    print(f"wrote {len(rows)} rows to {doc}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
