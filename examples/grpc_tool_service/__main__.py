"""An example tool service a team could deploy on its own: a tiny ledger with a read tool and a
write tool, behind toolmesh through the ``toolmesh.tool.v1.ToolService`` contract.

It imports only the generated contract (``toolmesh.tool.v1``), grpcio and the standard gRPC
health service: nothing of toolmesh's own code. Run it, then register it with the router:

    python -m examples.grpc_tool_service --port 50070
    toolmesh backends add ledger --grpc 127.0.0.1:50070
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from toolmesh.tool.v1 import tool_pb2, tool_pb2_grpc

SERVICE = tool_pb2.DESCRIPTOR.services_by_name["ToolService"].full_name

TOOLS = [
    tool_pb2.ToolDefinition(
        name="balance",
        description="The balance of an account, in cents.",
        input_schema_json=json.dumps(
            {
                "type": "object",
                "properties": {"account": {"type": "string", "minLength": 1, "maxLength": 64}},
                "required": ["account"],
                "additionalProperties": False,
            }
        ),
        output_schema_json=json.dumps(
            {
                "type": "object",
                "properties": {"account": {"type": "string"}, "cents": {"type": "integer"}},
                "required": ["account", "cents"],
            }
        ),
        read_only=True,
    ),
    tool_pb2.ToolDefinition(
        name="deposit",
        description="Add cents to an account; the same idempotency key never deposits twice.",
        input_schema_json=json.dumps(
            {
                "type": "object",
                "properties": {
                    "account": {"type": "string", "minLength": 1, "maxLength": 64},
                    "cents": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
                },
                "required": ["account", "cents"],
                "additionalProperties": False,
            }
        ),
        read_only=False,
    ),
]


class Ledger(tool_pb2_grpc.ToolServiceServicer):
    """In memory, per tenant; a real service would keep this in its own database."""

    def __init__(self) -> None:
        self._balances: dict[tuple[str, str], int] = {}
        self._applied: dict[tuple[str, str], str] = {}

    async def ListTools(
        self, request: tool_pb2.ListToolsRequest, context: aio.ServicerContext
    ) -> tool_pb2.ListToolsResponse:
        return tool_pb2.ListToolsResponse(tools=TOOLS)

    async def CallTool(
        self, request: tool_pb2.CallToolRequest, context: aio.ServicerContext
    ) -> tool_pb2.CallToolResponse:
        try:
            args: dict[str, Any] = json.loads(request.arguments_json or "{}")
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "arguments_json is not JSON")
        account = (request.tenant, str(args.get("account", "")))
        if request.name == "balance":
            cents = self._balances.get(account, 0)
            return tool_pb2.CallToolResponse(
                text=f"{account[1]} holds {cents} cents.",
                result_json=json.dumps({"account": account[1], "cents": cents}),
            )
        if request.name == "deposit":
            if not request.idempotency_key:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "idempotency_key required")
            key = (request.tenant, request.idempotency_key)
            if key in self._applied:
                return tool_pb2.CallToolResponse(text=self._applied[key])
            cents = int(args["cents"])
            if account[1] == "frozen":
                # Declined for this input: an answer, not a failure of the service.
                return tool_pb2.CallToolResponse(text="That account is frozen.", is_error=True)
            self._balances[account] = self._balances.get(account, 0) + cents
            text = f"Deposited {cents} cents to {account[1]}."
            self._applied[key] = text
            return tool_pb2.CallToolResponse(text=text)
        await context.abort(grpc.StatusCode.NOT_FOUND, f"no tool {request.name}")
        raise AssertionError("unreachable")


async def serve(host: str, port: int) -> None:
    server = aio.server(options=[("grpc.so_reuseport", 0)])
    tool_pb2_grpc.add_ToolServiceServicer_to_server(Ledger(), server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    for name in ("", SERVICE):
        await checks.set(name, health_pb2.HealthCheckResponse.SERVING)
    print(f"ledger tool service on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await checks.enter_graceful_shutdown()
    await server.stop(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50070)
    options = parser.parse_args()
    asyncio.run(serve(options.host, options.port))


if __name__ == "__main__":
    main()
