"""The periodic-job helper: runs now and on every tick, survives a failing run, stops cleanly."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.kit.periodic import every


async def test_a_failing_run_is_logged_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []
    ran_twice = asyncio.Event()

    async def job() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("dependency down")
        ran_twice.set()

    with caplog.at_level(logging.ERROR, logger="toolmesh.periodic"):
        stop = every(0.01, job, name="flaky")
        await asyncio.wait_for(ran_twice.wait(), timeout=5)
        await stop()
    (record,) = [r for r in caplog.records if r.name == "toolmesh.periodic"]
    assert record.job == "flaky"
    # The traceback is kept: as exc_info, or already rendered (and redacted) into exc_text.
    assert record.exc_info is not None or "dependency down" in (record.exc_text or "")
    stopped_at = len(calls)
    await asyncio.sleep(0.05)
    assert len(calls) == stopped_at


async def test_the_first_run_can_wait_an_interval() -> None:
    calls: list[str] = []

    async def job() -> None:
        calls.append("ran")

    stop = every(0.01, job, name="later", first_after_s=3600)
    await asyncio.sleep(0.05)
    await stop()
    assert calls == []
