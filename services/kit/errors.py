"""Precise gRPC errors with google.rpc details, so clients learn exactly what was wrong."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc import aio
from grpc_status import rpc_status
from pydantic import ValidationError

from services.kit.limits import MAX_REPORTED_VIOLATIONS


def _rich_status(
    code: grpc.StatusCode, message: str, details: Iterable[object] = ()
) -> grpc.Status:
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)  # type: ignore[arg-type]
        packed.append(any_detail)
    return rpc_status.to_status(
        status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=packed)
    )


async def abort(
    context: aio.ServicerContext, code: grpc.StatusCode, message: str, *details: object
) -> NoReturn:
    """Abort the RPC with ``code`` and ``message`` plus any google.rpc detail messages."""
    status = _rich_status(code, message, details)
    # context.abort (not abort_with_status) so tracing interceptors see the code.
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


async def abort_invalid(
    context: aio.ServicerContext, violations: list[tuple[str, str]]
) -> NoReturn:
    """INVALID_ARGUMENT naming the bad fields, with a google.rpc.BadRequest detail.

    At most ``MAX_REPORTED_VIOLATIONS`` are listed; the last entry then counts the rest.
    """
    if len(violations) > MAX_REPORTED_VIOLATIONS:
        kept = violations[: MAX_REPORTED_VIOLATIONS - 1]
        more = len(violations) - len(kept)
        violations = [*kept, ("request", f"and {more} more violations not listed")]
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
            for field, description in violations
        ]
    )
    message = "; ".join(f"{field}: {description}" for field, description in violations)
    await abort(context, grpc.StatusCode.INVALID_ARGUMENT, message, bad_request)


def violations_from(error: ValidationError) -> list[tuple[str, str]]:
    """Field paths and messages of a pydantic error, without echoing the rejected input."""
    return [
        (".".join(str(part) for part in item["loc"]) or "request", item["msg"])
        for item in error.errors(include_input=False, include_url=False)
    ]


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromMilliseconds(int(seconds * 1000))
    return info


STATUS_DETAILS_KEY = "grpc-status-details-bin"


def status_details_metadata(err: aio.AioRpcError) -> tuple[tuple[str, str | bytes], ...]:
    """The google.rpc details trailer of another call's error (BadRequest, RetryInfo ...)."""
    return tuple(
        (item[0], item[1])
        for item in (err.trailing_metadata() or ())
        if item[0] == STATUS_DETAILS_KEY
    )


async def forward(
    context: aio.ServicerContext, err: aio.AioRpcError, message: str | None = None
) -> NoReturn:
    """Abort with another call's status code and its google.rpc details intact.

    ``message`` replaces the error's text (say, to keep a dependency's address out of it).
    The details trailer carries its own message; when one is given it is rewritten to match,
    so the two never disagree.
    """
    details = status_details_metadata(err)
    text = err.details() or "" if message is None else message
    if message is not None and details:
        status = status_pb2.Status()
        status.ParseFromString(details[0][1])
        status.message = text
        details = ((STATUS_DETAILS_KEY, status.SerializeToString()),)
    await context.abort(err.code(), text, details)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover
