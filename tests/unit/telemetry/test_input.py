"""Out-of-range timestamps and odd values in every telemetry RPC that takes them: always
INVALID_ARGUMENT naming the field (a batch names its bad item), never INTERNAL."""

from __future__ import annotations

import math

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from toolmesh.telemetry.v1 import telemetry_pb2 as G

from .conftest import TelemetryServer
from .helpers import bad_fields, caller, request_record, stamp
from .test_audit import event

# Validation happens before any query: one backend is enough.
pytestmark = pytest.mark.parametrize("settings", ["sqlite"], indirect=True)

BAD_NANOS = Timestamp(seconds=1_700_000_000, nanos=-1)
HUGE_NANOS = Timestamp(seconds=1_700_000_000, nanos=1_000_000_000)
AFTER_9999 = Timestamp(seconds=253_402_300_800)
BEFORE_YEAR_1 = Timestamp(seconds=-62_135_596_801)
BEFORE_1970 = Timestamp(seconds=-86_400)
AFTER_2262 = Timestamp(seconds=10_000_000_000)  # year 2286: valid protobuf, not 64-bit ns


def record_at(i: int, when: Timestamp) -> G.UsageRecord:
    record = request_record(f"r{i}", 5)
    record.occurred_at.CopyFrom(when)
    return record


def event_at(i: int, when: Timestamp) -> G.AuditEvent:
    item = event(f"e{i}")
    item.occurred_at.CopyFrom(when)
    return item


CASES = [
    ("GetCost", G.GetCostRequest(caller=caller(), start=BAD_NANOS, end=stamp()), ["start.nanos"]),
    (
        "GetCost",
        G.GetCostRequest(caller=caller(), start=stamp(), end=AFTER_9999),
        ["end.seconds"],
    ),
    (
        "GetCost",
        G.GetCostRequest(caller=caller(), start=BEFORE_YEAR_1, end=AFTER_2262),
        ["start.seconds", "end"],
    ),
    ("GetCost", G.GetCostRequest(caller=caller(), start=BEFORE_1970, end=stamp()), ["start"]),
    ("ListAudit", G.ListAuditRequest(caller=caller(), since=HUGE_NANOS), ["since.nanos"]),
    ("ListAudit", G.ListAuditRequest(caller=caller(), since=AFTER_9999), ["since.seconds"]),
    ("ListAudit", G.ListAuditRequest(caller=caller(), since=AFTER_2262), ["since"]),
    (
        "ListAudit",
        G.ListAuditRequest(caller=caller(), page_token="9" * 19, limit=-1),
        ["limit", "page_token"],
    ),
    (
        "RecordUsage",
        G.RecordUsageRequest(
            records=[record_at(0, stamp()), record_at(1, BAD_NANOS), record_at(2, AFTER_9999)]
        ),
        ["records[1].occurred_at.nanos", "records[2].occurred_at.seconds"],
    ),
    (
        "RecordUsage",
        G.RecordUsageRequest(records=[record_at(0, BEFORE_1970), record_at(1, AFTER_2262)]),
        ["records[0].occurred_at", "records[1].occurred_at"],
    ),
    (
        "AppendAudit",
        G.AppendAuditRequest(
            events=[event_at(0, stamp()), event_at(1, HUGE_NANOS), event_at(2, BEFORE_YEAR_1)]
        ),
        ["events[1].occurred_at.nanos", "events[2].occurred_at.seconds"],
    ),
    (
        "AppendAudit",
        G.AppendAuditRequest(events=[event_at(0, AFTER_2262)]),
        ["events[0].occurred_at"],
    ),
]


@pytest.mark.parametrize(("call", "request_", "fields"), CASES)
async def test_timestamps_out_of_range(
    server: TelemetryServer, call: str, request_, fields: list[str]
) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await getattr(server.stub, call)(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == fields


async def test_a_good_item_of_a_refused_batch_is_not_stored(server: TelemetryServer) -> None:
    with pytest.raises(aio.AioRpcError):
        await server.stub.RecordUsage(
            G.RecordUsageRequest(records=[record_at(0, stamp()), record_at(1, BAD_NANOS)])
        )
    reply = await server.stub.RecordUsage(G.RecordUsageRequest(records=[record_at(0, stamp())]))
    assert (reply.stored, reply.duplicates) == (1, 0)


async def test_odd_measurements_and_enums(server: TelemetryServer) -> None:
    record = request_record("r", math.nan, trace_id="XYZ")
    record.grpc_status_code = 17
    record.tool_outcome = 9
    record.tool_duration_ms = -1
    with pytest.raises(aio.AioRpcError) as caught:
        await server.stub.RecordUsage(G.RecordUsageRequest(records=[record]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == [
        "records[0].duration_ms",
        "records[0].tool_duration_ms",
        "records[0].grpc_status_code",
        "records[0].tool_outcome",
        "records[0].trace_id",
    ]
    for request_, field in (
        (G.GetCostRequest(caller=caller(), group_by=[42]), "group_by"),
        (G.SetBudgetRequest(caller=caller(), period=7), "period"),
        (G.GetStatsRequest(caller=caller(), group_by=-3), "group_by"),
    ):
        call = type(request_).__name__.removesuffix("Request")
        with pytest.raises(aio.AioRpcError) as caught:
            await getattr(server.stub, call)(request_)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_fields(caught.value) == [field]


async def test_thousands_of_bad_items_get_a_bounded_answer(server: TelemetryServer) -> None:
    records = [record_at(i, BAD_NANOS) for i in range(1000)]
    with pytest.raises(aio.AioRpcError) as caught:
        await server.stub.RecordUsage(G.RecordUsageRequest(records=records))
    fields = bad_fields(caught.value)
    assert len(fields) == 20 and fields[-1] == "request"
    assert fields[0] == "records[0].occurred_at.nanos"
