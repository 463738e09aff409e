"""Each tool's recent success rate (the H of the confidence), refreshed in the background.

Telemetry's GetToolHealth is asked every ``refresh_s`` seconds, never per request. It counts
the gateway's per-request records (one per request, written by the gateway alone), so neither
span sampling nor spans another mesh peer exports can move a tool's health. When telemetry
cannot be reached the last known values stay in use; a tool without data counts as healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc import aio

from toolmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc

log = logging.getLogger("toolmesh.router.health")


class ToolHealth:
    def __init__(self, channel: aio.Channel, *, refresh_s: float, window_s: int) -> None:
        self._stub = telemetry_pb2_grpc.TelemetryStub(channel)
        self._refresh_s = refresh_s
        self._window_s = window_s
        self._success: dict[tuple[str, str], float] = {}
        self._task: asyncio.Task[None] | None = None
        # Log an outage and a recovery once each, not on every refresh.
        self._reachable = True

    def __call__(self, name: str, version: str) -> float:
        return self._success.get((name, version), 1.0)

    async def refresh(self) -> bool:
        """One GetToolHealth call; True when the values were replaced by fresh ones."""
        try:
            response = await self._stub.GetToolHealth(
                telemetry_pb2.GetToolHealthRequest(window_seconds=self._window_s),
                timeout=min(5.0, self._refresh_s),
            )
        except aio.AioRpcError as error:
            if self._reachable:
                code = error.code()
                log.warning(
                    "telemetry unreachable; keeping the last tool health values",
                    extra={"code": code.name if isinstance(code, grpc.StatusCode) else str(code)},
                )
            self._reachable = False
            return False
        if not self._reachable:
            log.info("telemetry reachable again; tool health refreshed")
        self._reachable = True
        self._success = {
            (tool.tool_name, tool.tool_version): min(1.0, max(0.0, tool.success_rate))
            for tool in response.tools
            if tool.tool_name and tool.calls > 0
        }
        return True

    async def _loop(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._refresh_s)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="tool-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
