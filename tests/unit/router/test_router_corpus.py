"""The routing corpus through a real router: never a wrong answer, every outcome as expected."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from bench.corpus import corpus_router, load_corpus, run_corpus, tally


def test_the_corpus_is_large_and_covers_every_category() -> None:
    cases = load_corpus()
    assert len(cases) >= 300
    categories = Counter(case.category for case in cases)
    assert set(categories) == {
        "arithmetic",
        "units",
        "time_zones",
        "notes",
        "negations",
        "multi_part",
        "near_miss",
    }
    expectations = Counter(case.expect for case in cases)
    assert min(expectations.values()) >= 40, expectations


async def test_every_prompt_has_its_expected_outcome_and_no_answer_is_wrong(
    tmp_path: Path,
) -> None:
    async with corpus_router(tmp_path) as stub:
        outcomes = await run_corpus(stub, load_corpus())
    total, _ = tally(outcomes)
    assert total.wrong == 0, [(o.case.prompt, o.answer) for o in outcomes if o.wrong]
    assert total.failed == 0, [(o.case.prompt, o.detail) for o in outcomes if o.kind == "failed"]
    mismatched = [
        (o.case.prompt, o.case.expect, o.kind, o.answer or o.detail)
        for o in outcomes
        if not o.correct
    ]
    assert mismatched == []
    assert total.precision == 1.0 and total.coverage == 1.0
