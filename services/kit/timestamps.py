"""The valid range of a google.protobuf.Timestamp, checked before any conversion.

Out-of-range values (nanos outside [0, 1e9), seconds outside years 1-9999) make protobuf's
own conversions raise, which a handler would answer INTERNAL; callers check first and answer
INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

# 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z, as in google/protobuf/timestamp.proto.
MIN_SECONDS = -62_135_596_800
MAX_SECONDS = 253_402_300_799
NANOS_PER_SECOND = 1_000_000_000


def timestamp_problem(stamp: Timestamp) -> str | None:
    """Why ``stamp`` is not a valid Timestamp, or None when it is."""
    if not 0 <= stamp.nanos < NANOS_PER_SECOND:
        return "nanos must be 0-999999999"
    if not MIN_SECONDS <= stamp.seconds <= MAX_SECONDS:
        return "seconds must be within years 1-9999"
    return None
