"""Raw grpc.aio unary echo: the baseline every toolmesh figure is divided by."""

from __future__ import annotations

import asyncio
import sys

import grpc
from grpc import aio

METHOD = "/bench.Echo/Echo"


async def _echo(request: bytes, context: aio.ServicerContext) -> bytes:
    return request


async def main(port: int) -> None:
    server = aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
