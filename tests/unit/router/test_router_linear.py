"""Routing costs time linear in the prompt, and long prompts never hold up short ones.

Timings are compared with each other within one test (the machine is shared and noisy):
the cost at 8,000 characters against the cost at 2,000 for the same crafted family, and
against a short everyday prompt. The prompts are the shapes that made the old backtracking
patterns take 0.3-1.2 s (digit runs before a unit, ``1 1 1``, ``note note``) and others that
hit every rewrite, quantifier and set of the rules.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from collections.abc import Callable

import pytest

from services.router.catalog import default_registry
from services.router.routing import ToolRouter
from services.router.rules import load_rules
from services.router.settings import DEFAULT_RULES_FILE
from tests.unit.router.harness import CALLER, RouterServer
from toolmesh.router.v1 import router_pb2


def _fill(unit: str, n: int) -> str:
    return (unit * (n // len(unit) + 1))[:n]


FAMILIES: dict[str, Callable[[int], str]] = {
    "digits and spaces": lambda n: _fill("1 ", n),
    "digit run before a unit": lambda n: _fill("1234567890", n) + " km",
    "1 1 1": lambda n: "convert " + _fill("1 ", n - 20) + "km to mi",
    "note note": lambda n: _fill("note ", n),
    "products 1x1x": lambda n: _fill("1x", n),
    "operator words": lambda n: _fill("1 plus ", n),
    "open parentheses": lambda n: "what is " + _fill("(", n - 10) + "1",
    "operators": lambda n: "what is " + _fill("1+", n - 10) + "!",
    "signs": lambda n: "what is " + _fill("-", n - 10) + "1 x",
    "points and commas": lambda n: "convert " + _fill("1,1.", n - 20) + " km to",
    "zone words": lambda n: "what time is it in " + _fill("a ", n - 20),
    "note text": lambda n: "save a note: " + _fill("x ", n - 13),
    "questions": lambda n: _fill("what is 2+2? ", n),
    "non-ASCII": lambda n: _fill("é1 ", n),
}


def _cost(router: ToolRouter, prompt: str, runs: int = 5) -> float:
    """The fastest of a few runs: the least disturbed by other work on the machine (and by
    the garbage collector, which is paused while timing)."""
    best = float("inf")
    gc.collect()
    gc.disable()
    try:
        for _ in range(runs):
            started = time.perf_counter()
            router.route(prompt, ["*"])
            best = min(best, time.perf_counter() - started)
    finally:
        gc.enable()
    return best


@pytest.fixture(scope="module")
def tool_router() -> ToolRouter:
    return ToolRouter(load_rules(DEFAULT_RULES_FILE), default_registry(), lambda _n, _v: 1.0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_routing_time_grows_linearly_with_the_prompt(tool_router: ToolRouter, family: str) -> None:
    make = FAMILIES[family]
    baseline = min(_cost(tool_router, "what is 17 * 23", runs=20) for _ in range(3))
    quarter, full = _cost(tool_router, make(2000)), _cost(tool_router, make(8000))
    # Linear: four times the prompt costs about four times the time; quadratic would be 16x.
    # The margin between them keeps the check meaningful on a loaded machine.
    assert full < 8.0 * quarter, (
        f"{family}: 2,000 chars {quarter * 1e3:.2f} ms, 8,000 {full * 1e3:.2f}"
    )
    # And bounded: the worst family costs ~175x a short prompt here; the backtracking patterns
    # cost ~18,000x at 8,000 characters.
    assert full < 1000 * baseline, f"{family}: {full * 1e3:.2f} ms vs {baseline * 1e6:.0f} us"


async def _route(router: RouterServer, prompt: str) -> float:
    started = time.perf_counter()
    await router.stub.Route(
        router_pb2.RouteRequest(caller=CALLER, prompt=prompt, allowed_tools=["*"]), timeout=30
    )
    return time.perf_counter() - started


async def test_short_prompts_are_answered_promptly_while_long_ones_are_scored(
    router: RouterServer,
) -> None:
    long_prompt = FAMILIES["products 1x1x"](8000)
    short_prompt = "what is 17 * 23"
    long_alone = statistics.median([await _route(router, long_prompt) for _ in range(5)])
    stop = asyncio.Event()
    long_latencies: list[float] = []

    async def flood() -> None:
        while not stop.is_set():
            long_latencies.append(await _route(router, long_prompt))

    flooders = [asyncio.create_task(flood()) for _ in range(4)]
    try:
        await asyncio.sleep(0.1)
        short = [await _route(router, short_prompt) for _ in range(30)]
    finally:
        stop.set()
        await asyncio.gather(*flooders)
    # Scored on the loop, a short prompt would wait for whole long ones (at least one long
    # scoring each); off the loop it waits only for its turn on the GIL.
    assert long_latencies, "the flood never completed a long prompt"
    assert statistics.median(short) < long_alone / 3, (
        f"short p50 {statistics.median(short) * 1e3:.1f} ms under load, "
        f"a long prompt alone {long_alone * 1e3:.1f} ms"
    )
