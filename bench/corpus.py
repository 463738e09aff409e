"""The routing corpus: prompts with the outcome each must have, run through a real router.

Each case in ``routing_corpus.jsonl`` names a category, a prompt and what must happen: an
exact answer (and optionally part of ``result_json``), ``no_match`` or ``refused`` (the tool
declined the arguments, which the gateway shows as "The tool X refused the arguments").
The runner starts the real router in-process on port 0 (published tools, packaged rules, a
fresh SQLite database, a fixed clock so time answers are exact), then for every prompt calls
Route and, when a tool matched, InvokeTool exactly as the gateway does (an idempotency key
for write tools, the session of the case). Cases that share a session run in file order.

A wrong answer is an answer that is not the expected one, including any answer where none
was expected. Precision is correct answers over answers given; coverage is correct answers
over the cases that expect one. Used by tests/unit/router/test_router_corpus.py (every case
must hold, wrong answers 0) and by ``make bench`` (the "Routing corpus" section).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from services.kit.channels import open_channel
from services.kit.server import Cleanup, start
from services.router.app import build
from services.router.settings import RouterSettings
from toolmesh.common.v1 import common_pb2
from toolmesh.router.v1 import router_pb2, router_pb2_grpc

CORPUS = Path(__file__).with_name("routing_corpus.jsonl")
# The wall clock the tools see: a Thursday in January (northern winter, southern summer).
CLOCK = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
CALLER = common_pb2.Caller(subject="corpus", tenant="corpus", scopes=["tools:read", "tools:write"])
EXPECTATIONS = ("answer", "no_match", "refused")
_REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}


@dataclass(frozen=True)
class Case:
    category: str
    prompt: str
    expect: str
    answer: str = ""
    tool: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    session: str = ""
    comment: str = ""
    # A person asking this wants an answer that the tools or rules cannot give yet (number
    # words, UTC offsets, two questions at once): declined today, counted against coverage
    # of what people ask for.
    wanted: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Case:
        case = cls(**data)
        if case.expect not in EXPECTATIONS:
            raise ValueError(f"{case.prompt!r}: expect must be one of {EXPECTATIONS}")
        if (case.expect == "answer") != bool(case.answer):
            raise ValueError(f"{case.prompt!r}: an answer is given exactly when one is expected")
        if case.wanted and case.expect == "answer":
            raise ValueError(f"{case.prompt!r}: wanted marks a declined prompt")
        return case


@dataclass(frozen=True)
class Outcome:
    case: Case
    # answer, no_match, refused, or failed (any other error: never expected).
    kind: str
    tool: str = ""
    answer: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    detail: str = ""

    @property
    def correct(self) -> bool:
        case = self.case
        if self.kind != case.expect or (case.tool and self.tool != case.tool):
            return False
        if self.kind != "answer":
            return True
        return self.answer == case.answer and all(
            self.result.get(k) == v for k, v in case.result.items()
        )

    @property
    def wrong(self) -> bool:
        """An answer given that is not the expected answer."""
        return self.kind == "answer" and not self.correct


def load_corpus(path: Path = CORPUS) -> list[Case]:
    cases = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                cases.append(Case.from_json(json.loads(line)))
            except (ValueError, TypeError) as error:
                raise ValueError(f"{path.name}:{number}: {error}") from None
    return cases


@asynccontextmanager
async def corpus_router(data_dir: Path) -> AsyncIterator[router_pb2_grpc.RouterStub]:
    """The real router in-process on port 0, with the published tools and rules."""
    settings = RouterSettings(
        port=0, data_dir=data_dir, telemetry_target="127.0.0.1:9", otlp_endpoint=""
    )
    cleanups: list[Cleanup] = []
    running = await start(settings, build(settings, cleanups, clock=lambda: CLOCK))
    running.cleanups.extend(cleanups)
    channel = open_channel(f"127.0.0.1:{running.port}")
    try:
        yield router_pb2_grpc.RouterStub(channel)
    finally:
        await channel.close()
        await running.stop(0)


async def run_case(stub: router_pb2_grpc.RouterStub, case: Case, number: int) -> Outcome:
    """Route, then InvokeTool as the gateway does."""
    request_id = f"corpus-{number}"
    route = await stub.Route(
        router_pb2.RouteRequest(
            caller=CALLER, request_id=request_id, prompt=case.prompt, allowed_tools=["*"]
        ),
        timeout=10,
    )
    if not route.matched:
        return Outcome(case, "no_match", detail=route.reason)
    tool = route.tool
    write = tool.side_effect != router_pb2.SIDE_EFFECT_READ_ONLY
    try:
        reply = await stub.InvokeTool(
            router_pb2.InvokeToolRequest(
                caller=CALLER,
                request_id=request_id,
                session_id=case.session or f"corpus-session-{number}",
                tool_name=tool.name,
                tool_version=tool.version,
                arguments_json=route.arguments_json,
                idempotency_key=request_id if write else "",
                allowed_tools=["*"],
            ),
            timeout=10,
        )
    except aio.AioRpcError as error:
        kind = "refused" if error.code() in _REFUSALS else "failed"
        return Outcome(case, kind, tool=tool.name, detail=error.details() or "")
    return Outcome(
        case, "answer", tool=tool.name, answer=reply.answer, result=json.loads(reply.result_json)
    )


async def run_corpus(stub: router_pb2_grpc.RouterStub, cases: Iterable[Case]) -> list[Outcome]:
    return [await run_case(stub, case, number) for number, case in enumerate(cases, start=1)]


async def measure(cases: list[Case] | None = None) -> list[Outcome]:
    with tempfile.TemporaryDirectory(prefix="toolmesh-corpus-") as tmp:
        async with corpus_router(Path(tmp)) as stub:
            return await run_corpus(stub, load_corpus() if cases is None else cases)


@dataclass
class Tally:
    prompts: int = 0
    answered: int = 0
    correct_answers: int = 0
    expected_answers: int = 0
    wanted: int = 0
    no_match: int = 0
    refused: int = 0
    failed: int = 0
    wrong: int = 0
    mismatched: int = 0

    def add(self, outcome: Outcome) -> None:
        self.prompts += 1
        self.expected_answers += outcome.case.expect == "answer"
        self.wanted += outcome.case.expect == "answer" or outcome.case.wanted
        self.answered += outcome.kind == "answer"
        self.correct_answers += outcome.kind == "answer" and outcome.correct
        self.no_match += outcome.kind == "no_match"
        self.refused += outcome.kind == "refused"
        self.failed += outcome.kind == "failed"
        self.wrong += outcome.wrong
        self.mismatched += not outcome.correct

    @property
    def precision(self) -> float:
        return self.correct_answers / self.answered if self.answered else 1.0

    @property
    def coverage(self) -> float:
        return self.correct_answers / self.expected_answers if self.expected_answers else 1.0

    @property
    def asked_coverage(self) -> float:
        """Correct answers over every prompt a person wants answered."""
        return self.correct_answers / self.wanted if self.wanted else 1.0


def tally(outcomes: Iterable[Outcome]) -> tuple[Tally, dict[str, Tally]]:
    total, by_category = Tally(), dict[str, Tally]()
    for outcome in outcomes:
        total.add(outcome)
        by_category.setdefault(outcome.case.category, Tally()).add(outcome)
    return total, dict(sorted(by_category.items()))


def _row(name: str, t: Tally) -> str:
    coverage = f"{t.coverage:.0%}" if t.expected_answers else "-"
    asked = f"{t.asked_coverage:.0%}" if t.wanted else "-"
    precision = f"{t.precision:.0%}" if t.answered else "-"
    return (
        f"| {name} | {t.prompts} | {t.answered} | {t.no_match} | {t.refused} | {t.wrong} "
        f"| {precision} | {coverage} | {asked} | {t.mismatched} |"
    )


def markdown(outcomes: list[Outcome]) -> str:
    """The "Routing corpus" section of BENCHMARKS.md."""
    total, by_category = tally(outcomes)
    lines = [
        "## Routing corpus",
        "",
        f"`bench/routing_corpus.jsonl`: {total.prompts} prompts with the outcome each must have, "
        "run through the real router (Route, then InvokeTool as the gateway does). "
        "Precision = correct answers / answers given; coverage = correct answers / prompts "
        "that expect an answer; a wrong answer is any answer that is not the expected one. "
        "Some prompts are declined by design although a person wants an answer (number "
        "words, UTC offsets, two questions at once: the `wanted` cases); `asked-for coverage` "
        "counts them too. `other` counts prompts whose outcome differs from the expected one "
        "without being a wrong answer (a refusal or no-match where an answer was expected).",
        "",
        "| category | prompts | answered | no match | refused | wrong | precision | coverage "
        "| asked-for coverage | other |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(_row(name, t) for name, t in by_category.items()),
        _row("**all**", total),
        "",
    ]
    kinds = Counter(o.kind for o in outcomes)
    if kinds["failed"]:
        lines += [f"{kinds['failed']} prompts failed with an error other than a refusal.", ""]
    return "\n".join(lines)


def section() -> str:
    """Run the corpus against a fresh router and return the BENCHMARKS.md section."""
    return markdown(asyncio.run(measure()))


def main() -> None:
    outcomes = asyncio.run(measure())
    for outcome in outcomes:
        if not outcome.correct:
            case = outcome.case
            got = outcome.answer or outcome.detail
            print(f"[{case.category}] {case.prompt!r}: expected {case.expect}, got {outcome.kind}")
            print(f"    expected {case.answer!r}\n    got      {got!r}")
    print(markdown(outcomes))


if __name__ == "__main__":
    main()
