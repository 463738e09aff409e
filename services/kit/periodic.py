"""Background jobs that run now and then every few seconds, for the life of a server.

One helper so every service's housekeeping behaves the same: the first run is immediate
unless asked otherwise, a failing run is logged (with its traceback: it is our bug or a
dependency's, never a caller's) and retried at the next tick, and stopping cancels the job
and waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("toolmesh.periodic")

Job = Callable[[], Awaitable[object]]
Stop = Callable[[], Awaitable[None]]


async def _forever(name: str, job: Job, interval_s: float, first_after_s: float) -> None:
    await asyncio.sleep(first_after_s)
    while True:
        try:
            await job()
        except Exception:
            log.exception("periodic job failed; retrying at the next tick", extra={"job": name})
        await asyncio.sleep(interval_s)


def every(interval_s: float, job: Job, *, name: str, first_after_s: float = 0.0) -> Stop:
    """Run ``job`` after ``first_after_s`` seconds (default: at once) and then every
    ``interval_s`` seconds; returns the stop function.

    Must be called inside the running event loop (from a service's register step).
    """
    task = asyncio.get_running_loop().create_task(
        _forever(name, job, interval_s, first_after_s), name=name
    )

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return stop


def background(coroutine: Awaitable[None], *, name: str) -> Stop:
    """Run a long-lived coroutine (a queue consumer) until stopped."""
    task = asyncio.ensure_future(coroutine)
    task.set_name(name)

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return stop
